"""Building blocks of the Llama-style model: RMSNorm, the SwiGLU feed-forward (or nanochat's
ReLU²), RoPE, and a Linear that decodes faster on CPUs.

RMSNorm, SwiGLU's gate and RoPE on the fused q/k/v projection each have a hand-written
backward (an autograd Function) for eager training, where autograd's own would make extra
passes over [tokens, width] tensors; inference runs the plain formulas (a Function's
per-call overhead matters there), and so does torch.compile (it fuses them itself).

RoPE uses the "half-split" convention of Hugging Face `transformers` (dimension i is paired
with dimension i + head_dim/2, not with its neighbour), so our q/k projection weights load
into `LlamaForCausalLM` unchanged (see `simone/inference/export.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simone.model.cpu_blas import rows_matmul


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever the input dtype.

    Training on float32 input (the residual stream, also under autocast) goes through
    `RMSNormFunction`; its output is then already in the autocast dtype, since a Linear,
    which would cast it anyway, always follows a norm in these models.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            needs_grad = x.requires_grad or self.weight.requires_grad
            if torch.is_grad_enabled() and needs_grad and not torch.compiler.is_compiling():  # compile fuses F.rms_norm
                device = x.device.type
                out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
                return RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Low precision: normalise in float32 (as Llama does), scale in the input dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm of float32 x [..., D] with its backward written out, for training speed.

    Autograd of the composite (pow, mean, rsqrt, two products, and a backward for each)
    makes about twice the passes over [tokens, D] that are needed; here the forward saves
    x̂ = x·rstd and rstd, and the backward is dx = rstd·(g − x̂·mean(g·x̂)) with g = dy·weight,
    and dweight = Σ dy·x̂ (cpu preset shape, float32: 11.7 → 4.8 ms forward + backward).
    The output is written in `out_dtype` (the autocast dtype, or float32).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        dim = x.size(-1)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(dim)
        rstd = mean_square.add_(eps).rsqrt_()
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        return torch.mul(x_hat, weight, out=out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        dim = x_hat.size(-1)
        grad_out = grad_out.float()
        grad_times_x_hat = grad_out * x_hat
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_times_x_hat.reshape(-1, dim).sum(0).to(weight.dtype)
        # mean(g·x̂) over the last dimension = (dy·x̂) @ weight / D: one matrix-vector product.
        mean_g_x_hat = (grad_times_x_hat @ weight.float()).unsqueeze(-1).div_(dim)
        grad_x = (grad_out * weight).addcmul_(x_hat, mean_g_x_hat, value=-1).mul_(rstd)
        return grad_x, grad_weight, None, None


class Linear(nn.Linear):
    """`nn.Linear` that decodes faster on a CPU.

    For a few rows (token-by-token generation) a CPU computes x @ Wᵀ up to ~2× slower than
    x @ Wt with Wt a contiguous [in, out] copy of W (measured here: 8×256 by 256×4096,
    532 → 282 µs; 1×256 by 256×1408, 116 → 97 µs). So without gradients, on a CPU, for at
    most `decode_rows` rows, this layer multiplies by such a copy, made on first use and
    remade whenever the weight changes (its storage, version counter or the autocast
    dtype). Training, evaluation batches, GPUs and torch.compile use `F.linear` unchanged;
    parameters and state dict are nn.Linear's. Costs one more copy of the weights. The product
    is `cpu_blas.rows_matmul`'s (NumPy's BLAS inside a decoding step where MKL is slow).
    """

    _weight_t: torch.Tensor | None = None  # the [in, out] copy (None: not made, or not usable)
    _weight_t_key: tuple | None = None  # (storage, version, dtype) it was made from

    decode_rows = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked in order of cost: this runs ~20 times per generated token.
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.numel() > self.decode_rows * x.size(-1):
            return F.linear(x, self.weight, self.bias)
        weight_t = self.decode_weight()
        if weight_t is None:
            return F.linear(x, self.weight, self.bias)
        y = rows_matmul(x, weight_t)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def decode_weight(self) -> torch.Tensor | None:
        """The weight as a contiguous [in, out] copy in the compute dtype (autocast's, when
        on), remade when the weight changed; None where there is none to make (a GPU, or a
        DTensor shard under FSDP)."""
        weight = self.weight
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        key = (weight.data_ptr(), weight._version, dtype)
        if key != self._weight_t_key:
            self._weight_t_key = key
            self._weight_t = None
            if weight.device.type == "cpu" and type(weight.data) is torch.Tensor:
                with torch.no_grad():
                    self._weight_t = weight.t().to(dtype).contiguous()
        return self._weight_t


def swiglu_hidden_dim(dim: int, ffn_hidden: int | None, multiple_of: int) -> int:
    """Width of the SwiGLU layer: `ffn_hidden` if set, else 8/3·dim rounded up to `multiple_of`.

    8/3·dim keeps the parameter count of a 4·dim GELU MLP, since SwiGLU has three matrices.
    """
    if ffn_hidden is not None:
        return ffn_hidden
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SiluGate(torch.autograd.Function):
    """silu(gate) · up, for gate_up = [gate | up] on the last dimension.

    Written out by hand for its backward: autograd of `chunk`, `silu` and `*` would make the
    two halves of the gradient separately and then concatenate them (a full extra pass over
    a [tokens, 2·hidden] tensor); here both halves are written into one buffer directly.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(gate_up, silu_gate)  # what autograd would keep anyway
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        gate_up, silu_gate = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate_up = [gate | up]: through `SiluGate` when a gradient is
    needed, as two plain ops otherwise (a custom Function costs tens of µs per call, which
    is most of a decoding step's time at small sizes)."""
    if torch.is_grad_enabled() and gate_up.requires_grad and not torch.compiler.is_compiling():
        return SiluGate.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)  # (torch.compile fuses these passes itself)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one matrix `w13` = [gate; up] (one matmul)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.hidden = hidden
        self.w13 = Linear(dim, 2 * hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w2(silu_gate(self.w13(x)))
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout, training=True)
        return y


class ReluSquared(nn.Module):
    """down(relu(up(x))²), nanochat's MLP (`model.mlp=relu2`): two matrices, `w1` up and `w2` down."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w2(F.relu(self.w1(x)).square())
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout, training=True)
        return y


# ----------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·frequency, each [max_len, 1, head_dim // 2] (the 1 broadcasts
    over heads), in float32.

    Frequency j is theta^(-2j/head_dim), as in the RoPE paper and `transformers`.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, n_heads, head_dim] by position; cos/sin are [T, 1, head_dim // 2].

    Pair (x1[j], x2[j]) = (x[j], x[j + head_dim/2]) is rotated by angle position·freq[j].
    Then q·k after rotation depends only on the distance between the two positions.
    """
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` without autograd, written into `out` (which may be a view)."""
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-1)  # x1·cos − x2·sin
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin)  # x2·cos + x1·sin
    return out


class RotaryQKV(torch.autograd.Function):
    """Split the fused projection qkv [B, T, n_q + 2·n_kv, head_dim] into q, k, v, with q
    and k rotated by RoPE.

    By hand for the backward: autograd would build d(qkv) from the gradients of q, k and v
    through three concatenations; here the inverse rotation of dq and dk and the copy of
    dv are written straight into one d(qkv) buffer. cos and sin are constants.
    """

    @staticmethod
    def forward(
        ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)  # no copies when they match
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.n_kv = n_q, n_kv
        return _split_and_rotate(qkv, cos, sin, n_q, n_kv)  # v: a view of qkv

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.n_q, ctx.n_kv
        batch, seq, _, head_dim = grad_q.shape
        grad = grad_q.new_empty(batch, seq, n_q + 2 * n_kv, head_dim)
        into_q, into_k, into_v = grad.split([n_q, n_kv, n_kv], dim=2)
        _rotate_into(into_q, grad_q, cos, -sin)  # the inverse rotation: angle → −angle
        _rotate_into(into_k, grad_k, cos, -sin)
        into_v.copy_(grad_v)
        return grad, None, None, None, None


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) from qkv [B, T, n_q + 2·n_kv, head_dim], q and k rotated: through
    `RotaryQKV` when a gradient is needed, without its per-call overhead otherwise, and
    as the plain formula under torch.compile."""
    if torch.compiler.is_compiling():  # compile fuses the plain formula into one kernel
        qk, v = qkv.split([n_q + n_kv, n_kv], dim=2)
        q, k = apply_rope(qk, cos, sin).split([n_q, n_kv], dim=2)
        return q, k, v
    if torch.is_grad_enabled() and qkv.requires_grad:
        return RotaryQKV.apply(qkv, cos, sin, n_q, n_kv)
    return _split_and_rotate(qkv, cos.to(qkv.dtype), sin.to(qkv.dtype), n_q, n_kv)


def _split_and_rotate(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) views: q and k rotated together into one new tensor, v a view of qkv."""
    qk, v = qkv.split([n_q + n_kv, n_kv], dim=2)
    q, k = _rotate_into(qk.new_empty(qk.shape), qk, cos, sin).split([n_q, n_kv], dim=2)
    return q, k, v
