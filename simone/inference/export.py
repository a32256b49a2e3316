"""State-dict adapters between our models and Hugging Face's: the Llama-style `Transformer`
↔ `LlamaForCausalLM`, and the GPT-2 baseline → `GPT2LMHeadModel`.

Our model fuses q/k/v into one matrix (`wqkv`) and gate/up into one (`w13`); Hugging Face
keeps them apart. Everything else is a rename. RoPE needs no permutation: `apply_rope` uses
the same half-split pairing as `transformers` (`rotate_half`). The mapping is exact: the
same weights give the same logits (checked in tests/test_export.py).

    ours                                  transformers
    tok_embeddings.weight                 model.embed_tokens.weight
    layers.N.attention_norm.weight        model.layers.N.input_layernorm.weight
    layers.N.attention.wqkv.weight        model.layers.N.self_attn.{q,k,v}_proj.weight
    layers.N.attention.wo.weight          model.layers.N.self_attn.o_proj.weight
    layers.N.ffn_norm.weight              model.layers.N.post_attention_layernorm.weight
    layers.N.feed_forward.w13.weight      model.layers.N.mlp.{gate,up}_proj.weight
    layers.N.feed_forward.w2.weight       model.layers.N.mlp.down_proj.weight
    norm.weight                           model.norm.weight
    output.weight                         lm_head.weight  (the embedding when tied)

The GPT-2 baseline maps name for name (`wqkv` is already GPT-2's fused `c_attn`), except
that GPT-2 stores its linear layers as `Conv1D`, whose weights are the transpose of ours.

    tok_embeddings / pos_embeddings       transformer.wte / transformer.wpe
    layers.N.attention_norm / ffn_norm    transformer.h.N.ln_1 / ln_2
    layers.N.attention.wqkv / wo          transformer.h.N.attn.c_attn / c_proj   (weights .T)
    layers.N.feed_forward.fc / proj       transformer.h.N.mlp.c_fc / c_proj      (weights .T)
    norm / output                         transformer.ln_f / lm_head

`hf_config_dict` gives the `config.json` of either as plain JSON, so writing a Hugging Face
folder needs no `transformers`; `transformers` is imported only inside the functions that
build its objects, so the rest of the package does not depend on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from simone.config import ModelConfig, architecture_levers
from simone.errors import SimoneError
from simone.model.base import LanguageModel
from simone.model.layers import swiglu_hidden_dim

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


class ExportError(SimoneError, ValueError):
    """The model cannot be exported as asked: it has a part the target format cannot hold, or
    --out names a place the export must not write (the message says which)."""


def refuse_writing_over_the_input(out: Path, model_path: Path) -> None:
    """ExportError when `out` is the model being exported (the same path or the same file)
    or a folder holding it: an export would replace what it reads, whatever --force says."""
    out, model_path = Path(out), Path(model_path)
    out_real, model_real = out.resolve(), model_path.resolve()
    same_file = out.exists() and model_path.exists() and os.path.samefile(out, model_path)
    if same_file or out_real == model_real or out_real in model_real.parents:
        raise ExportError(f"{out}: is the model being exported ({model_path}) or holds it; choose an --out outside it")


def _check_llama(cfg: ModelConfig) -> None:
    if cfg.arch != "llama":
        raise ExportError(f"model.arch={cfg.arch!r}: only the Llama-style model maps onto LlamaForCausalLM")
    # A policy head can be dropped (it never touches the logits); memory slots cannot: every
    # position attends to them, and LlamaForCausalLM has no place for them.
    if cfg.governance and cfg.memory:
        raise ExportError(
            "model.memory=true: persistent memory slots change the logits and have no "
            "LlamaForCausalLM equivalent; export a model trained with model.memory=false"
        )
    levers = architecture_levers(cfg)
    if levers:
        raise ExportError(
            f"{', '.join(levers)}: the Llama architecture (LlamaForCausalLM, llama.cpp) has no such "
            "part; this model runs in simone only (export a model trained without it)"
        )


def _llama_config_kwargs(cfg: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    _check_llama(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": swiglu_hidden_dim(cfg.dim, cfg.ffn_hidden, cfg.multiple_of),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,  # a document starts after the end-of-document token, as in training
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def _check_gpt2(cfg: ModelConfig) -> None:
    if cfg.arch != "gpt2":
        raise ExportError(f"model.arch={cfg.arch!r}: only the GPT-2 baseline maps onto GPT2LMHeadModel")
    if (cfg.n_kv_heads or cfg.n_heads) != cfg.n_heads:
        raise ExportError(
            f"model.n_kv_heads={cfg.n_kv_heads}: GPT2LMHeadModel has no grouped-query "
            f"attention; export a GPT-2 baseline with n_kv_heads = n_heads"
        )


def _gpt2_config_kwargs(cfg: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    _check_gpt2(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_hidden or 4 * cfg.dim,
        "activation_function": "gelu_new",  # GELU's tanh approximation, as in `simone.model.gpt2.MLP`
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def hf_config_dict(cfg: ModelConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The `config.json` (plain JSON) of the Hugging Face model equal to ours:
    `LlamaForCausalLM` for arch "llama", `GPT2LMHeadModel` for arch "gpt2"."""
    if cfg.arch == "gpt2":
        head = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
        return {**head, **_gpt2_config_kwargs(cfg, eos_id), "dtype": "float32"}
    head = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    kwargs = _llama_config_kwargs(cfg, eos_id)
    # transformers >= 5 reads rope_parameters, older versions rope_theta: write both
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {**head, **kwargs, "rope_parameters": rope, "dtype": "float32"}


def hf_llama_config(cfg: ModelConfig, eos_id: int | None = None) -> LlamaConfig:
    """The `transformers.LlamaConfig` describing the same network as `cfg`.

    eos_id (the tokenizer's end-of-document id) becomes bos, eos and pad token for `generate`.
    """
    from transformers import LlamaConfig  # noqa: PLC0415  # deferred: transformers is optional and slow to import

    return LlamaConfig(**_llama_config_kwargs(cfg, eos_id))


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """The `ModelConfig` (arch "llama") for a `transformers.LlamaConfig`."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    if head_dim * n_heads != hf_config.hidden_size:
        raise ValueError("LlamaConfig with head_dim·num_attention_heads != hidden_size is not supported")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"LlamaConfig rope_type {rope.get('rope_type')!r} is not supported")
    return ModelConfig(
        arch="llama",
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        ffn_hidden=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
    )


def to_hf_llama_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our `Transformer.state_dict()` → `LlamaForCausalLM` names (tensors are views, not copies)."""
    _check_llama(cfg)
    head_dim = cfg.dim // cfg.n_heads
    q_size = cfg.n_heads * head_dim
    kv_size = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state_dict["tok_embeddings.weight"],
        "model.norm.weight": state_dict["norm.weight"],
        "lm_head.weight": state_dict.get("output.weight", state_dict["tok_embeddings.weight"]),
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[ours + "attention.wqkv.weight"].split([q_size, kv_size, kv_size])
        gate, up = state_dict[ours + "feed_forward.w13.weight"].chunk(2)
        out.update(
            {
                theirs + "input_layernorm.weight": state_dict[ours + "attention_norm.weight"],
                theirs + "self_attn.q_proj.weight": q,
                theirs + "self_attn.k_proj.weight": k,
                theirs + "self_attn.v_proj.weight": v,
                theirs + "self_attn.o_proj.weight": state_dict[ours + "attention.wo.weight"],
                theirs + "post_attention_layernorm.weight": state_dict[ours + "ffn_norm.weight"],
                theirs + "mlp.gate_proj.weight": gate,
                theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": state_dict[ours + "feed_forward.w2.weight"],
            }
        )
    return out


def from_hf_llama_state_dict(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` names → a state dict that `Transformer(cfg).load_state_dict` accepts."""
    _check_llama(cfg)
    sd = hf_state_dict
    embed = sd["model.embed_tokens.weight"]
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": embed,
        "norm.weight": sd["model.norm.weight"],
        "output.weight": embed if cfg.tie_embeddings else sd["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        out.update(
            {
                ours + "attention_norm.weight": sd[theirs + "input_layernorm.weight"],
                ours + "attention.wqkv.weight": torch.cat(
                    [sd[attn + "q_proj.weight"], sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"]]
                ),
                ours + "attention.wo.weight": sd[attn + "o_proj.weight"],
                ours + "ffn_norm.weight": sd[theirs + "post_attention_layernorm.weight"],
                ours + "feed_forward.w13.weight": torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]]),
                ours + "feed_forward.w2.weight": sd[mlp + "down_proj.weight"],
            }
        )
    return out


def to_hf_gpt2_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our `GPT2.state_dict()` → `GPT2LMHeadModel` names (`Conv1D` weights transposed)."""
    _check_gpt2(cfg)
    sd = state_dict
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": sd["tok_embeddings.weight"],
        "transformer.wpe.weight": sd["pos_embeddings.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
        "lm_head.weight": sd.get("output.weight", sd["tok_embeddings.weight"]),
    }
    pairs = {
        "attention_norm": "ln_1",
        "ffn_norm": "ln_2",
        "attention.wqkv": "attn.c_attn",
        "attention.wo": "attn.c_proj",
        "feed_forward.fc": "mlp.c_fc",
        "feed_forward.proj": "mlp.c_proj",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in pairs.items():
            weight = sd[f"layers.{i}.{ours}.weight"]
            is_linear = not ours.endswith("norm")
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if is_linear else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"layers.{i}.{ours}.bias"]
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → the Hugging Face names of `hf_config_dict(cfg)`'s architecture.
    Parts of a governance model that never touch the logits (the policy head) are left out;
    memory slots, which do, are refused (`ExportError`)."""
    if cfg.arch == "gpt2":
        return to_hf_gpt2_state_dict(state_dict, cfg)
    return to_hf_llama_state_dict(state_dict, cfg)


def to_hf_llama(model: LanguageModel, eos_id: int | None = None, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` holding a copy of `model`'s weights, on the same
    device and in the same dtype, in eval mode."""
    from transformers import LlamaForCausalLM  # noqa: PLC0415  # deferred: as in hf_llama_config

    cfg = model.cfg
    hf_config = hf_llama_config(cfg, eos_id)
    hf_config._attn_implementation = attn_implementation
    param = next(model.parameters())
    # transformers wraps PreTrainedModel.to with functools.wraps, which mypy cannot bind to the instance
    hf_model = LlamaForCausalLM(hf_config).to(device=param.device, dtype=param.dtype)  # type: ignore[call-arg]
    hf_sd = {k: v.detach().clone() for k, v in to_hf_llama_state_dict(model.state_dict(), cfg).items()}
    missing, unexpected = hf_model.load_state_dict(hf_sd, strict=False)
    # Non-persistent buffers (rotary inv_freq) are not in a state dict.
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"to_hf_llama: state-dict mismatch; missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()
