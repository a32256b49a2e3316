"""`simone finetune`: chat fine-tuning of a trained model, with its replies measured before and after.

The run starts from the parent through continued pretraining's mechanism (workflows/continued.py:
`read_parent`, `prepare_init_from`; the trainer loads the parent's weights and records its
lineage), on conversations laid out by the chat template with the loss on the assistant turns
only (simone/data/chat_data.py). Without `data` it trains on the demo set built from the
embedded corpus (simone/data/chat_demo.py). Training, checkpoints, resume, the dashboard,
validation (whose loss is then the held-out conversations' assistant tokens) and packaging are
a pretraining run's, but for the checkpoint packaged: the last one, not the one with the lowest
held-out loss. That loss flattens after a couple of epochs while the replies still improve (on
the demo set, 2 epochs more left it 0.2% higher and took the replies that end their turn from
89% to 100%); early stopping on it still ends the run. Greedy replies to the held-out
conversations are measured on the starting model and on the packaged one
(simone/inference/chat_eval.py): `chat_eval` in RUN/validation/report.json, the package's
training summary and model card.

A parent whose tokenizer predates the chat tokens gets them: its tokenizer with the 4 added
and its model with an embedding row (and output row, untied) for each, set to the mean of the
existing rows, written as a checkpoint `RUN/init/NAME+chat-tokens` that the run starts from;
that checkpoint's own lineage names the parent.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simone.checkpoint import CONFIG, MANIFEST, MANIFEST_SCHEMA, WEIGHTS, resolve_checkpoint, weights_bytes
from simone.config import Config, apply_overrides, load_config
from simone.data.chat_data import HELDOUT_FILE, build_chat_shards, heldout_conversations, with_chat_tokens
from simone.data.chat_demo import write_demo_chats
from simone.data.chat_template import CHAT_TOKENS
from simone.data.shards import TokenShard
from simone.data.tokenizer import STAMP_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer
from simone.inference.chat_eval import chat_eval_markdown, evaluate_chat, format_chat_eval
from simone.inference.load import load_model
from simone.inference.package import package_run
from simone.inference.shard_loss import evaluate_per_domain
from simone.inference.validation_report import FORGETTING_FILE, format_report, report_markdown, validate
from simone.lock import RunLock
from simone.model import LanguageModel, build_model
from simone.progress import Say, Show, quiet
from simone.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file
from simone.workflows.continued import parent_config, prepare_init_from, read_parent
from simone.workflows.pipeline import PipelineError, claim_run_dir, stage_train

DEMO_CHATS = "demo_chats.jsonl"  # RUN/data/: the demo set, when no --data is given
CHAT_EVAL_BEFORE = "chat_eval_before.json"  # RUN/validation/: the starting model's replies, measured once
CHAT_TOKENS_SUFFIX = "+chat-tokens"


@dataclass
class FinetuneResult:
    ok: bool
    run_dir: Path
    package: Path | None
    chat_eval: dict[str, Any]
    training: object | None = None  # the trainer's TrainResult


def finetune_config(cfg: Config) -> Config:
    """The training settings of a fine-tune, on `parent_config`'s (the parent's model and
    settings, a lower learning rate): up to 10 epochs of the conversations, stopped early after
    2 evaluations (one per epoch) without a better held-out assistant loss; no time cap unless
    given; no domain control tokens (conversations have no domain)."""
    t = cfg.train
    t.num_epochs, t.min_epochs, t.patience = 10, 2, 2
    t.warmup_steps = min(t.warmup_steps, 20)
    t.max_minutes = t.max_steps = None
    cfg.data.control_window_prob = 0.0
    return cfg


def grow_vocabulary(model: LanguageModel, vocab_size: int, new_ids: list[int]) -> LanguageModel:
    """`model` with `vocab_size` token rows (or its own, if more): the token embedding and output
    head grown, the rows of `new_ids` set to the mean of the rows before the first of them."""
    cfg = dataclasses.replace(model.cfg, vocab_size=max(vocab_size, model.cfg.vocab_size))
    grown = build_model(cfg)
    state = model.state_dict()
    known = min(new_ids)
    for key in ("tok_embeddings.weight", "output.weight"):
        old = state[key]
        rows = torch.cat([old, old.new_zeros(cfg.vocab_size - old.size(0), old.size(1))])
        rows[new_ids] = old[:known].mean(dim=0)
        state[key] = rows
    grown.load_state_dict(state)
    return grown


def _with_chat_tokens(model_path: Path, run: RunDir, say: Say) -> Path:
    """The checkpoint to start from: `model_path` when its tokenizer has the chat tokens, else
    `RUN/init/NAME+chat-tokens`, the parent with them added (module docstring)."""
    with load_model(model_path, device="cpu") as loaded:
        tokenizer = with_chat_tokens(loaded.tokenizer)
        if tokenizer is loaded.tokenizer:
            return model_path
        parent = read_parent(model_path)
        dest = run.root / "init" / f"{parent.name}{CHAT_TOKENS_SUFFIX}"
        new_ids = [tokenizer.chat_ids[t] for t in CHAT_TOKENS]
        model = grow_vocabulary(loaded.model, tokenizer.vocab_size, new_ids)
        cfg = loaded.config
        cfg.model.vocab_size, cfg.train.parent = model.cfg.vocab_size, parent.record
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest / WEIGHTS, weights_bytes(model.state_dict()))
    atomic_write_bytes(dest / CONFIG, (cfg.to_json() + "\n").encode("utf-8"))
    tokenizer.save(dest / TOKENIZER_FILE)
    atomic_write_json(dest / STAMP_FILE, {"eod_token": tokenizer.eod_token})
    files = {
        name: {"sha256": sha256_file(dest / name), "size": (dest / name).stat().st_size} for name in (WEIGHTS, CONFIG)
    }
    manifest = {"schema": MANIFEST_SCHEMA, "step": 0, "created": time.time(), "files": files}
    atomic_write_json(dest / MANIFEST, {**manifest, "tokenizer_sha256": sha256_file(dest / TOKENIZER_FILE)})
    say(
        f"finetune: {parent.name} has no chat tokens: added {', '.join(CHAT_TOKENS)} (ids {new_ids[0]}..{new_ids[-1]}), "
        f"their embedding rows the mean of the others ({dest})"
    )
    return dest


def _measure(model: LanguageModel, cfg: Config, tokenizer: Tokenizer, run: RunDir, max_items: int) -> dict[str, Any]:
    """The model's held-out replies (`evaluate_chat`) and its loss on their assistant tokens."""
    t = cfg.train
    shard = TokenShard(run.data, "val")
    device = model.tok_embeddings.weight.device
    loss = evaluate_per_domain(model, shard, cfg.model.max_seq_len, t.batch_size, t.eval_batches, device)["val_loss"]
    return {"val_loss": loss, **evaluate_chat(model, tokenizer, heldout_conversations(run.data), max_items=max_items)}


def finetune(
    model: Path | None,
    run_dir: Path,
    data: Path | None = None,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    skip_bad: bool = False,
    val_fraction: float = 0.1,
    eval_items: int = 200,
    resume: str | None = None,
    force: bool = False,
    package_dir: Path = Path("models_for_download"),
    say: Say = quiet,
    show: Show = quiet,
) -> FinetuneResult:
    """Fine-tune `model` (a package, run dir or checkpoint) on the conversations in `data` (JSONL;
    default: the demo set) into `run_dir`; validate, measure replies, package. `resume` continues
    the run in `run_dir` (its config.json; `model` may then be None); `overrides` are `--set`s,
    applied over the fine-tuning settings (`finetune_config`)."""
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    with RunLock(run.root, warn=run.log_line):
        claim_run_dir(run, resume, force, say)
        if resume is not None and run.config.is_file():
            cfg = apply_overrides(load_config(run.config), overrides or [])
        elif model is None:
            raise PipelineError(f"{run.root}: nothing to resume; give --model PACKAGE to fine-tune")
        else:
            start = _with_chat_tokens(Path(model), run.make(), say)
            parent = read_parent(start)
            cfg = apply_overrides(finetune_config(parent_config(parent)), overrides or [])
            prepare_init_from(cfg, parent, run)
            (run.validation / FORGETTING_FILE).unlink(missing_ok=True)  # measured on text, not on conversations
        if max_steps is not None:
            cfg.train.max_steps = max_steps
        if max_minutes is not None:
            cfg.train.max_minutes = max_minutes
        tokenizer = load_tokenizer(run.tokenizer)
        if not (run.data / HELDOUT_FILE).is_file() or resume is None:
            chats = Path(data) if data is not None else write_demo_chats(run.data / DEMO_CHATS)
            say(f"finetune: conversations from {chats}" + ("" if data is not None else " (the demo set)"))
            index = build_chat_shards(chats, tokenizer, run.data, cfg.model.max_seq_len, val_fraction, skip_bad)
            cfg.data.data_dir = str(chats.resolve())  # what the run trained on, for its summary and card
            say("finetune: " + data_line(index["chats"], cfg.model.max_seq_len))
        before = read_json(run.validation / CHAT_EVAL_BEFORE)
        if before is None:
            with load_model(Path(str(cfg.train.init_from)), device=cfg.train.device) as start_model:
                before = _measure(start_model.model, cfg, tokenizer, run, eval_items)
            atomic_write_json(run.validation / CHAT_EVAL_BEFORE, before)
        result = stage_train(cfg, run.root, resume=resume, say=say, show=show)
        if getattr(result, "stop_reason", None) == "signal":
            say(f"stopped by signal; resume with simone finetune --out {run.root} --resume latest")
            return FinetuneResult(False, run.root, None, {"before": before, "after": None}, result)
        last = resolve_checkpoint(run.root, "latest")  # the model to package (module docstring)
        report = validate(last, out_dir=run.validation)
        with load_model(last, device=cfg.train.device) as trained:
            after = _measure(trained.model, cfg, tokenizer, run, eval_items)
        chat_eval = {"before": before, "after": after, "data": read_json(run.data / "index.json", {}).get("chats")}
        chat_eval["chat_tokens_added"] = str(cfg.train.init_from).endswith(CHAT_TOKENS_SUFFIX)
        report["chat_eval"] = chat_eval
        atomic_write_json(run.validation / "report.json", {k: v for k, v in report.items() if k != "report_dir"})
        markdown = report_markdown(report) + "\n" + "\n".join(chat_eval_markdown(chat_eval))
        atomic_write_text(run.validation / "report.md", markdown)
        for part in format_report(report):
            show(part)
        for line in format_chat_eval(before, after):
            show(line)
        package = package_run(run, package_dir, checkpoint="latest", say=say)
        run.write_status(state="finished" if report["ok"] else "failed", stage="done", package=str(package.resolve()))
        say(f"package: {package.resolve()}")
        return FinetuneResult(report["ok"], run.root, package, chat_eval, result)


def data_line(counts: dict[str, Any], seq_len: int) -> str:
    """The conversations' counts in one line."""
    line = (
        f"{counts['conversations']} conversations: {counts['pieces']['train']} to train on, "
        f"{counts['pieces']['val']} held out"
    )
    if counts["split"] or counts["dropped"]:
        line += (
            f"; longer than the context ({seq_len + 1} tokens): {counts['split']} split between exchanges, "
            f"{counts['dropped']} dropped"
        )
    if counts["dropped_exchanges"]:
        line += f", {counts['dropped_exchanges']} exchanges too long on their own dropped"
    if counts["skipped_bad"]:
        line += f"; {counts['skipped_bad']} malformed lines skipped (--skip-bad), e.g. {counts['bad_lines'][0]}"
    return line
