"""`simone eval`: bits per byte of any models on any folder of text, overall and per domain.

    bpb = (total negative log-likelihood of the text, in bits) / (total UTF-8 bytes of the text)

Each model reads the text with its own tokenizer, so the number does not depend on the
tokenizer and compares any models on the same text. Every file is one document: the model
starts from its document-start token (for `simone` models and their Hugging Face exports,
the end-of-document token, as in training) and predicts every token of the text. A text
longer than the model's context is read in sliding windows: each window holds `context`
tokens and scores only the tokens that the previous one did not, so every token is scored
once with at least half a context before it.

Models: a `simone` run dir, checkpoint dir or `.tar.gz` package; `hf:DIR` (a folder that
`transformers` opens, e.g. from `simone export --format hf`); a `.gguf` file (or `gguf:FILE`,
e.g. from `simone export --format gguf`), run by llama.cpp (needs llama-cpp-python).
Each kind is a `Scorer`: something that turns a text into ids and ids into bits. The
loaders are in `SCORER_LOADERS`, keyed by the prefix.

Data: `DIR/DOMAIN/SUB/*.txt` (the corpus layout; the domain is the first folder) or a flat
`DIR/*.txt` (one domain, named after DIR).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from simone.errors import SimoneError

SCHEMA = 1
# Windows longer than this are not read at once: a Hugging Face model may declare a context of
# 128k tokens, whose logits alone would not fit in memory. Our models' contexts are far below.
MAX_WINDOW = 4096


class EvalError(SimoneError, ValueError):
    """A model or the data cannot be evaluated (the message names the path and the problem)."""


# ----------------------------------------------------------------------------- data


@dataclass
class TextFile:
    domain: str
    path: Path
    text: str

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def read_text_folder(data_dir: Path) -> list[TextFile]:
    """Every non-empty `*.txt` under `data_dir`, sorted, with its domain (first folder under
    `data_dir`, or `data_dir`'s own name for files directly in it)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"{data_dir}: no such folder (give --data a folder of .txt files)")
    files = []
    for path in sorted(data_dir.rglob("*.txt")):
        rel = path.relative_to(data_dir)
        domain = rel.parts[0] if len(rel.parts) > 1 else data_dir.resolve().name
        try:
            text = path.read_bytes().decode("utf-8")  # exact: no newline translation
        except UnicodeDecodeError as e:
            raise EvalError(f"{path}: not UTF-8 at byte {e.start}") from None
        if text:
            files.append(TextFile(domain, path, text))
    if not files:
        raise EvalError(f"{data_dir}: no non-empty .txt files (expected DOMAIN/SUB/*.txt or *.txt)")
    return files


# ----------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """One model, ready to score text. `document_ids(text)` gives the ids the model reads
    (a document-start id first, when the model has one: without one, the first token is
    never predicted and costs nothing); `nll_bits(ids)` the summed -log2 p(ids[t] | ids[:t])
    over t >= 1."""

    label: str
    kind: str

    def document_ids(self, text: str) -> list[int]: ...

    def nll_bits(self, ids: list[int]) -> float: ...


def sliding_windows(n_ids: int, context: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, n_scored) over ids[0:n_ids]: the model reads ids[start:end-1] (at
    most `context` tokens) and only its last n_scored predictions (of ids[end-n_scored:end])
    count. Together they score ids[1:] exactly once; after the first window each scored
    token has at least context - context // 2 tokens before it."""
    stride = max(1, context // 2)
    windows, scored = [], 1
    while scored < n_ids:
        end = min(n_ids, scored + (context if scored == 1 else stride))
        start = max(0, end - 1 - context)
        windows.append((start, end, end - scored))
        scored = end
    return windows


class TorchScorer:
    """A scorer over a PyTorch model: `logits_fn(x [B, T]) -> [B, T, V]`, `context` tokens."""

    def __init__(self, label: str, kind: str, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                 encode: Callable[[str], list[int]], start_id: int | None, context: int,
                 device: torch.device, batch_size: int = 8):
        self.label, self.kind = label, kind
        self.logits_fn, self.encode, self.start_id = logits_fn, encode, start_id
        self.context, self.device, self.batch_size = context, device, batch_size

    def document_ids(self, text: str) -> list[int]:
        return ([self.start_id] if self.start_id is not None else []) + self.encode(text)

    @torch.no_grad()
    def nll_bits(self, ids: list[int]) -> float:
        windows = sliding_windows(len(ids), self.context)
        all_ids = torch.tensor(ids, dtype=torch.long)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on device: one sync
        # windows of the same length run as one batch (all but the first and last, usually)
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for w in windows:
            by_length.setdefault(w[1] - 1 - w[0], []).append(w)
        for group in by_length.values():
            for i in range(0, len(group), self.batch_size):
                batch = group[i : i + self.batch_size]
                x = torch.stack([all_ids[s : e - 1] for s, e, _ in batch]).to(self.device)
                y = torch.stack([all_ids[s + 1 : e] for s, e, _ in batch]).to(self.device)
                logp = self.logits_fn(x).float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
                for row, (_, _, n_scored) in enumerate(batch):
                    total -= logp[row, -n_scored:].double().sum()
        return total.item() / math.log(2)


def load_simone_scorer(spec: str, device: str) -> Scorer:
    from simone.inference.generate import load_model

    loaded = load_model(Path(spec), device=device)
    model, tok = loaded.model, loaded.tokenizer
    return TorchScorer(spec, "simone", lambda x: model(x)[0], tok.encode, tok.eod_id,
                       loaded.config.model.max_seq_len, loaded.device)


def load_hf_scorer(spec: str, device: str) -> Scorer:
    """`hf:DIR`: a Hugging Face causal LM folder, through `transformers`."""
    folder = Path(spec.removeprefix("hf:"))
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise EvalError(f"{spec}: needs the transformers package (pip install transformers)") from None
    hf_logging.disable_progress_bar()  # the table is the output
    from simone.devices import pick_device

    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"{folder}: transformers cannot open it ({first_line})") from None
    cfg = model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not context:
        raise EvalError(f"{folder}/config.json: no context length (max_position_embeddings)")
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(text: str) -> list[int]:
        # the text is text: special-token strings in it are not control ids (as `simone` reads it)
        return tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False).input_ids

    def logits(x: torch.Tensor) -> torch.Tensor:  # windows are never padded: attend to every id
        return model(x, attention_mask=torch.ones_like(x)).logits

    return TorchScorer(spec, "hf", logits, encode, start_id, min(int(context), MAX_WINDOW), dev)


class LlamaCppScorer:
    """A scorer over a GGUF file run by llama.cpp: its own tokenizer (the file's vocabulary,
    merges and pre-tokenizer), its own logits. Windows as `TorchScorer`, one at a time."""

    def __init__(self, label: str, llm: Any, start_id: int | None, context: int):
        self.label, self.kind = label, "gguf"
        self.llm, self.start_id, self.context = llm, start_id, context

    def document_ids(self, text: str) -> list[int]:
        # the text is text: special-token strings in it are not control ids (special=False)
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return ([self.start_id] if self.start_id is not None else []) + ids

    def nll_bits(self, ids: list[int]) -> float:
        from simone.inference.gguf_file import llama_cpp_logits

        total = 0.0
        for start, end, n_scored in sliding_windows(len(ids), self.context):
            logits = torch.from_numpy(llama_cpp_logits(self.llm, ids[start : end - 1])).double()
            y = torch.tensor(ids[start + 1 : end])
            logp = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            total -= logp[-n_scored:].sum().item()
        return total / math.log(2)


def load_gguf_scorer(spec: str, device: str) -> Scorer:
    """`FILE.gguf` / `gguf:FILE`: a GGUF file (e.g. from `simone export --format gguf`), run by
    llama.cpp through llama-cpp-python, on the CPU (or its build's GPU backend)."""
    path = Path(spec.removeprefix("gguf:"))
    if not path.is_file():
        raise EvalError(f"{path}: no such GGUF file")
    from simone.inference.gguf_file import gguf_document_start, llama_cpp_available, open_in_llama_cpp

    if not llama_cpp_available():
        raise EvalError(f"{path}: scoring a GGUF file needs llama-cpp-python "
                        f"(pip install llama-cpp-python)")
    try:
        context, start_id = gguf_document_start(path)
        llm = open_in_llama_cpp(path, min(context, MAX_WINDOW), logits_all=True,
                                gpu=device != "cpu" and torch.cuda.is_available())
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # the gguf reader on a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"{path}: not a GGUF file that llama-cpp-python can open ({first_line})") from None
    return LlamaCppScorer(spec, llm, start_id, min(context, MAX_WINDOW))


SCORER_LOADERS: dict[str, Callable[[str, str], Scorer]] = {
    "hf": load_hf_scorer, "gguf": load_gguf_scorer, "simone": load_simone_scorer}


def model_kind(spec: str) -> str:
    """Which loader reads `spec`: "hf" (hf:DIR), "gguf" (gguf:FILE or *.gguf) or "simone"."""
    if spec.startswith("hf:"):
        return "hf"
    if spec.startswith("gguf:") or spec.endswith(".gguf"):
        return "gguf"
    return "simone"


def load_scorer(spec: str, device: str = "auto") -> Scorer:
    return SCORER_LOADERS[model_kind(spec)](spec, device)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class DomainScore:
    bits: float = 0.0
    bytes: int = 0
    tokens: int = 0
    files: int = 0

    @property
    def bpb(self) -> float:
        return self.bits / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"bpb": self.bpb, "bits": self.bits, "bytes": self.bytes, "tokens": self.tokens,
                "files": self.files}


@dataclass
class ModelScore:
    model: str
    kind: str
    per_domain: dict[str, DomainScore] = field(default_factory=dict)

    @property
    def overall(self) -> DomainScore:
        total = DomainScore()
        for d in self.per_domain.values():
            total.bits += d.bits
            total.bytes += d.bytes
            total.tokens += d.tokens
            total.files += d.files
        return total


def score_model(scorer: Scorer, files: list[TextFile]) -> ModelScore:
    """Bits and bytes of every file under `scorer`, summed per domain."""
    result = ModelScore(scorer.label, scorer.kind)
    for f in files:
        ids = scorer.document_ids(f.text)
        d = result.per_domain.setdefault(f.domain, DomainScore())
        d.bits += scorer.nll_bits(ids)
        d.bytes += f.n_bytes
        d.tokens += len(ids) - 1
        d.files += 1
    return result


def evaluate_models(model_specs: list[str], data_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Score each model on the text folder; return the JSON-ready result
    {schema, data, domains: {D: {files, bytes}}, models: [{model, kind, bpb, bits, bytes,
    tokens, per_domain: {D: {bpb, bits, bytes, tokens, files}}}]}.

    Every model is loaded before any is scored, so a bad path fails at once."""
    files = read_text_folder(data_dir)
    scorers = [load_scorer(spec, device) for spec in model_specs]
    domains: dict[str, dict[str, int]] = {}
    for f in files:
        d = domains.setdefault(f.domain, {"files": 0, "bytes": 0})
        d["files"] += 1
        d["bytes"] += f.n_bytes
    models = []
    for scorer in scorers:
        score = score_model(scorer, files)
        models.append({"model": score.model, "kind": score.kind, **score.overall.to_dict(),
                       "per_domain": {d: s.to_dict() for d, s in sorted(score.per_domain.items())}})
    return {"schema": SCHEMA, "data": str(data_dir), "domains": dict(sorted(domains.items())),
            "models": models}


def format_table(result: dict[str, Any]) -> str:
    """One row per domain and one `overall` row; one bpb column per model."""
    labels = [m["model"] for m in result["models"]]
    width = max([len("overall"), *(len(d) for d in result["domains"])])
    cols = [max(len(label), 8) for label in labels]
    lines = [f"bits per byte on {result['data']} (lower is better)",
             f"{'domain':<{width}}  {'bytes':>10}  " + "  ".join(f"{l:>{c}}" for l, c in zip(labels, cols))]

    def row(name: str, n_bytes: int, values: list[float]) -> str:
        return (f"{name:<{width}}  {n_bytes:>10,}  "
                + "  ".join(f"{v:>{c}.4f}" for v, c in zip(values, cols)))

    for domain, info in result["domains"].items():
        lines.append(row(domain, info["bytes"], [m["per_domain"][domain]["bpb"] for m in result["models"]]))
    total_bytes = sum(info["bytes"] for info in result["domains"].values())
    lines.append(row("overall", total_bytes, [m["bpb"] for m in result["models"]]))
    return "\n".join(lines)


def eval_cli(model_specs: list[str], data_dir: Path, json_path: Path | None = None,
             device: str = "auto") -> int:
    """`simone eval`: print the table; with `json_path`, also write the result there."""
    result = evaluate_models(model_specs, data_dir, device)
    print(format_table(result))
    if json_path is not None:
        from simone.rundir import atomic_write_json

        atomic_write_json(Path(json_path), result)
        print(f"[json: {json_path}]", file=sys.stderr)
    return 0

