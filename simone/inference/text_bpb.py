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
`DIR/*.txt` (one domain, named after DIR), walked and read by curation's rules
(`simone.data.corpus`): regular files inside DIR only, each at most `MAX_FILE_BYTES`; every
file left out gets a line of its own under the table (and in the JSON's `skipped`).

Memory: the logits of a window are window × vocabulary floats. Scoring holds at most
`LOGITS_BUDGET_BYTES` of them at once (fewer windows a pass; shorter windows for a model
whose one window would not fit) and takes the log-softmax a few positions at a time. The
window each model was read with is in the JSON (`window`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from simone.config import CurateConfig
from simone.data.corpus import SIDECAR_SUFFIX, CorpusError, UnsafeFile, discover_files, read_regular_file
from simone.devices import pick_device
from simone.errors import SimoneError
from simone.inference.gguf_file import (
    gguf_document_start,
    gguf_vocab_size,
    llama_cpp_available,
    llama_cpp_logits,
    open_in_llama_cpp,
)
from simone.inference.load import LoadedModel, load_model
from simone.rundir import atomic_write_json

SCHEMA = 1
# Windows longer than this are not read at once: a Hugging Face model may declare a context of
# 128k tokens, whose logits alone would not fit in memory. Our models' contexts are far below.
MAX_WINDOW = 4096
# The logits of one pass are windows × window × vocabulary floats: 8 windows of 4096 tokens over
# a 128k vocabulary would be 17 GB of float32, and as much again for their log-softmax. At most
# this many bytes of logits are made at once; the log-softmax is taken LOSS_CHUNK_BYTES at a time.
LOGITS_BUDGET_BYTES = 1 << 30
LOSS_CHUNK_BYTES = 64 << 20
MAX_FILE_BYTES = CurateConfig.max_file_bytes  # curation's limit: a bigger file is skipped, never read


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


def read_text_folder(
    data_dir: Path, max_file_bytes: int = MAX_FILE_BYTES, on_skip: Callable[[str], None] | None = None
) -> list[TextFile]:
    """Every non-empty `*.txt` under `data_dir`, sorted, with its domain (first folder under
    `data_dir`, or `data_dir`'s own name for files directly in it).

    Found and read as curation finds and reads a corpus (`discover_files`,
    `read_regular_file`): regular files inside `data_dir` only, never blocking, at most
    `max_file_bytes` each. What is left out (a FIFO or device, a link leading outside, a
    symlinked or hidden folder, a dot-file, a file over the limit) is passed to `on_skip` as
    one line "REL: why"."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"{data_dir}: no such folder (give --data a folder of .txt files)")
    try:
        entries = discover_files(data_dir)
    except CorpusError as e:
        raise EvalError(str(e)) from None
    skip = on_skip or (lambda line: None)
    files = []
    for entry in entries:
        if entry.rel.endswith(SIDECAR_SUFFIX) or entry.kind in ("ignored", "orphan_sidecar"):
            continue  # not text to score: sidecars and other files are never read here
        if entry.kind != "text":  # "unreadable" or "skipped": never opened
            skip(entry.problem or f"{entry.rel}: not read")
            continue
        try:
            raw = read_regular_file(entry.path, max_file_bytes)
        except UnsafeFile as e:
            skip(f"{entry.rel}: {e.message}")
            continue
        try:
            text = raw.decode("utf-8")  # exact: no newline translation
        except UnicodeDecodeError as e:
            raise EvalError(f"{data_dir / entry.rel}: not UTF-8 at byte {e.start}") from None
        domain = entry.domain if entry.folder_domain else data_dir.resolve().name
        if text:
            files.append(TextFile(domain, data_dir / entry.rel, text))
    if not files:
        raise EvalError(f"{data_dir}: no non-empty .txt files that can be read (expected DOMAIN/SUB/*.txt or *.txt)")
    return files


# ----------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """One model, ready to score text. `document_ids(text)` gives the ids the model reads
    (a document-start id first, when the model has one: without one, the first token is
    never predicted and costs nothing); `nll_bits(ids)` the summed -log2 p(ids[t] | ids[:t])
    over t >= 1."""

    label: str
    kind: str
    context: int  # the window: the most tokens the model reads at once

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


def scoring_window(context: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """The longest window, at most `context`, whose float32 logits fit in `budget_bytes`."""
    return max(1, min(context, budget_bytes // (4 * vocab_size)))


def summed_log_prob(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum over t of log p(targets[t]) under logits[t] ([T, V], [T] -> a float64 scalar). The
    log-softmax is taken in `dtype` over a few positions at a time (at most LOSS_CHUNK_BYTES):
    no copy of all the logits is made. Each position's log-softmax is its own, so the values
    are those of one log-softmax over all of them."""
    positions = max(1, LOSS_CHUNK_BYTES // (logits.shape[-1] * torch.finfo(dtype).bits // 8))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, logits.shape[0], positions):
        logp = logits[i : i + positions].to(dtype).log_softmax(-1)
        total += logp.gather(-1, targets[i : i + positions, None]).double().sum()
    return total


class TorchScorer:
    """A scorer over a PyTorch model: `logits_fn(x [B, T]) -> [B, T, vocab_size]`, read in
    windows of at most `context` tokens, and never more than `logits_budget_bytes` of float32
    logits at once: up to `batch_size` windows a pass, and a shorter window than `context`
    when one window's logits alone would not fit."""

    def __init__(
        self,
        label: str,
        kind: str,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        encode: Callable[[str], list[int]],
        start_id: int | None,
        context: int,
        device: torch.device,
        vocab_size: int,
        batch_size: int = 8,
        logits_budget_bytes: int = LOGITS_BUDGET_BYTES,
    ):
        self.label, self.kind = label, kind
        self.logits_fn, self.encode, self.start_id = logits_fn, encode, start_id
        self.context = scoring_window(context, vocab_size, logits_budget_bytes)
        self.device, self.vocab_size, self.batch_size = device, vocab_size, batch_size
        self.logits_budget_bytes = logits_budget_bytes

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
        for length, group in by_length.items():
            per_pass = self._rows_per_pass(length, most=self.batch_size)
            for i in range(0, len(group), per_pass):
                batch = group[i : i + per_pass]
                x = torch.stack([all_ids[s : e - 1] for s, e, _ in batch]).to(self.device)
                y = torch.stack([all_ids[s + 1 : e] for s, e, _ in batch]).to(self.device)
                logits = self.logits_fn(x)
                for row, (_, _, n_scored) in enumerate(batch):
                    total -= summed_log_prob(logits[row, -n_scored:], y[row, -n_scored:])
                del logits  # before the next pass makes its own
        return total.item() / math.log(2)

    # Greedy decoding, for the consistency suite's cloze and generation tasks
    # (simone.inference.consistency). `decoder` (ids -> text) is set by a loader that has the
    # tokenizer; without one, the scorer scores text but its continuations cannot be read.
    decoder: Callable[[list[int]], str] | None = None

    @torch.no_grad()
    def greedy(self, ids: list[int], n_tokens: int) -> list[int]:
        """The `n_tokens` ids greedy decoding appends to `ids`."""
        return self.greedy_many([ids], n_tokens)[0]

    def _rows_per_pass(self, length: int, most: int = 64) -> int:
        return min(most, max(1, self.logits_budget_bytes // (4 * length * self.vocab_size)))

    @torch.no_grad()
    def nll_bits_many(self, sequences: list[list[int]]) -> list[float]:
        """`nll_bits` of each sequence. Those that fit one window run together, shortest first,
        right-padded: a causal model's logits at a position never see the padding after it."""
        bits = [0.0] * len(sequences)
        one_window = sorted(
            (i for i, s in enumerate(sequences) if 1 < len(s) <= self.context + 1), key=lambda i: len(sequences[i])
        )
        for i in (i for i, s in enumerate(sequences) if len(s) > self.context + 1):
            bits[i] = self.nll_bits(sequences[i])
        start = 0
        while start < len(one_window):
            end = min(len(one_window), start + 64)
            end = start + self._rows_per_pass(len(sequences[one_window[end - 1]]) - 1, most=end - start)
            rows, start = one_window[start:end], end
            width = len(sequences[rows[-1]]) - 1  # the longest of these (shortest first)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            y = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids = torch.tensor(sequences[i], dtype=torch.long)
                n = len(ids) - 1
                x[r, :n], y[r, :n] = ids[:-1], ids[1:]
            logits = self.logits_fn(x.to(self.device))
            for r, i in enumerate(rows):
                n = len(sequences[i]) - 1
                bits[i] = -float(summed_log_prob(logits[r, :n], y[r, :n].to(self.device))) / math.log(2)
            del logits  # before the next pass makes its own
        return bits

    @torch.no_grad()
    def greedy_many(self, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
        """The `n_tokens` ids greedy decoding appends to each prompt. Each step reads each
        sequence's last `context` ids again (no cache: the suite's continuations are a few dozen
        tokens), every sequence in one right-padded batch: a causal model's logits at a
        sequence's last position never see the padding after it."""
        outs = [list(p) for p in prompts]
        for _ in range(n_tokens if outs else 0):
            windows = [o[-self.context :] for o in outs]
            width = max(len(w) for w in windows)
            per_pass = self._rows_per_pass(width)
            for b in range(0, len(outs), per_pass):
                rows = range(b, min(len(outs), b + per_pass))
                x = torch.zeros(len(rows), width, dtype=torch.long)
                last = torch.tensor([len(windows[i]) - 1 for i in rows])
                for r, i in enumerate(rows):
                    x[r, : len(windows[i])] = torch.tensor(windows[i], dtype=torch.long)
                logits = self.logits_fn(x.to(self.device))
                picked = logits[torch.arange(len(rows)), last.to(self.device)].argmax(-1).tolist()
                for i, t in zip(rows, picked):
                    outs[i].append(int(t))
        return [o[len(p) :] for o, p in zip(outs, prompts)]


def simone_scorer(loaded: LoadedModel, label: str) -> TorchScorer:
    """A scorer over a model `load_model` loaded (a `LoadedModel`), named `label`."""
    model, tok = loaded.model, loaded.tokenizer
    scorer = TorchScorer(
        label,
        "simone",
        lambda x: model(x)[0],
        tok.encode,
        tok.eod_id,
        loaded.config.model.max_seq_len,
        loaded.device,
        loaded.config.model.vocab_size,
    )
    scorer.decoder = tok.decode
    return scorer


def load_simone_scorer(spec: str, device: str) -> Scorer:
    return simone_scorer(load_model(Path(spec), device=device), spec)


def load_hf_scorer(spec: str, device: str) -> Scorer:
    """`hf:DIR`: a Hugging Face causal LM folder, through `transformers`."""
    folder = Path(spec.removeprefix("hf:"))
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:  # deferred: transformers is optional and slow to import
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
        from transformers.utils import logging as hf_logging  # noqa: PLC0415
    except ImportError:
        raise EvalError(f"{spec}: needs the transformers package (pip install transformers)") from None
    hf_logging.disable_progress_bar()  # the table is the output

    dev = pick_device(device)
    # A folder's own Python code (auto_map in its config) is refused, never run and never asked
    # about (transformers would prompt); nothing is ever downloaded: hf: names a local folder.
    local_only = {"trust_remote_code": False, "local_files_only": True}
    try:
        # the config first: it is what names custom code, and read on its own it is refused quietly
        # bandit B615 (no revision pinned): local_files_only, so a local folder is read and nothing downloaded
        config = AutoConfig.from_pretrained(folder, **local_only)  # nosec B615
        tok = AutoTokenizer.from_pretrained(folder, config=config, **local_only)  # nosec B615
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, **local_only)  # nosec B615
        model = model.to(dev).eval()  # type: ignore[arg-type]  # transformers' functools.wraps-ed .to() confuses mypy
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise EvalError(
                f"{folder}: needs its own Python code (auto_map in its config); "
                f"simone eval never runs a model folder's code"
            ) from None
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

    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0] if head is not None else cfg.vocab_size
    scorer = TorchScorer(spec, "hf", logits, encode, start_id, min(int(context), MAX_WINDOW), dev, vocab_size)
    scorer.decoder = lambda ids: cast(str, tok.decode(ids))  # one list of ids decodes to one string
    return scorer


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
        total = 0.0
        for start, end, n_scored in sliding_windows(len(ids), self.context):
            logits = torch.from_numpy(llama_cpp_logits(self.llm, ids[start : end - 1]))
            y = torch.tensor(ids[start + 1 : end])
            total -= summed_log_prob(logits[-n_scored:], y[-n_scored:], torch.float64).item()
        return total / math.log(2)

    # Greedy decoding, for the consistency suite (as TorchScorer's)

    def decoder(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def greedy(self, ids: list[int], n_tokens: int) -> list[int]:
        out = list(ids)
        for _ in range(n_tokens):
            out.append(int(llama_cpp_logits(self.llm, out[-self.context :])[-1].argmax()))
        return out[len(ids) :]


def load_gguf_scorer(spec: str, device: str) -> Scorer:
    """`FILE.gguf` / `gguf:FILE`: a GGUF file (e.g. from `simone export --format gguf`), run by
    llama.cpp through llama-cpp-python, on the CPU (or its build's GPU backend)."""
    path = Path(spec.removeprefix("gguf:"))
    if not path.is_file():
        raise EvalError(f"{path}: no such GGUF file")
    if not llama_cpp_available():
        raise EvalError(f"{path}: scoring a GGUF file needs llama-cpp-python (pip install llama-cpp-python)")
    try:
        context, start_id = gguf_document_start(path)
        # llama.cpp keeps the logits of every position of its context: size the context to the budget
        window = scoring_window(min(context, MAX_WINDOW), gguf_vocab_size(path))
        llm = open_in_llama_cpp(path, window, logits_all=True, gpu=device != "cpu" and torch.cuda.is_available())
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # the gguf reader on a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"{path}: not a GGUF file that llama-cpp-python can open ({first_line})") from None
    return LlamaCppScorer(spec, llm, start_id, window)


SCORER_LOADERS: dict[str, Callable[[str, str], Scorer]] = {
    "hf": load_hf_scorer,
    "gguf": load_gguf_scorer,
    "simone": load_simone_scorer,
}


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
        return {"bpb": self.bpb, "bits": self.bits, "bytes": self.bytes, "tokens": self.tokens, "files": self.files}


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
    {schema, data, domains: {D: {files, bytes}}, models: [{model, kind, window, bpb, bits, bytes,
    tokens, per_domain: {D: {bpb, bits, bytes, tokens, files}}}], skipped: [line]}.

    Every model is loaded before any is scored, so a bad path fails at once. `skipped`: one
    line "REL: why" for each file of the folder that was not read (`read_text_folder`)."""
    skipped: list[str] = []
    files = read_text_folder(data_dir, on_skip=skipped.append)
    scorers = [load_scorer(spec, device) for spec in model_specs]
    domains: dict[str, dict[str, int]] = {}
    for f in files:
        d = domains.setdefault(f.domain, {"files": 0, "bytes": 0})
        d["files"] += 1
        d["bytes"] += f.n_bytes
    models = []
    for scorer in scorers:
        score = score_model(scorer, files)
        models.append(
            {
                "model": score.model,
                "kind": score.kind,
                "window": scorer.context,
                **score.overall.to_dict(),
                "per_domain": {d: s.to_dict() for d, s in sorted(score.per_domain.items())},
            }
        )
    return {
        "schema": SCHEMA,
        "data": str(data_dir),
        "domains": dict(sorted(domains.items())),
        "models": models,
        "skipped": skipped,
    }


def format_table(result: dict[str, Any]) -> str:
    """One row per domain and one `overall` row; one bpb column per model."""
    labels = [m["model"] for m in result["models"]]
    width = max([len("overall"), *(len(d) for d in result["domains"])])
    cols = [max(len(label), 8) for label in labels]
    lines = [
        f"bits per byte on {result['data']} (lower is better)",
        f"{'domain':<{width}}  {'bytes':>10}  " + "  ".join(f"{label:>{c}}" for label, c in zip(labels, cols)),
    ]

    def row(name: str, n_bytes: int, values: list[float]) -> str:
        return f"{name:<{width}}  {n_bytes:>10,}  " + "  ".join(f"{v:>{c}.4f}" for v, c in zip(values, cols))

    for domain, info in result["domains"].items():
        lines.append(row(domain, info["bytes"], [m["per_domain"][domain]["bpb"] for m in result["models"]]))
    total_bytes = sum(info["bytes"] for info in result["domains"].values())
    lines.append(row("overall", total_bytes, [m["bpb"] for m in result["models"]]))
    lines += [f"skipped {line}" for line in result.get("skipped", [])]  # the bytes above leave them out
    return "\n".join(lines)


def refuse_symlinked_json(json_path: Path | None) -> None:
    """EvalError when `--json` names a symlink. The file is written beside and renamed over the
    name: over a symlink that replaces the link, not the file it points to. Refused rather
    than followed, which would write wherever the link leads."""
    if json_path is not None and Path(json_path).is_symlink():
        raise EvalError(
            f"{json_path}: is a symlink; writing would replace the link, not its target: "
            f"give the target's own path for --json, or remove the link"
        )


def evaluate_and_save(
    model_specs: list[str], data_dir: Path, json_path: Path | None = None, device: str = "auto"
) -> dict[str, Any]:
    """`simone eval`: `evaluate_models`; with `json_path`, also write the result there."""
    refuse_symlinked_json(json_path)  # before any scoring
    result = evaluate_models(model_specs, data_dir, device)
    if json_path is not None:
        atomic_write_json(Path(json_path), result)
    return result
