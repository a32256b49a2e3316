"""Continued pretraining (`simone run --init-from PARENT`): a run that starts from a trained model's
weights and tokenizer, on new data, and measures what it forgot.

`parent_config` is the config such a run starts from (the parent's, with a lower learning rate);
`read_parent` loads and checks the parent once, before any work; `prepare_init_from` refuses a
config that would change the parent's model or vocabulary, copies its tokenizer into the run
(the tokenizer stage keeps it) and records the lineage in `train.parent`; the trainer then loads
the parent's weights (train/state.py `start_from_parent`) under a fresh optimizer and schedule.
`measure_forgetting` writes bits per byte of the parent (before) and of the run's model (after)
on the new data's validation text and on the parent's to RUN/validation/forgetting.json, which the
validation report, the model card and the training summary show. Any workflow that starts from
a trained model (a chat fine-tune too) prepares its run with `read_parent` and `prepare_init_from`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from simone.config import PRESETS, Config, ModelConfig, preset
from simone.data.chat_template import CHAT_TEMPLATE
from simone.data.tokenizer import STAMP_FILE, load_tokenizer
from simone.errors import SimoneError
from simone.inference.load import ModelLoadError, load_model
from simone.inference.package import VALIDATION_SAMPLE, validation_sample
from simone.inference.text_bpb import TextFile, score_model, simone_scorer
from simone.inference.validation_report import FORGETTING_FILE, forgetting_line
from simone.progress import Say, quiet
from simone.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from simone.train.state import parent_record

LR_FRACTION = 0.3  # a continued run's default peak learning rate, as a share of its parent's
# model fields a continued run may set: the vocabulary's size and the policy classes follow the
# (same) tokenizer; dropout and the governance loss weights are training settings, not shape
TRAINING_FIELDS = ("dropout", "policy_loss_weight", "coherence_weight", "coherence_distance")
PARENT_VALIDATION = "parent_validation.jsonl"  # RUN/validation/: the parent's held-out text
MAX_VALIDATION_READ = 16 << 20  # a package's validation.jsonl declaring more is not read


class InitFromError(SimoneError, ValueError):
    """The parent cannot be continued as asked (the message names it and what differs)."""


@dataclass
class Parent:
    """A trained model a run starts from, read once."""

    record: dict[str, Any]  # the lineage entry: name, sha256, of, path, its own parent
    config: Config
    tokenizer: bytes  # its tokenizer.json, copied into the run byte for byte
    validation: list[dict] | None  # its held-out text ({"domain", "text"}), where its package or run holds it
    recorded_bpb: float | None  # its validation bits per byte, as its own training measured them

    @property
    def name(self) -> str:
        return self.record["name"]


def read_parent(init_from: str | Path) -> Parent:
    """Load and check the package, run directory or checkpoint `init_from` (ModelLoadError names
    what is wrong) and read what a continued run takes from it."""
    path = Path(init_from).expanduser()
    try:
        loaded = load_model(path, device="cpu")
    except ModelLoadError as e:
        raise InitFromError(f"--init-from: {e}") from e
    with loaded:
        record = parent_record(loaded)
        if loaded.unpacked is not None:
            validation = _package_validation(path, loaded.unpacked / "MANIFEST.json")
            summary = read_json(loaded.files["summary"], {}) if "summary" in loaded.files else {}
            bpb = (summary or {}).get("validation", {}).get("val_bpb")
        else:  # a checkpoint: its run's validation split and report, when it lies in a run
            ckpt = loaded.files["checkpoint"]
            run = RunDir(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None
            has_shards = run is not None and (run.data / "index.json").is_file()
            validation = validation_sample(run.data, loaded.tokenizer) if run and has_shards else None
            bpb = (read_json(run.validation / "report.json", {}) or {}).get("val_bpb") if run else None
        return Parent(record, loaded.config, loaded.files["tokenizer"].read_bytes(), validation, bpb)


def _package_validation(package: Path, manifest_path: Path) -> list[dict] | None:
    """A package's validation.jsonl, checked against its MANIFEST.json (None: a package without one)."""
    entry = ((read_json(manifest_path, {}) or {}).get("validation_files") or {}).get(VALIDATION_SAMPLE)
    if not isinstance(entry, dict) or not 0 <= entry.get("size", -1) <= MAX_VALIDATION_READ:
        return None
    with tarfile.open(package, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if len(parts) == 2 and parts[1] == VALIDATION_SAMPLE and member.isfile() and member.size == entry["size"]:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]  # a regular file: never None
                break
        else:
            return None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise InitFromError(f"{package}: {VALIDATION_SAMPLE} does not match its MANIFEST.json sha256")
    return _jsonl(data.decode("utf-8"))


def parent_config(parent: Parent) -> Config:
    """The config a run continued from `parent` starts from: the parent's own (model, tokenizer,
    training settings: its warmup, now from the start again), its data and curation settings back
    to its preset's (the new data is the run's), and `train.lr` LR_FRACTION of the parent's."""
    cfg = copy.deepcopy(parent.config)
    base = preset(cfg.preset) if cfg.preset in PRESETS else Config()
    cfg.data, cfg.curate = base.data, base.curate
    cfg.train.lr = LR_FRACTION * parent.config.train.lr
    cfg.train.init_from, cfg.train.parent = parent.record["path"], None
    return cfg


def check_fits(cfg: Config, parent: Parent) -> None:
    """Refuse, in one line, a config whose model shape or vocabulary differs from the parent's."""
    theirs = parent.config
    differ = [
        f"model.{f.name}={getattr(cfg.model, f.name)!r} (the parent's: {getattr(theirs.model, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("vocab_size", "n_domains", *TRAINING_FIELDS)
        and getattr(cfg.model, f.name) != getattr(theirs.model, f.name)
    ]
    # the vocabulary is the parent's tokenizer's: a config naming the tokenizer's target size fits too
    if cfg.model.vocab_size not in (theirs.model.vocab_size, theirs.tokenizer.vocab_size):
        differ.append(f"model.vocab_size={cfg.model.vocab_size} (the parent's: {theirs.model.vocab_size})")
    differ += [
        f"tokenizer.{name}={getattr(cfg.tokenizer, name)!r} (the parent's: {getattr(theirs.tokenizer, name)!r})"
        for name in ("vocab_size", "eod_token")
        if getattr(cfg.tokenizer, name) != getattr(theirs.tokenizer, name)
    ]
    if differ:
        raise InitFromError(
            f"--init-from {parent.name}: {'; '.join(differ)}: a continued run keeps its parent's model "
            f"shape and vocabulary (leave model.* and tokenizer.* as they are)"
        )


def prepare_init_from(cfg: Config, parent: Parent, run: RunDir) -> None:
    """Start `run` from `parent` (call it holding the run lock, before curation): refuse a config
    that does not fit (`check_fits`), take over the parent's model and tokenizer sections (the
    training settings of `cfg.model` kept), copy its tokenizer in byte for byte (with its chat
    template where it has chat tokens), keep its validation text and record the lineage in
    `cfg.train` (`init_from`: where its weights are read from; `parent`: its record)."""
    check_fits(cfg, parent)
    training = {name: getattr(cfg.model, name) for name in TRAINING_FIELDS}
    cfg.model, cfg.tokenizer = copy.deepcopy(parent.config.model), copy.deepcopy(parent.config.tokenizer)
    for name, value in training.items():
        setattr(cfg.model, name, value)
    cfg.train.init_from, cfg.train.parent = parent.record["path"], parent.record
    run.make()
    atomic_write_bytes(run.tokenizer, parent.tokenizer)
    # the stamp names the end-of-document token (load_tokenizer reads it); the tokenizer stage keeps this one
    atomic_write_json(run.tokenizer_dir / STAMP_FILE, {"eod_token": cfg.tokenizer.eod_token, "parent": parent.name})
    if load_tokenizer(run.tokenizer).has_chat_tokens:
        atomic_write_text(run.chat_template, CHAT_TEMPLATE)
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in parent.validation or [])
    atomic_write_text(run.validation / PARENT_VALIDATION, lines)
    parent_data: dict[str, Any] = {"before": None, "after": None}
    if not parent.validation:
        parent_data = {
            "before": parent.recorded_bpb,
            "after": None,
            "note": "the parent holds no validation text (a package from before validation.jsonl, or a run "
            "without its shards): 'before' is the bpb its own validation recorded; 'after' is not measured",
        }
    atomic_write_json(run.validation / FORGETTING_FILE, {"new_data": {}, "parent_data": parent_data})


def plan_line(cfg: Config) -> str:
    """What a continued run starts from, said with the training plan."""
    parent, t = cfg.train.parent or {}, cfg.train
    return (
        f"continued from {parent.get('name', t.init_from)} (sha256 {str(parent.get('sha256'))[:12]}…): its model "
        f"and tokenizer; a fresh optimizer and schedule ({t.warmup_steps} warmup steps) to train.lr {t.lr:g} "
        f"({LR_FRACTION:g} x the parent's unless --set train.lr= gave it)"
    )


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def measure_forgetting(run: RunDir, when: str, model: Path, device: str = "auto", say: Say = quiet) -> dict:
    """Bits per byte of `model` on the run's validation text and on its parent's, as `when`
    ("before": `model` is the parent, measured once; "after": the run's own model) in
    RUN/validation/forgetting.json; return the figures."""
    path = run.validation / FORGETTING_FILE
    figures = read_json(path, {}) or {}
    new, old = figures.setdefault("new_data", {}), figures.setdefault("parent_data", {})
    if when == "before" and new.get("before") is not None:
        return figures
    kept = run.validation / PARENT_VALIDATION
    parent_docs = _jsonl(kept.read_text(encoding="utf-8")) if kept.is_file() else []
    with load_model(model, device=device) as loaded:
        scorer = simone_scorer(loaded, str(model))
        for entry, docs in ((new, validation_sample(run.data, loaded.tokenizer)), (old, parent_docs)):
            files = [TextFile(str(d.get("domain")), Path(str(i)), d["text"]) for i, d in enumerate(docs)]
            if files:
                entry[when] = score_model(scorer, files).overall.bpb
                entry["bytes"] = sum(f.n_bytes for f in files)
    atomic_write_json(path, figures)
    say(f"forgetting ({when}): {forgetting_line(figures)}")
    return figures
