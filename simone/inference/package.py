"""Pack a trained run into `models_for_download/NAME.tar.gz`.

The package is self-contained and safe to load: `model.safetensors`, `config.json`,
`tokenizer.json`, `chat_template.jinja` (a tokenizer with chat tokens; simone/data/chat_template.py),
`training_summary.json`, a model card `README.md`, `hf/` (the same model as
a Hugging Face folder, `simone export --format hf`; absent for a model with memory slots),
`validation.jsonl` (up to 128 KiB of the run's held-out text, on which a run continued from the
package measures what it forgot), and `MANIFEST.json` with the sha256 and size of every other
file (the checkpoint manifest format; the template, the validation text and `hf/`, which simone's
loader leaves out, under keys of their own).
Packaging only reads the run directory; an existing package is never replaced. `simone generate --model NAME.tar.gz` and
`simone validate --model NAME.tar.gz` read it directly.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import math
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from simone.checkpoint import CheckpointError, resolve_checkpoint, verify_checkpoint
from simone.data.chat_template import CHAT_TEMPLATE_FILE
from simone.data.shards import TokenShard
from simone.data.tokenizer import Tokenizer, load_tokenizer
from simone.devices import cpu_model
from simone.errors import SimoneError
from simone.inference.chat_eval import chat_eval_markdown
from simone.inference.export import ExportError
from simone.inference.hf_folder import export_hf
from simone.inference.load import ModelLoadError
from simone.inference.validation_report import FORGETTING_FILE, forgetting_markdown
from simone.progress import Say, quiet
from simone.rundir import RunDir, atomic_write_json, fsync_dir, read_json, sha256_file

VALIDATION_SAMPLE = "validation.jsonl"  # {"domain", "text"} a line: the run's held-out text, capped
VALIDATION_SAMPLE_BYTES = 1 << 17


class PackageError(SimoneError, RuntimeError):
    """A package that cannot be written."""


def validation_sample(data_dir: Path, tokenizer: Tokenizer, max_bytes: int = VALIDATION_SAMPLE_BYTES) -> list[dict]:
    """About `max_bytes` of a run's validation text, shared evenly between its domains: each
    domain's first validation documents, read back from the token shard (exact: the tokenizer is
    lossless), the last one cut. A package carries it (`validation.jsonl`) and a continued run
    measures forgetting on it (workflows/continued.py)."""
    shard = TokenShard(data_dir, "val")
    domains = shard.info.get("domains", {})
    docs = []
    for domain, info in sorted(domains.items()):
        start, end = int(info["start"]), int(info["end"])
        bytes_per_token = max(1.0, info.get("n_bytes", 0) / max(1, info.get("n_tokens", 1)))
        ids = np.asarray(shard.tokens[start : min(end, start + int(max_bytes / len(domains) / bytes_per_token))])
        for piece in np.split(ids, np.flatnonzero(ids == shard.eod_id)):
            text = tokenizer.decode(int(t) for t in piece if t != shard.eod_id).rstrip("\ufffd")  # a cut character
            if text:
                docs.append({"domain": domain, "text": text})
    return docs


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a half-written last line
    return rows


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "tokenizers", "safetensors", "numpy", "simone-mvlm"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


def training_summary(run: RunDir, checkpoint: Path) -> dict[str, Any]:
    """What a user wants to know about how this model was made, from the run's own files."""
    cfg = read_json(run.config, {})
    status = run.read_status()
    rows = _read_metrics(run.metrics)
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("val_loss") is not None]
    trains = [r for r in rows if r.get("kind") == "train"]
    index = read_json(run.data / "index.json", {}) or {}
    splits = index.get("splits", {})
    losses = [r["val_loss"] for r in evals if isinstance(r["val_loss"], (int, float)) and math.isfinite(r["val_loss"])]
    report = read_json(run.validation / "report.json", {}) or {}
    tps = [r["tokens_per_s"] for r in trains if r.get("tokens_per_s")]
    parent = (cfg.get("train") or {}).get("parent")  # a continued run: its parent and what it forgot
    continued = {"parent": {k: parent.get(k) for k in ("name", "sha256")}} if parent else {}
    if parent:
        continued["forgetting"] = read_json(run.validation / FORGETTING_FILE, None)
    return {
        "schema": 1,
        "name": run.root.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg,
        "checkpoint": checkpoint.name,
        "data": {
            "train_tokens": splits.get("train", {}).get("n_tokens"),
            "val_tokens": splits.get("val", {}).get("n_tokens"),
            "train_docs": splits.get("train", {}).get("n_docs"),
            "val_docs": splits.get("val", {}).get("n_docs"),
            "domains": sorted(splits.get("train", {}).get("domains", {}).keys()),
            "corpus": cfg.get("data", {}).get("data_dir") or "embedded default corpus",
        },
        "training": {
            "steps": max((r.get("step", 0) for r in trains), default=0),
            "epochs": max((r.get("epoch", 0) for r in rows if r.get("kind") in ("train", "eval")), default=0),
            "tokens_seen": trains[-1].get("tokens_seen") if trains else None,
            "best_val_loss": min(losses) if losses else None,
            "final_val_loss": losses[-1] if losses else None,
            "final_val_bpb": evals[-1].get("val_bpb") if evals else None,
            "final_train_loss": trains[-1].get("loss") if trains else None,
            "tokens_per_s": (sorted(tps)[len(tps) // 2] if tps else None),
            "mfu": trains[-1].get("mfu") if trains else None,
            "seconds": (status.get("heartbeat", 0) - status.get("started", 0)) if status.get("started") else None,
            "stop_reason": status.get("stop_reason"),
            "schedule_progress": status.get("schedule_progress"),  # 1.0: the learning rate reached its floor
        },
        "validation": {
            k: report.get(k) for k in ("ok", "val_loss", "val_ppl", "val_bpb", "params", "chat_eval") if k in report
        },
        **continued,
        "hardware": _hardware(),
        "versions": _versions(),
    }


def _stop_row(training: dict[str, Any]) -> list[str]:
    """The card's row on why training stopped and how far the learning-rate schedule got."""
    reason, progress = training.get("stop_reason"), training.get("schedule_progress")
    if not reason:
        return []
    done = "" if progress is None else f", learning-rate schedule {math.floor(progress * 1e3 + 1e-6) / 10:g}% done"
    return [f"| training stopped by | {reason}{done} |"]


def _lineage(summary: dict[str, Any]) -> tuple[str, list[str]]:
    """How the model began (from scratch, or continued from a parent) and the card's forgetting section."""
    parent, forgetting = summary.get("parent"), summary.get("forgetting")
    if not parent:
        return "trained from scratch", []
    began = f"continued from `{parent['name']}` (sha256 `{parent['sha256'][:16]}…`)"
    if not forgetting:
        return began, []
    return began, [
        "## Forgetting",
        "",
        "Bits per byte (lower is better) of the parent and of this model:",
        "",
        *forgetting_markdown(forgetting),
        "",
    ]


def model_card(summary: dict[str, Any], chat: bool = False) -> str:
    cfg = summary["config"]
    m = cfg.get("model", {})
    t = summary["training"]
    arch = "Llama-style (RoPE, SwiGLU, RMSNorm)" if m.get("arch") == "llama" else "GPT-2-style baseline"
    began, forgetting = _lineage(summary)
    lines = [
        f"# {summary['name']}",
        "",
        f"A small language model {began} with SIM-ONE MVLM.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch} |",
        f"| layers × width × heads | {m.get('n_layers')} × {m.get('dim')} × {m.get('n_heads')} |",
        f"| context length | {m.get('max_seq_len')} |",
        f"| vocabulary | {m.get('vocab_size')} (byte-level BPE) |",
        f"| corpus | {summary['data']['corpus']} |",
        f"| domains | {', '.join(summary['data']['domains'])} |",
        f"| training tokens | {summary['data']['train_tokens']} |",
        f"| steps / epochs | {t['steps']} / {t['epochs']} |",
        f"| best validation loss | {t['best_val_loss']} |",
        f"| final validation bits per byte | {t['final_val_bpb']} |",
        *_stop_row(t),
        "",
        "## Use",
        "```",
        "simone generate --model THIS.tar.gz --prompt 'In the beginning' --max-tokens 100",
        "```",
        "",
        'In `transformers`, without simone: `AutoModelForCausalLM.from_pretrained("hf")` and',
        '`AutoTokenizer.from_pretrained("hf")` on the `hf/` folder of this package.',
        "",
        "Files: `model.safetensors` (weights), `config.json` (full SIM-ONE config), `tokenizer.json`",
        "(Hugging Face tokenizers), `training_summary.json`, `hf/` (Hugging Face folder),",
        "`MANIFEST.json` (sha256 of every file), `validation.jsonl` (unless `data.package_validation_text`",
        "was false: some held-out text, on which a run continued with `--init-from` measures forgetting).",
        *(["`chat_template.jinja` (the chat format, Jinja; also in `hf/` and a GGUF export)."] if chat else []),
        "",
        *forgetting,
        *chat_eval_markdown(summary.get("validation", {}).get("chat_eval")),
        "## Limits",
        "A small model trained on a small corpus: it imitates the style of its training text and",
        "states no reliable facts. Do not use it for anything that needs to be true.",
        "",
    ]
    return "\n".join(lines)


def _write_hf_folder(checkpoint: Path, out_dir: Path, name: str, say: Say) -> None:
    """The package's `hf/` folder; a model that transformers cannot hold is packaged without
    one (said to `say`)."""
    try:
        export_hf(checkpoint, out_dir, name=name)
    except ExportError as e:
        say(f"package: no hf/ folder: {e}")


def _write_validation_sample(run: RunDir, path: Path, say: Say) -> None:
    """The package's `validation.jsonl`; a run without readable validation shards is packaged without one."""
    try:
        sample = validation_sample(run.data, load_tokenizer(run.tokenizer))
    except (OSError, ValueError, KeyError) as e:
        say(f"package: no {VALIDATION_SAMPLE}: {e}")
        return
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in sample), encoding="utf-8")


def _file_entries(stage: Path, paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """MANIFEST entries (sha256, size) of the regular files among `paths`, named relative to `stage`."""
    return {
        p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in paths
        if p.is_file()
    }


def _readable_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Store files 0644 and folders 0755 whatever the packing account's umask or a writer's
    0600: a package is opened on other machines, often by a service account."""
    member.mode = 0o755 if member.isdir() else 0o644
    return member


def package_run(
    run: RunDir, out_dir: Path, checkpoint: str = "best", name: str | None = None, say: Say = quiet
) -> Path:
    """Write `out_dir/NAME.tar.gz` from the run's best (else latest) checkpoint; return its path.

    NAME says which model it is: `simone-PRESET-ARCH-RUN-stepN-WEIGHTSHA8` unless given. An
    existing package is never replaced: a name already taken gets a `-2`, `-3`... suffix.
    Nothing is written into the run directory (it may be read-only). `out_dir/NAME.training_summary.json`
    is written beside the tarball (the original layout kept the summary beside the models), and
    the same summary is inside it, with an `hf/` folder that transformers opens (a model it
    cannot hold goes without one, and `say` hears why).
    """
    try:
        ckpt = resolve_checkpoint(run.root, (checkpoint, "latest"))
    except CheckpointError:
        raise ModelLoadError(f"{run.checkpoints}: no verified checkpoint to package") from None
    ckpt_manifest = verify_checkpoint(ckpt)
    cfg = read_json(run.config, {})
    weights_sha = ckpt_manifest["files"]["model.safetensors"]["sha256"]
    name = name or (
        f"simone-{cfg.get('preset', 'custom')}-{cfg.get('model', {}).get('arch', 'llama')}-{run.root.name}"
        f"-step{ckpt_manifest.get('step', 'x')}-{str(weights_sha)[:8]}"
    )
    summary = training_summary(run, ckpt)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".pkg-") as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        shutil.copy2(ckpt / "model.safetensors", stage / "model.safetensors")
        ckpt_cfg = ckpt / "config.json"
        shutil.copy2(ckpt_cfg if ckpt_cfg.exists() else run.config, stage / "config.json")
        shutil.copy2(run.tokenizer, stage / "tokenizer.json")
        chat = run.chat_template.is_file()
        if chat:
            shutil.copy2(run.chat_template, stage / CHAT_TEMPLATE_FILE)
        (stage / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if cfg.get("data", {}).get("package_validation_text", True):
            _write_validation_sample(run, stage / VALIDATION_SAMPLE, say)
        (stage / "README.md").write_text(model_card(summary, chat))
        _write_hf_folder(ckpt, stage / "hf", name, say)
        # `files`: the checkpoint manifest format (plain names, what simone loads); `hf_files`:
        # the hf/ copy, which simone never extracts (`verify_hf_folder` checks an unpacked one)
        manifest = {
            "schema": 1,
            "step": ckpt_manifest.get("step"),
            "tokenizer_sha256": sha256_file(stage / "tokenizer.json"),
            "files": _file_entries(
                stage, (p for p in sorted(stage.iterdir()) if p.name not in (CHAT_TEMPLATE_FILE, VALIDATION_SAMPLE))
            ),
            # simone's loader does not extract these, so they are not among `files` (all checked on load)
            "chat_files": _file_entries(stage, [stage / CHAT_TEMPLATE_FILE]),
            "validation_files": _file_entries(stage, [stage / VALIDATION_SAMPLE]),
            "hf_files": _file_entries(stage, sorted((stage / "hf").rglob("*"))),
        }
        (stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp_tar = Path(tmp) / f"{name}.tar.gz"
        with tarfile.open(tmp_tar, "w:gz") as tar:
            tar.add(stage, arcname=name, filter=_readable_member)
        with open(tmp_tar, "rb") as f:
            os.fsync(f.fileno())
        final = _place_without_replacing(tmp_tar, out_dir, name)
    atomic_write_json(out_dir / (final.name[: -len(".tar.gz")] + ".training_summary.json"), summary)
    return final


def _place_without_replacing(tmp_tar: Path, out_dir: Path, name: str) -> Path:
    """Hard-link `tmp_tar` as `out_dir/NAME.tar.gz`, or NAME-2, -3... if taken (a link never
    replaces an existing file, so two packagers racing cannot overwrite each other)."""
    for n in range(1, 1000):
        final = out_dir / (f"{name}.tar.gz" if n == 1 else f"{name}-{n}.tar.gz")
        try:
            os.link(tmp_tar, final)
        except FileExistsError:
            continue
        fsync_dir(out_dir)
        return final
    raise PackageError(f"{out_dir}: {name}.tar.gz and 998 numbered copies exist already; remove some")


def verify_hf_folder(package_dir: Path) -> dict[str, Any]:
    """Check an unpacked package's hf/ folder against its MANIFEST.json (`hf_files`); return
    the manifest. Raises PackageError naming the first file that is missing or differs."""
    package_dir = Path(package_dir)
    manifest = read_json(package_dir / "MANIFEST.json", None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("hf_files"), dict):
        raise PackageError(f"{package_dir / 'MANIFEST.json'}: no hf_files list (a package from before hf/ folders?)")
    for rel, entry in manifest["hf_files"].items():
        path = package_dir / rel
        if not rel.startswith("hf/") or ".." in Path(rel).parts or not path.is_file() or path.is_symlink():
            raise PackageError(f"{path}: missing or not a regular file of the package's hf/ folder")
        if not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            raise PackageError(f"{path}: sha256 does not match MANIFEST.json (hf_files[{rel!r}])")
    return manifest
