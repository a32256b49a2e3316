"""Write a trained model as one GGUF file that llama.cpp runs (`simone export --format gguf`).

The file holds everything llama.cpp needs, in its metadata and tensors:

    general.*                 architecture ("llama", or "gpt2" for the GPT-2 baseline), name, file type
    llama.* / gpt2.*          hyperparameters: context, width, layers, heads, norm eps, RoPE base
    tokenizer.ggml.*          our byte-level BPE: model "gpt2", pre-tokenizer "gpt-2", tokens,
                              token types (special tokens are CONTROL), merges, bos/eos/pad ids,
                              eot id (`<|endofturn|>`, a tokenizer with chat tokens)
    tokenizer.chat_template   the chat template (simone/data/chat_template.py), with the chat tokens
    tensors                   llama.cpp's names (token_embd, blk.N.attn_q, ...), in --dtype

The tensors come from the Hugging Face names of `simone.inference.export` (the state-dict
adapter every export shares), then take llama.cpp's names. Two conventions differ from Hugging Face's:

- RoPE. Our `apply_rope` (like `transformers`' `rotate_half`) rotates the pair (x[j],
  x[j + head_dim/2]); llama.cpp's "llama" architecture rotates neighbours (x[2j], x[2j+1]).
  Reordering the output rows of wq and wk within each head (row j → 2j, row j + head_dim/2 →
  2j + 1) makes q·k identical, since attention only ever sees the dot products of q and k.
- GPT-2. `transformers` stores GPT-2's linear layers transposed (`Conv1D`); GGUF, like us, stores
  every matrix as [out_features, in_features], so those are transposed back.

Types: 1-D tensors (norms, biases) stay float32 in every file, as llama.cpp's own converter
does; matrices are written as --dtype. q8_0 packs rows in blocks of 32 values: a matrix whose
rows are not a multiple of 32 long is written as f16 instead.

The end-of-document token is bos, eos and pad. llama.cpp is told not to add a bos token
itself (`add_bos_token` false), because `simone generate` encodes a prompt without one: the
same prompt then gives the same ids on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simone.config import Config
from simone.data.chat_template import CHAT_TEMPLATE, END_OF_TURN
from simone.inference.export import ExportError, refuse_writing_over_the_input, to_hf_state_dict
from simone.inference.load import load_model
from simone.model import LanguageModel
from simone.model.layers import swiglu_hidden_dim
from simone.rundir import atomic_output

# `gguf` (slow to import) and `llama_cpp` (optional) are imported inside the functions that
# use them, on purpose: importing this module costs neither.

DTYPES = ("f32", "f16", "bf16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the byte-level GPT-2 split regex, which ours is
Q8_0_BLOCK = 32


def _ggml_types() -> dict[str, Any]:
    import gguf  # noqa: PLC0415

    t = gguf.GGMLQuantizationType
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}


def _file_types() -> dict[str, Any]:
    import gguf  # noqa: PLC0415

    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}


# ----------------------------------------------------------------------------- tensors


def rope_pairs_to_neighbours(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection [n_heads·head_dim, dim] so that head
    dimension j and j + head_dim/2 (our RoPE pair) become 2j and 2j + 1 (llama.cpp's)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_gguf_tensors(
    hf: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int
) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` names → llama.cpp's, q and k rows reordered for its RoPE. A tied
    output matrix is left out: llama.cpp falls back to token_embd when `output` is absent."""
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"blk.{i}."
        out.update(
            {
                dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
                dst + "attn_q.weight": rope_pairs_to_neighbours(hf[src + "self_attn.q_proj.weight"], n_heads),
                dst + "attn_k.weight": rope_pairs_to_neighbours(hf[src + "self_attn.k_proj.weight"], n_kv_heads),
                dst + "attn_v.weight": hf[src + "self_attn.v_proj.weight"],
                dst + "attn_output.weight": hf[src + "self_attn.o_proj.weight"],
                dst + "ffn_norm.weight": hf[src + "post_attention_layernorm.weight"],
                dst + "ffn_gate.weight": hf[src + "mlp.gate_proj.weight"],
                dst + "ffn_up.weight": hf[src + "mlp.up_proj.weight"],
                dst + "ffn_down.weight": hf[src + "mlp.down_proj.weight"],
            }
        )
    return out


def gpt2_gguf_tensors(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` names → llama.cpp's "gpt2" names, `Conv1D` weights transposed back."""
    out = {
        "token_embd.weight": hf["transformer.wte.weight"],
        "position_embd.weight": hf["transformer.wpe.weight"],
        "output_norm.weight": hf["transformer.ln_f.weight"],
        "output_norm.bias": hf["transformer.ln_f.bias"],
    }
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    parts = {
        "ln_1": "attn_norm",
        "ln_2": "ffn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(n_layers):
        for theirs, name in parts.items():
            src, dst = f"transformer.h.{i}.{theirs}.", f"blk.{i}.{name}."
            weight = hf[src + "weight"]
            out[dst + "weight"] = weight if theirs.startswith("ln_") else weight.t()
            out[dst + "bias"] = hf[src + "bias"]
    return out


def gguf_tensors(model: LanguageModel) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, as float32 numpy arrays [out, in]. Refuses
    (ExportError) what GGUF cannot hold, as the Hugging Face export does."""
    cfg = model.cfg
    hf = to_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    if cfg.arch == "gpt2":
        tensors = gpt2_gguf_tensors(hf, cfg.n_layers)
    else:
        tensors = llama_gguf_tensors(hf, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
    return {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in tensors.items()}


def tensor_type(array: np.ndarray, dtype: str) -> str:
    """The type a tensor is written as: 1-D stays f32; q8_0 needs rows in blocks of 32."""
    if array.ndim < 2:
        return "f32"
    if dtype == "q8_0" and array.shape[-1] % Q8_0_BLOCK:
        return "f16"
    return dtype


def encode_tensor(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, ggml type) for `GGUFWriter.add_tensor`."""
    import gguf  # noqa: PLC0415

    ggml_type = _ggml_types()[dtype]
    return gguf.quants.quantize(array, ggml_type), ggml_type


# ----------------------------------------------------------------------------- tokenizer


def gguf_vocab(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") of a byte-level BPE `tokenizer.json`.

    Special tokens are CONTROL (llama.cpp never produces them from plain text); ids the model
    has beyond the tokenizer's (none, today) get placeholder UNUSED tokens."""
    import gguf  # noqa: PLC0415

    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: GGUF export reads byte-level BPE only")
    by_id: dict[int, tuple[str, int]] = {i: (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        added_type = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], added_type)
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"tokenizer has id {max(by_id)} but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer); byte-level tokens hold no space
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


# ----------------------------------------------------------------------------- file


def write_gguf(
    model: LanguageModel,
    cfg: Config,
    tokenizer_file: Path,
    eod_id: int,
    out_path: Path,
    name: str,
    dtype: str = "f32",
    chat_template: str | None = None,
    end_of_turn_id: int | None = None,
) -> Path:
    """Write `model` and its tokenizer as one GGUF file `out_path` (replaced if there; written
    to a temporary file beside it first, so a failed export leaves nothing half-written).
    `chat_template` and `end_of_turn_id` are given for a tokenizer with chat tokens."""
    import gguf  # noqa: PLC0415

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a folder; give a file name ending in .gguf")
    m = cfg.model
    tensors = gguf_tensors(model)  # refuses what llama.cpp cannot hold, before writing anything
    tokens, types, merges = gguf_vocab(json.loads(Path(tokenizer_file).read_text(encoding="utf-8")), m.vocab_size)
    arch = "gpt2" if m.arch == "gpt2" else "llama"
    with atomic_output(out_path) as tmp:  # umask's mode; nothing half-written is ever left
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_file_type(_file_types()[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(m.max_seq_len)
        writer.add_embedding_length(m.dim)
        writer.add_block_count(m.n_layers)
        writer.add_head_count(m.n_heads)
        if arch == "llama":
            writer.add_feed_forward_length(swiglu_hidden_dim(m.dim, m.ffn_hidden, m.multiple_of))
            writer.add_head_count_kv(m.n_kv_heads or m.n_heads)
            writer.add_layer_norm_rms_eps(m.norm_eps)
            writer.add_rope_dimension_count(m.dim // m.n_heads)
            writer.add_rope_freq_base(m.rope_theta)
            writer.add_vocab_size(m.vocab_size)
        else:
            writer.add_feed_forward_length(m.ffn_hidden or 4 * m.dim)
            writer.add_layer_norm_eps(m.norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(eod_id)
        writer.add_eos_token_id(eod_id)
        writer.add_pad_token_id(eod_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        if end_of_turn_id is not None:  # llama.cpp ends a generation there
            writer.add_eot_token_id(end_of_turn_id)
        for tensor_name, array in tensors.items():
            data, ggml_type = encode_tensor(array, tensor_type(array, dtype))
            writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def check_gguf_out(out_path: Path, model_path: Path, force: bool = False) -> None:
    """Refuse an `--out` that `simone export --format gguf` must not write (ExportError, one
    line): a folder, a name not ending in .gguf, a symlink, the model being exported, or an
    existing file without `force`."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a folder; give a file name ending in .gguf")
    if out_path.suffix.lower() != ".gguf":
        raise ExportError(f"{out_path}: not a .gguf name; give a file name ending in .gguf")
    # The file is written beside and renamed over the name: over a symlink that replaces the
    # link and leaves the file it points to as it was, which is never what the user meant.
    # Refused rather than followed: following it would write wherever the link leads.
    if out_path.is_symlink():
        raise ExportError(
            f"{out_path}: is a symlink; writing would replace the link, not its target: "
            f"give the target's own path, or remove the link"
        )
    refuse_writing_over_the_input(out_path, model_path)
    if out_path.exists() and not force:
        raise ExportError(f"{out_path}: already exists; pass --force to replace it, or choose another name")


def export_gguf(
    model_path: Path, out_path: Path, dtype: str = "f32", name: str | None = None, force: bool = False
) -> Path:
    """`simone export --format gguf`: the model at `model_path` (run dir, checkpoint dir or
    .tar.gz) as one GGUF file `out_path`, matrices in `dtype` (f32, f16, bf16 or q8_0). An
    existing `out_path` is replaced only with `force`; see `check_gguf_out`."""
    check_gguf_out(Path(out_path), Path(model_path), force)  # before the model is read: fail fast
    loaded = load_model(Path(model_path), device="cpu")
    tok = loaded.tokenizer
    name = name or Path(model_path).resolve().name.removesuffix(".tar.gz")
    chat, eot = (CHAT_TEMPLATE, tok.chat_ids[END_OF_TURN]) if tok.has_chat_tokens else (None, None)
    return write_gguf(
        loaded.model, loaded.config, loaded.files["tokenizer"], tok.eod_id, out_path, name, dtype, chat, eot
    )


# ----------------------------------------------------------------------------- running it in llama.cpp
# Optional: these need llama-cpp-python (`pip install llama-cpp-python`, which builds llama.cpp).


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def gguf_document_start(path: Path) -> tuple[int, int | None]:
    """(context length, document-start id) from a GGUF file's metadata: the start id is the
    bos token (ours: end-of-document, as in training), else eos, else None."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    context = value(f"{arch}.context_length")
    if not arch or not context:
        raise ValueError(f"no {arch or 'general.architecture'}.context_length in its metadata")
    start = value("tokenizer.ggml.bos_token_id")
    return int(context), int(start) if start is not None else value("tokenizer.ggml.eos_token_id")


def gguf_vocab_size(path: Path) -> int:
    """The number of tokens in a GGUF file's vocabulary (`tokenizer.ggml.tokens`)."""
    import gguf  # noqa: PLC0415

    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens")
    if field is None:
        raise ValueError("no tokenizer.ggml.tokens in its metadata")
    return len(field.data)  # one entry per array element


def open_in_llama_cpp(
    path: Path, n_ctx: int, logits_all: bool = False, threads: int | None = None, gpu: bool = False
) -> Any:
    """A `llama_cpp.Llama` over the GGUF file (quiet; `gpu` offloads every layer when llama.cpp
    was built with a GPU backend)."""
    from llama_cpp import Llama  # noqa: PLC0415

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=logits_all,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=-1 if gpu else 0,
        verbose=False,
    )


def llama_cpp_greedy(llm: Any, prompt_ids: list[int], n_new: int) -> list[int]:
    """`n_new` greedy tokens after `prompt_ids` (argmax of llama.cpp's own logits each step,
    the prompt evaluated afresh: no reuse of an earlier call's cache)."""
    import llama_cpp  # noqa: PLC0415

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(n_new):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        if len(out) < n_new:
            llm.eval(out[-1:])
    return out


def llama_cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for every position of `ids` (needs logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
