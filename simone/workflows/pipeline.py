"""`simone run`: chain the stages, each reading the previous one's artifacts in the run dir.

Each `stage_*` function can also run alone (the CLI's one-stage verbs call them). The
pipeline owns `status.json`'s `state`/`stage` transitions; the trainer owns the training
progress fields inside it. Nothing here prints: progress lines go to `say` and reports (the
curation summary, the validation table, the eval and comparison tables) to `show`, both
silent unless the caller passes a printer.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simone.checkpoint import list_checkpoints
from simone.config import Config, analytic_param_count, from_dict, save_config
from simone.data.corpus import is_record_file
from simone.data.curate import curate, summary
from simone.data.default_corpus import default_corpus_dir
from simone.data.shards import build_shards
from simone.data.tokenizer import load_tokenizer, train_tokenizer
from simone.devices import pick_device
from simone.errors import SimoneError
from simone.inference.generate import sample_text
from simone.inference.load import load_model
from simone.inference.package import package_run
from simone.inference.text_bpb import evaluate_models, format_table, read_text_folder
from simone.inference.validation_report import format_report, validate
from simone.lock import RunLock
from simone.progress import Say, Show, quiet
from simone.rundir import RunDir, atomic_write_json, atomic_write_text, read_json
from simone.train.budget import training_flops_per_token
from simone.train.distributed import barrier, broadcast_object, dist_env_from_environ, init_distributed, resolve_device
from simone.train.metrics import cpu_peak_flops, gpu_peak_flops
from simone.train.precision import autocast_dtype
from simone.train.schedule import stop_summary
from simone.train.trainer import settle_model_sizes, train
from simone.units import format_duration
from simone.workflows.continued import check_fits, measure_forgetting, plan_line, prepare_init_from, read_parent

SAMPLE_PROMPT = "The "  # the short sample said at the end of `simone run`
PREPARE_TIMEOUT_S = 3600.0  # under torchrun: how long the other ranks wait for rank 0 to prepare


class PipelineError(SimoneError, RuntimeError):
    """A stage found its inputs missing or unusable."""


@dataclass
class PipelineResult:
    ok: bool
    run_dir: Path
    package: Path | None = None
    error: str | None = None
    sample: str | None = None
    training: object | None = None  # the trainer's TrainResult


# ----------------------------------------------------------------------------- the device and the plan

# Expected time = training FLOPs / (the device's peak x an assumed MFU). The CPU peak is a
# matmul probe in the training dtype (simone.train.metrics); ~30% is what the `cpu` preset
# reaches on 2 cores (bf16, compiled); for GPUs the peak comes from a table and 35% is a guess.
ASSUMED_MFU = {"cpu": 0.30, "cuda": 0.35}
BYTES_PER_TOKEN_GUESS = 4.0  # before the tokenizer exists: byte-level BPE on English prose
DEFAULT_CORPUS_BYTES = 9.2e6  # the embedded default corpus (Shakespeare 5.0 MB + KJV 4.2 MB)


class DeviceError(PipelineError):
    """The config asks for a device this machine does not have."""


def _corpus_bytes(path: Path) -> int:
    """Text bytes, roughly: a compressed record file (.gz, .zst, Parquet) holds about 3x its size."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(
        f.stat().st_size * (1 if f.name.endswith((".txt", ".jsonl")) else 3)
        for f in files
        if f.name.endswith(".txt") or is_record_file(f)
    )


def estimated_train_tokens(cfg: Config) -> int:
    """Training tokens guessed from the corpus's size, for a plan made before tokenizing."""
    if cfg.data.data_dir is None:
        n_bytes = DEFAULT_CORPUS_BYTES
    else:
        n_bytes = _corpus_bytes(Path(cfg.data.data_dir))
    share = 1.0 if cfg.data.validation_dir else 1.0 - cfg.data.val_fraction
    return int(n_bytes * share / BYTES_PER_TOKEN_GUESS)


def _training_device_type(cfg: Config) -> str:
    """The kind of device training will run on, for the expected time ("cpu" unless known)."""
    try:
        kind = pick_device(cfg.train.device).type
    except RuntimeError:  # a name torch does not know: training itself says so
        return "cpu"
    return kind if kind in ASSUMED_MFU else "cpu"


def expected_training_seconds(cfg: Config, train_tokens: int, device_type: str) -> float | None:
    """Roughly how long training `cfg` on `train_tokens` takes on `device_type` (time cap
    included); None where the device's peak is unknown."""
    m, t = cfg.model, cfg.train
    if device_type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    else:
        peak = cpu_peak_flops(autocast_dtype(t.dtype, torch.device("cpu")) or torch.float32)
    if not peak:
        return None
    flops_per_token = training_flops_per_token(m)
    tokens_per_step = t.batch_size * t.grad_accum * m.max_seq_len
    steps = t.num_epochs * max(1, train_tokens // tokens_per_step)
    if t.max_steps is not None:
        steps = min(steps, t.max_steps)
    seconds = steps * tokens_per_step * flops_per_token / (peak * ASSUMED_MFU[device_type])
    if t.max_minutes is not None:
        seconds = min(seconds, t.max_minutes * 60)
    return seconds


def check_device(cfg: Config, fall_back_to_cpu: bool = False, say: Say = quiet) -> None:
    """Before any work: does this machine have the device the config asks for?

    A config that wants CUDA on a machine without it raises DeviceError (one line, with the
    override that runs it on the CPU and how long that would take), or, with
    `fall_back_to_cpu`, switches `cfg` to the CPU and says so with the expected time.
    """
    want = cfg.train.device
    if not want.startswith("cuda") or torch.cuda.is_available():
        return
    on_cpu = copy.deepcopy(cfg)
    on_cpu.train.device, on_cpu.train.dtype = "cpu", "auto"
    on_cpu.model.vocab_size = min(on_cpu.model.vocab_size, on_cpu.tokenizer.vocab_size)
    tokens = estimated_train_tokens(on_cpu)
    expected = f"expected time ~{format_duration(expected_training_seconds(on_cpu, tokens, 'cpu'), 'unknown')} for ~{tokens:,} training tokens"
    if not fall_back_to_cpu:
        raise DeviceError(
            f"preset {cfg.preset} wants CUDA (train.device={want}), none found; use --set "
            f"train.device=cpu --set train.dtype=auto to run it on the CPU ({expected})"
        )
    cfg.train.device, cfg.train.dtype = "cpu", "auto"
    say(
        f"warning: preset {cfg.preset} wants CUDA, none found: training on the CPU "
        f"(train.device=cpu, train.dtype=auto; {expected})"
    )


def training_plan(cfg: Config, train_tokens: int, estimated: bool) -> list[str]:
    """What will be trained, said before training: model, context, batch, time cap, expected time."""
    # the model's vocabulary will be what the tokenizer makes (at most its target; a continued run's is known)
    if estimated and not cfg.train.init_from:
        cfg = copy.deepcopy(cfg)
        cfg.model.vocab_size = min(cfg.model.vocab_size, cfg.tokenizer.vocab_size)
    m, t = cfg.model, cfg.train
    device_type = _training_device_type(cfg)
    kind = "Llama-style" if m.arch == "llama" else "GPT-2 baseline"
    if m.arch == "llama" and m.governance:
        kind += " + governance"
    tokens_per_step = t.batch_size * t.grad_accum * m.max_seq_len
    cap = "none" if t.max_minutes is None else f"{t.max_minutes:g} min"
    steps = "" if t.max_steps is None else f", at most {t.max_steps} steps"
    source = "guessed from the corpus size" if estimated else "tokenized"
    return [
        f"model: {kind}, {analytic_param_count(m):,} parameters (dim {m.dim}, {m.n_layers} layers, "
        f"{m.n_heads} heads{'' if not m.n_kv_heads else f', {m.n_kv_heads} kv heads'}), vocab {m.vocab_size}",
        f"context {m.max_seq_len} tokens; batch {t.batch_size} x {t.grad_accum} accumulation = "
        f"{tokens_per_step:,} tokens a step; {t.num_epochs} epochs of ~{train_tokens:,} tokens ({source}){steps}",
        f"device {t.device} ({device_type}), dtype {t.dtype}; time cap {cap}; expected time "
        f"~{format_duration(expected_training_seconds(cfg, train_tokens, device_type), 'unknown')}",
    ]


def _holding_run_lock(stage):
    """Run `stage(cfg, run_dir, ...)` holding the run directory's lock, taken before the stage
    writes anything (re-entrant: `simone run` holds it around every stage). Under torchrun
    only rank 0 writes, so only rank 0 locks."""

    @functools.wraps(stage)
    def locked(cfg: Config, run_dir: Path, *args, **kwargs):
        if not dist_env_from_environ().is_main:
            return stage(cfg, run_dir, *args, **kwargs)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir, warn=RunDir(run_dir).log_line):
            return stage(cfg, run_dir, *args, **kwargs)

    return locked


# What `--force` moves aside: everything a training run wrote (the tokenizer and config are
# copied too, so the old checkpoints stay usable from the folder they are moved to).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "train.log", "validation", "status.json")


def claim_run_dir(run: RunDir, resume: str | None, force: bool, say: Say = quiet) -> None:
    """Refuse to start a new run over an earlier run's checkpoints, unless resuming it or
    `force` is given; with `force` the earlier run's outputs go to `RUN/replaced-STAMP/`.
    Call it holding the run lock, before anything is written."""
    if resume is not None:
        return
    # a leftover copy of an interrupted re-save (.old-step_N-*) is a checkpoint too
    checkpoints = list_checkpoints(run.checkpoints) + sorted(run.checkpoints.glob(".old-step_*"))
    if not checkpoints:
        return
    if not force:
        raise PipelineError(
            f"{run.root}: holds checkpoints of an earlier run (up to {checkpoints[-1].name}); continue it "
            f"with --resume latest, start over with --force (the earlier run is moved to "
            f"{run.root}/replaced-*), or choose another --run-dir"
        )
    aside = run.root / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = run.root / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for name in ("config.json", "tokenizer"):
        src = run.root / name
        if src.is_dir():
            shutil.copytree(src, aside / name, symlinks=True)
        elif src.exists():
            shutil.copy2(src, aside / name)
    for name in _RUN_OUTPUTS:
        if (run.root / name).exists():
            (run.root / name).rename(aside / name)
    run.checkpoints.mkdir(exist_ok=True)
    say(f"--force: the earlier run's checkpoints, metrics and logs were moved to {aside}")


def corpus_path(cfg: Config) -> Path:
    """The user's corpus, or the embedded default materialised from installed packages."""
    return Path(cfg.data.data_dir) if cfg.data.data_dir else default_corpus_dir()


@_holding_run_lock
def stage_curate(cfg: Config, run_dir: Path, say: Say = quiet, show: Show = quiet):
    run = RunDir(run_dir).make()
    if not run.config.exists():
        save_config(cfg, run.config)
    corpus = corpus_path(cfg)
    say(f"curate: {corpus}")
    result = curate(corpus, run.data, cfg)
    show(summary(result))
    return result


@_holding_run_lock
def stage_tokenizer(cfg: Config, run_dir: Path, say: Say = quiet):
    run = RunDir(run_dir)
    if cfg.train.init_from:  # a continued run keeps the tokenizer continued.prepare_init_from copied from its parent
        if not run.tokenizer.exists():
            raise PipelineError(f"{run.tokenizer}: missing; a continued run copies its parent's (--init-from)")
        say(f"tokenizer: the parent's ({cfg.train.init_from}), kept as it is")
        return load_tokenizer(run.tokenizer)
    if not run.documents.exists():
        raise PipelineError(f"{run.documents}: missing; run `simone curate --run-dir {run.root}` first")
    say(f"tokenizer: byte-level BPE, vocab {cfg.tokenizer.vocab_size}")
    # domain control tokens come from the domains found in documents.jsonl
    tok = train_tokenizer(run.documents, run.tokenizer_dir, cfg.tokenizer)
    settle_model_sizes(cfg, tok)  # the model's embedding matches what the tokenizer really produced
    save_config(cfg, run.config)
    return tok


@_holding_run_lock
def stage_shards(cfg: Config, run_dir: Path, say: Say = quiet):
    run = RunDir(run_dir)
    if not run.tokenizer.exists():
        raise PipelineError(f"{run.tokenizer}: missing; run `simone tokenizer --run-dir {run.root}` first")
    tok = load_tokenizer(run.tokenizer)
    say("shards: tokenizing into memmap shards")
    # with control_token_prob > 0, training documents may start with their <|domain:NAME|> token
    return build_shards(
        run.documents, tok, run.data, cfg.data.control_token_prob, cfg.data.split_seed, workers=cfg.curate.workers
    )


@_holding_run_lock
def stage_prepare(cfg: Config, run_dir: Path, say: Say = quiet, show: Show = quiet):
    """Everything before training: curate → tokenizer → shards."""
    stage_curate(cfg, run_dir, say, show)
    stage_tokenizer(cfg, run_dir, say)
    return stage_shards(cfg, run_dir, say)


@_holding_run_lock
def stage_train(
    cfg: Config,
    run_dir: Path,
    resume: str | None = None,
    force: bool = False,
    *,
    as_prepared: bool = False,
    save: bool = True,
    say: Say = quiet,
    show: Show = quiet,
):
    """Train (`simone train`); a run directory without tokenizer and shards is prepared first.

    A run directory that holds checkpoints is refused unless `resume` or `force` is given
    (see `claim_run_dir`). `python -m simone.train` passes `as_prepared`: the run directory
    must be prepared already and is trained as it is (not claimed), and config.json is
    rewritten with the settled sizes only when `save` (its --set overrides were given).

    Under torchrun every process calls this: the process group is joined here, rank 0 alone
    prepares the data and writes config.json while the others wait for its word, and then every
    rank trains with rank 0's resolved config (`settle_model_sizes`: the tokenizer's vocabulary
    and domain count).
    """
    check_device(cfg)  # before any work: a missing GPU is one line, not a traceback after preparing
    run = RunDir(run_dir)
    env = dist_env_from_environ()
    prepared = run.tokenizer.exists() and (run.data / "index.json").exists()
    # While rank 0 prepares, the others wait in a collective: give it an hour (torch's default,
    # 10 minutes with NCCL, is too short for a large corpus).
    init_distributed(env, resolve_device(cfg.train.device, env), timeout_s=None if prepared else PREPARE_TIMEOUT_S)
    outcome: tuple[str, Any]
    if env.is_main:
        try:
            if not as_prepared:
                claim_run_dir(run, resume, force, say)
                if _starts_from_parent(cfg, run):
                    prepare_init_from(cfg, read_parent(str(cfg.train.init_from)), run)
            if not prepared:
                if as_prepared or resume not in (None, "latest"):
                    raise PipelineError(
                        f"{run.root}: no tokenizer or shards to train on; run "
                        f"`simone prepare --run-dir {run.root}`" + ("" if as_prepared else " or train without --resume")
                    )
                say(f"train: {run.root} has no tokenizer and shards yet; preparing them first")
                stage_prepare(cfg, run.root, say, show)
            # every rank trains with these sizes (the broadcast config below)
            settle_model_sizes(cfg, load_tokenizer(run.tokenizer), keep_larger_vocab=True, log=say)
            if save:
                save_config(cfg, run.config)
            outcome = ("ok", cfg.to_dict())
        except Exception as e:  # the other ranks must hear about it, not wait forever
            outcome = ("error", f"{type(e).__name__}: {e}")
            broadcast_object(outcome, env)
            raise
    else:
        outcome = ("waiting", None)
    outcome = broadcast_object(outcome, env)  # the other ranks wait here while rank 0 prepares
    if outcome[0] == "error":
        raise PipelineError(f"rank 0 could not prepare {run.root}: {outcome[1]}")
    if not env.is_main:
        cfg = from_dict(outcome[1])
    barrier(env)
    return train(cfg, run, resume=resume)


def _starts_from_parent(cfg: Config, run: RunDir) -> bool:
    """A continued run (`train.init_from`) not yet started from its parent: lineage or tokenizer still to come."""
    return bool(cfg.train.init_from) and (cfg.train.parent is None or not run.tokenizer.exists())


def _training_ended(result) -> str:
    """The console's word on how training ended: named, with how far the schedule got."""
    reason = getattr(result, "stop_reason", None)
    if reason is None:
        return "training: no result"
    return f"training ended: {stop_summary(reason, result.schedule_progress)}"


def _train_tokens(run: RunDir) -> int:
    index = read_json(run.data / "index.json", {}) or {}
    return int(index.get("splits", {}).get("train", {}).get("n_tokens") or 0)


def stage_eval(model: Path, eval_data: Path, run: RunDir, say: Say = quiet, show: Show = quiet) -> dict:
    """Bits per byte of `model` on the text folder `eval_data`, shown as a table and written to
    RUN/validation/eval.json."""
    say(f"eval: {model.name} on {eval_data}")
    result = evaluate_models([str(model)], Path(eval_data))
    show(format_table(result))
    atomic_write_json(run.validation / "eval.json", result)
    return result


def run_pipeline(
    cfg: Config,
    run_dir: Path,
    resume: str | None = None,
    monitor: bool = False,
    monitor_port: int = 5001,
    package_dir: Path = Path("models_for_download"),
    prepared: bool = False,
    package_name: str | None = None,
    eval_data: Path | None = None,
    force: bool = False,
    say: Say = quiet,
    show: Show = quiet,
) -> PipelineResult:
    """corpus → curate → tokenizer → shards → train → validate → package, into `run_dir`.

    A run directory holding an earlier run's checkpoints is refused unless `resume` (continue
    it) or `force` (move it aside to RUN/replaced-STAMP/ and start over) is given.
    prepared=True: the run dir already holds its tokenizer and shards (`run_models` links
    them in); training starts at once. `package_name`: the package's name (default from the
    preset, architecture, run dir name, step and weights). With `eval_data`, then bits per
    byte of the package on that text (validation/eval.json).
    """
    check_device(cfg)  # before the run dir exists: nothing is written for a machine that cannot run it
    if eval_data is not None:  # a bad folder fails now, not after training
        read_text_folder(Path(eval_data))
    run = RunDir(run_dir)
    parent = read_parent(str(cfg.train.init_from)) if _starts_from_parent(cfg, run) else None
    if parent is not None:  # a model shape or vocabulary other than the parent's is refused before any work
        check_fits(cfg, parent)
    run.root.mkdir(parents=True, exist_ok=True)
    with RunLock(run.root, warn=run.log_line):  # a second `simone run` here is refused, before any write
        claim_run_dir(run, resume, force, say)
        run.make()
        if parent is not None:
            prepare_init_from(cfg, parent, run)
        return _run_locked(
            cfg, run, resume, monitor, monitor_port, package_dir, prepared, package_name, eval_data, say, show
        )


def _run_locked(
    cfg: Config,
    run: RunDir,
    resume: str | None,
    monitor: bool,
    monitor_port: int,
    package_dir: Path,
    prepared: bool,
    package_name: str | None,
    eval_data: Path | None,
    say: Say,
    show: Show,
) -> PipelineResult:
    t0 = time.time()
    save_config(cfg, run.config)
    run.write_status(state="running", stage="curate", preset=cfg.preset, started=t0, error=None)
    stage = "curate"
    try:
        if monitor:
            say(f"dashboard: {_start_monitor(run_dir=run.root, port=monitor_port)}")
        if cfg.train.init_from:
            say(plan_line(cfg))
        if not prepared and (resume is None or not (run.data / "index.json").exists()):
            for line in training_plan(cfg, estimated_train_tokens(cfg), estimated=True):
                say(line)
            stage_curate(cfg, run.root, say, show)
            stage = "tokenizer"
            run.write_status(stage=stage)
            stage_tokenizer(cfg, run.root, say)
            stage = "shards"
            run.write_status(stage=stage)
            stage_shards(cfg, run.root, say)
        for line in training_plan(cfg, _train_tokens(run), estimated=False):
            say(line)
        stage = "train"
        run.write_status(stage=stage)
        if cfg.train.init_from:  # the parent on the new data and its own, before training
            measure_forgetting(run, "before", Path(cfg.train.init_from), cfg.train.device, say)
        result = stage_train(cfg, run.root, resume=resume, say=say, show=show)
        if getattr(result, "stop_reason", None) == "signal":
            say("stopped by signal; resume with --resume latest")
            return PipelineResult(ok=False, run_dir=run.root, error="stopped")
        stage = "validate"
        run.write_status(state="running", stage=stage)
        if cfg.train.init_from:  # the model it will package, on the same texts
            measure_forgetting(run, "after", run.root, cfg.train.device, say)
        report = validate(run.root, out_dir=run.validation)
        for part in format_report(report):
            show(part)
        stage = "package"
        run.write_status(stage=stage)
        pkg = package_run(run, package_dir, name=package_name, say=say)
        if eval_data is not None:
            stage_eval(pkg, eval_data, run, say, show)
        with load_model(pkg) as loaded:
            sample = sample_text(loaded, prompt=SAMPLE_PROMPT, max_tokens=40, seed=cfg.train.seed)
        status = "finished" if report["ok"] else "failed"
        run.write_status(
            state=status,
            stage="done",
            package=str(pkg.resolve()),
            elapsed_s=time.time() - t0,
            error=None if report["ok"] else "validation failed: " + ", ".join(report["failed"]),
        )
        say(f"package: {pkg.resolve()}")
        say(f"sample: {sample}")
        say(f"done in {time.time() - t0:.0f}s ({status}); {_training_ended(result)}")
        return PipelineResult(ok=report["ok"], run_dir=run.root, package=pkg, sample=sample, training=result)
    except KeyboardInterrupt:
        run.write_status(state="stopped", stage=stage)
        raise
    except Exception as e:
        run.write_status(state="failed", stage=stage, error=f"{type(e).__name__}: {e}")
        run.log_line(f"FAILED in {stage}: {traceback.format_exc()}")
        raise


def _start_monitor(**where) -> str:
    """Serve the dashboard beside training (`--monitor`); return its URL."""
    # deferred: the dashboard's web stack (fastapi, uvicorn, plotly) loads only with --monitor
    from simone.monitor import start_background_monitor  # noqa: PLC0415

    return str(start_background_monitor(**where))


# ----------------------------------------------------------------------------- several models

MODEL_CHOICES = ("llama", "gpt2")  # `simone run --models`: the Llama-style model, the GPT-2 baseline


def model_variant(cfg: Config, name: str) -> Config:
    """`cfg` for the model `name`: "llama" is the preset's Llama-style model (governance as the
    preset has it), "gpt2" the GPT-2 baseline of the same size (which has no governance)."""
    out = copy.deepcopy(cfg)
    out.model.arch = name
    if name == "gpt2":
        out.model.governance = False
    return out


def link_shared(target: Path, link: Path) -> None:
    """`link` -> `target` (a relative symlink; a copy where symlinks are not allowed)."""
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)


def run_models(
    cfg: Config,
    run_dir: Path,
    models: list[str],
    resume: str | None = None,
    package_dir: Path = Path("models_for_download"),
    monitor: bool = False,
    monitor_port: int = 5001,
    eval_data: Path | None = None,
    force: bool = False,
    say: Say = quiet,
    show: Show = quiet,
) -> PipelineResult:
    """`simone run --models llama,gpt2`: the original train_all_models, on one data preparation.

    Curates, trains the tokenizer and builds the shards once in `run_dir`; then each model
    trains in its own run dir `run_dir/runs/NAME` (its data/ and tokenizer/ link to the
    shared ones) with the same training settings, and is validated and packaged as
    `simone-PRESET-NAME-RUNDIRNAME`. Writes `run_dir/comparison.{json,md}` (val bpb,
    parameters, tokens/s per model) and shows the table.
    """
    check_device(cfg)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    results: list[PipelineResult] = []
    with RunLock(run.root, warn=run.log_line):  # before any write
        run.make()
        save_config(cfg, run.config)
        run.write_status(
            state="running", stage="curate", preset=cfg.preset, started=time.time(), error=None, models=models
        )
        try:
            if monitor:  # one dashboard over every model's run dir
                (run.root / "runs").mkdir(exist_ok=True)
                say(f"dashboard: {_start_monitor(runs_root=run.root / 'runs', port=monitor_port)}")
            if resume is None or not (run.data / "index.json").exists():
                stage_prepare(cfg, run.root, say, show)
            else:  # resuming: the shared data is there; the sizes are its tokenizer's
                settle_model_sizes(cfg, load_tokenizer(run.tokenizer))
            for name in models:
                run.write_status(stage=f"model {name}")
                sub = RunDir(run.root / "runs" / name)
                sub.root.mkdir(parents=True, exist_ok=True)
                link_shared(run.data, sub.data)
                link_shared(run.tokenizer_dir, sub.tokenizer_dir)
                say(f"model {name}: {sub.root}")
                result = run_pipeline(
                    model_variant(cfg, name),
                    sub.root,
                    resume=resume,
                    package_dir=package_dir,
                    prepared=True,
                    package_name=f"simone-{cfg.preset}-{name}-{run.root.name}",
                    eval_data=eval_data,
                    force=force,
                    say=say,
                    show=show,
                )
                results.append(result)
                if result.error == "stopped":
                    run.write_status(state="stopped", stage=f"model {name}")
                    return PipelineResult(ok=False, run_dir=run.root, error="stopped")
                rows.append(comparison_row(name, sub, result))
        except KeyboardInterrupt:
            run.write_status(state="stopped")
            raise
        except Exception as e:
            run.write_status(state="failed", error=f"{type(e).__name__}: {e}")
            raise
        comparison = {
            "schema": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preset": cfg.preset,
            "corpus": cfg.data.data_dir or "embedded default corpus",
            "train_tokens": _train_tokens(run),
            "models": rows,
        }
        atomic_write_json(run.root / "comparison.json", comparison)
        atomic_write_text(run.root / "comparison.md", comparison_markdown(comparison))
        show(comparison_markdown(comparison))
        ok = all(r.ok for r in results)
        run.write_status(
            state="finished" if ok else "failed", stage="done", error=None if ok else "a model failed validation"
        )
        say(f"comparison: {run.root / 'comparison.md'}")
        return PipelineResult(ok=ok, run_dir=run.root, package=results[-1].package if results else None)


def comparison_row(name: str, sub: RunDir, result: PipelineResult) -> dict:
    """One model's line of the comparison: from its validation report and training summary."""
    report = read_json(sub.validation / "report.json", {}) or {}
    training = (read_json(sub.root / "training_summary.json", {}) or {}).get("training", {})
    return {
        "model": name,
        "run_dir": str(sub.root),
        "package": str(result.package) if result.package else None,
        "validation_ok": report.get("ok"),
        "val_bpb": report.get("val_bpb"),
        "val_loss": report.get("val_loss"),
        # the median over logging intervals; a run too short to log one: the overall rate
        "params": report.get("params"),
        "tokens_per_s": training.get("tokens_per_s") or getattr(result.training, "tokens_per_s", None),
        "steps": sub.read_status().get("step"),
        "tokens_seen": training.get("tokens_seen"),
        "stop_reason": training.get("stop_reason"),
    }


def comparison_markdown(c: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        f"# Models compared: preset {c['preset']}",
        "",
        f"Same corpus ({c['corpus']}), tokenizer, {c['train_tokens']:,} training tokens and training settings.",
        "",
        "| model | val bpb | parameters | tokens/s | steps | validation |",
        "|---|---|---|---|---|---|",
    ]
    for r in c["models"]:
        lines.append(
            f"| {r['model']} | {fmt(r['val_bpb'], '.4f')} | {fmt(r['params'], ',')} | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['steps'], 'd')} | "
            f"{'PASS' if r['validation_ok'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"
