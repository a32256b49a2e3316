"""Write a trained model as a Hugging Face folder that `transformers` opens without `simone`.

    DIR/config.json              LlamaForCausalLM or GPT2LMHeadModel (`simone.inference.export.hf_config_dict`)
    DIR/model.safetensors        the weights under Hugging Face names (float32, as trained)
    DIR/tokenizer.json           our byte-level BPE tokenizer, byte for byte
    DIR/tokenizer_config.json    PreTrainedTokenizerFast; bos = eos = pad = the end-of-document token;
                                 `chat_template` when the tokenizer has chat tokens (`apply_chat_template`)
    DIR/generation_config.json   the sampling defaults of `simone generate`
    DIR/README.md                model card with the Hub's YAML metadata header

Nothing here imports `transformers`: the files are plain JSON and safetensors, so `simone
package` can put this folder in every package. The one difference a user may meet: the
Hugging Face tokenizer reads special-token strings in the input (`<|endoftext|>`,
`<|domain:NAME|>`, `<|user|>`) as their single ids, as `Tokenizer.encode(text, allow_special=True)`
does; `simone` itself encodes prompts, and chat messages, as plain text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from simone.config import Config
from simone.data.chat_template import CHAT_TEMPLATE
from simone.inference.export import ExportError, hf_config_dict, refuse_writing_over_the_input, to_hf_state_dict
from simone.inference.load import load_model
from simone.model import LanguageModel

FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
)
# the defaults of `simone generate`, so both sample alike out of the box
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def hf_weights(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, as contiguous CPU tensors that own their
    memory (safetensors refuses shared storage; a tied `lm_head` is left out, and
    `transformers` ties it again on load)."""
    cfg = model.cfg
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight")
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in hf_sd.items()}


def tokenizer_config(eod_token: str, max_len: int, chat_template: str | None = None) -> dict[str, Any]:
    """transformers 4.x and 5.x both read `chat_template` here; the chat tokens themselves are
    special added tokens of tokenizer.json, which AutoTokenizer keeps whole."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_token,
        "eos_token": eod_token,
        "pad_token": eod_token,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,  # decode must give the text back exactly
        **({"chat_template": chat_template} if chat_template else {}),
    }


def generation_config(eod_id: int, max_len: int) -> dict[str, Any]:
    return {
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "max_length": max_len,
        **GENERATION_DEFAULTS,
    }


def hf_model_card(cfg: Config, name: str, domains: list[str], eod_token: str, chat: bool = False) -> str:
    """README.md: Hub metadata header, what the model is, how to open it, what stays behind."""
    m = cfg.model
    hf_class = "GPT2LMHeadModel" if m.arch == "gpt2" else "LlamaForCausalLM"
    arch = "GPT-2-style baseline" if m.arch == "gpt2" else "Llama-style (RoPE, SwiGLU, RMSNorm)"
    tags = ["simone-mvlm", "gpt2" if m.arch == "gpt2" else "llama", "small-language-model"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += [
        "---",
        "",
        f"# {name}",
        "",
        f"A small language model trained from scratch with SIM-ONE MVLM, exported as `{hf_class}`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch} |",
        f"| layers × width × heads | {m.n_layers} × {m.dim} × {m.n_heads} |",
        f"| context length | {m.max_seq_len} |",
        f"| vocabulary | {m.vocab_size} (byte-level BPE) |",
        f"| domains | {', '.join(domains) or 'none'} |",
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        'ids = tok("In the beginning", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=50)[0]))",
        "```",
        "",
        f"`{eod_token}` ends a document (it is the bos, eos and pad token). "
        "Special-token strings in the input become their ids: a prompt that starts with "
        f"`{eod_token}<|domain:NAME|>` steers toward that domain, as `simone generate --domain NAME` does.",
        "",
    ]
    if m.governance:
        lines += [
            "## Governance",
            "",
            "This model was trained with SIM-ONE governance. Only its language model is exported: "
            "the policy head (domain prediction, policy-guided reranking) and the attention trace "
            "run in `simone` only (`simone generate --model PACKAGE --trace …`). "
            "The exported logits are exactly the model's.",
            "",
        ]
    if chat:
        lines += [
            "## Chat",
            "",
            "The tokenizer holds chat tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|endofturn|>`) and "
            "the chat template: `tok.apply_chat_template(messages, add_generation_prompt=True)`. "
            "A model not fine-tuned on conversations has never seen them.",
            "",
        ]
    lines += [
        "## Limits",
        "",
        "A small model trained on a small corpus: it imitates the style of its training text and "
        "states no reliable facts. Do not use it for anything that needs to be true.",
        "",
    ]
    return "\n".join(lines)


def check_out_folder(out_dir: Path, force: bool = False) -> None:
    """Refuse (ExportError, one line) an `out_dir` that is not a folder, or that holds anything
    unless `force`: a user's own config.json or README.md there would be replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; choose a folder name for --out")
    present = sorted(p.name for p in out_dir.iterdir())
    if present and not force:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ExportError(
            f"{out_dir}: not empty ({shown}); choose a new folder, or pass --force "
            f"to replace the export's files there ({', '.join(FILES)})"
        )
    folders = [f for f in FILES if (out_dir / f).is_dir() and not (out_dir / f).is_symlink()]
    if folders:
        raise ExportError(f"{out_dir / folders[0]}: is a folder, where the export writes a file; move it away")


def write_hf_folder(
    model: LanguageModel,
    cfg: Config,
    tokenizer_file: Path,
    eod_token: str,
    eod_id: int,
    domains: list[str],
    out_dir: Path,
    name: str,
    force: bool = False,
    chat_template: str | None = None,
) -> Path:
    """Write the six files of a Hugging Face folder into `out_dir` (created). A folder that
    holds anything is refused unless `force`; then the six files are replaced and anything
    else there is left as it is. `chat_template` (for a tokenizer with chat tokens) goes into
    tokenizer_config.json. Returns `out_dir`."""
    out_dir = Path(out_dir)
    check_out_folder(out_dir, force)
    weights = hf_weights(model)  # refuses what transformers cannot hold, before writing anything
    m = cfg.model
    out_dir.mkdir(parents=True, exist_ok=True)
    # write into a temporary folder beside, then move the files in: no half-written export
    # (beside the real folder, when --out is a link to one: a rename cannot cross file systems)
    with tempfile.TemporaryDirectory(dir=out_dir.resolve().parent, prefix=f".{out_dir.name}-") as tmp:
        stage = Path(tmp)
        save_file(weights, str(stage / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_file, stage / "tokenizer.json")
        for file, content in (
            ("config.json", hf_config_dict(m, eod_id)),
            ("tokenizer_config.json", tokenizer_config(eod_token, m.max_seq_len, chat_template)),
            ("generation_config.json", generation_config(eod_id, m.max_seq_len)),
        ):
            (stage / file).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        (stage / "README.md").write_text(
            hf_model_card(cfg, name, domains, eod_token, chat_template is not None), encoding="utf-8"
        )
        # safetensors writes its file 0600 whatever the umask: give it the mode the umask gave
        # the files beside it, so whoever may read the folder may read the weights
        shutil.copymode(stage / "config.json", stage / "model.safetensors")
        for file in FILES:
            (stage / file).replace(out_dir / file)
    return out_dir


def export_hf(model_path: Path, out_dir: Path, name: str | None = None, force: bool = False) -> Path:
    """`simone export --format hf`: the model at `model_path` (run dir, checkpoint dir or
    .tar.gz) as a Hugging Face folder `out_dir`; `name` titles the model card. A non-empty
    `out_dir` is written into only with `force`, and never when it is or holds the model."""
    out_dir = Path(out_dir)
    refuse_writing_over_the_input(out_dir, Path(model_path))  # before the model is read: fail fast
    check_out_folder(out_dir, force)
    loaded = load_model(Path(model_path), device="cpu")
    tok = loaded.tokenizer
    name = name or Path(model_path).resolve().name.removesuffix(".tar.gz")
    return write_hf_folder(
        loaded.model,
        loaded.config,
        loaded.files["tokenizer"],
        tok.eod_token,
        tok.eod_id,
        tok.domains,
        out_dir,
        name,
        force,
        CHAT_TEMPLATE if tok.has_chat_tokens else None,
    )
