"""`simone run`: chain the stages, each reading the previous one's artifacts in the run dir.

Each `stage_*` function can also run alone (the CLI's one-stage verbs call them). The
pipeline owns `status.json`'s `state`/`stage` transitions; the trainer owns the training
progress fields inside it.
"""

from __future__ import annotations

import functools
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from simone.config import Config, save_config
from simone.errors import SimoneError
from simone.rundir import RunDir


SAMPLE_PROMPT = "The "  # the short sample printed at the end of `simone run`
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


def _say(msg: str) -> None:
    print(f"[simone] {msg}", flush=True)


def _holding_run_lock(stage):
    """Run `stage(cfg, run_dir, ...)` holding the run directory's lock, taken before the stage
    writes anything (re-entrant: `simone run` holds it around every stage). Under torchrun
    only rank 0 writes, so only rank 0 locks."""

    @functools.wraps(stage)
    def locked(cfg: Config, run_dir: Path, *args, **kwargs):
        from simone.train.distributed import dist_env_from_environ
        from simone.train.lock import RunLock

        if not dist_env_from_environ().is_main:
            return stage(cfg, run_dir, *args, **kwargs)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir, warn=RunDir(run_dir).log_line):
            return stage(cfg, run_dir, *args, **kwargs)

    return locked


# What `--force` moves aside: everything a training run wrote (the tokenizer and config are
# copied too, so the old checkpoints stay usable from the folder they are moved to).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "train.log", "validation", "status.json")


def claim_run_dir(run: RunDir, resume: str | None, force: bool) -> None:
    """Refuse to start a new run over an earlier run's checkpoints, unless resuming it or
    `force` is given; with `force` the earlier run's outputs go to `RUN/replaced-STAMP/`.
    Call it holding the run lock, before anything is written."""
    from simone.train.checkpoint import list_checkpoints

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
            f"{run.root}/replaced-*), or choose another --run-dir")
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
    _say(f"--force: the earlier run's checkpoints, metrics and logs were moved to {aside}")


def corpus_path(cfg: Config) -> Path:
    """The user's corpus, or the embedded default materialised from installed packages."""
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    from simone.data.default_corpus import default_corpus_dir

    return default_corpus_dir()


@_holding_run_lock
def stage_curate(cfg: Config, run_dir: Path):
    from simone.data.curate import curate, print_summary

    run = RunDir(run_dir).make()
    if not run.config.exists():
        save_config(cfg, run.config)
    corpus = corpus_path(cfg)
    _say(f"curate: {corpus}")
    result = curate(corpus, run.data, cfg)
    print_summary(result)
    return result


@_holding_run_lock
def stage_tokenizer(cfg: Config, run_dir: Path):
    from simone.tokenizer import train_tokenizer

    run = RunDir(run_dir)
    if not run.documents.exists():
        raise PipelineError(f"{run.documents}: missing; run `simone curate --run-dir {run.root}` first")
    _say(f"tokenizer: byte-level BPE, vocab {cfg.tokenizer.vocab_size}")
    # domain control tokens come from the domains found in documents.jsonl
    tok = train_tokenizer(run.documents, run.tokenizer_dir, cfg.tokenizer)
    # the model's embedding must match what the tokenizer really produced
    cfg.model.vocab_size = tok.vocab_size
    save_config(cfg, run.config)
    return tok


@_holding_run_lock
def stage_shards(cfg: Config, run_dir: Path):
    from simone.data.shards import build_shards
    from simone.tokenizer import load_tokenizer

    run = RunDir(run_dir)
    if not run.tokenizer.exists():
        raise PipelineError(f"{run.tokenizer}: missing; run `simone tokenizer --run-dir {run.root}` first")
    tok = load_tokenizer(run.tokenizer)
    _say("shards: tokenizing into memmap shards")
    # with control_token_prob > 0, training documents may start with their <|domain:NAME|> token
    return build_shards(run.documents, tok, run.data, cfg.data.control_token_prob, cfg.data.split_seed)


@_holding_run_lock
def stage_prepare(cfg: Config, run_dir: Path):
    """Everything before training: curate → tokenizer → shards."""
    stage_curate(cfg, run_dir)
    stage_tokenizer(cfg, run_dir)
    return stage_shards(cfg, run_dir)


@_holding_run_lock
def stage_train(cfg: Config, run_dir: Path, resume: str | None = None, force: bool = False):
    """Train; a run directory without tokenizer and shards is prepared first.

    A run directory that holds checkpoints is refused unless `resume` or `force` is given
    (see `claim_run_dir`).

    Under torchrun every process calls this: the process group is joined here, rank 0 alone
    prepares the data and writes config.json while the others wait for its word, and then every
    rank trains with rank 0's resolved config (the tokenizer may have changed the vocab size).
    """
    from simone.train.distributed import (barrier, broadcast_object, dist_env_from_environ,
                                          init_distributed, resolve_device)
    from simone.train.trainer import train

    run = RunDir(run_dir)
    env = dist_env_from_environ()
    prepared = run.tokenizer.exists() and (run.data / "index.json").exists()
    # While rank 0 prepares, the others wait in a collective: give it an hour (torch's default,
    # 10 minutes with NCCL, is too short for a large corpus).
    init_distributed(env, resolve_device(cfg.train.device, env), timeout_s=None if prepared else PREPARE_TIMEOUT_S)
    outcome: tuple[str, object]
    if env.is_main:
        try:
            claim_run_dir(run, resume, force)
            if not prepared:
                if resume not in (None, "latest"):
                    raise PipelineError(f"{run.root}: no tokenizer or shards to resume training on; "
                                        f"run `simone prepare --run-dir {run.root}` or train without --resume")
                _say(f"train: {run.root} has no tokenizer and shards yet; preparing them first")
                stage_prepare(cfg, run.root)
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
        from simone.config import from_dict

        cfg = from_dict(outcome[1])
    barrier(env)
    return train(cfg, run, resume=resume)


def run_pipeline(cfg: Config, run_dir: Path, resume: str | None = None, monitor: bool = False,
                 monitor_port: int = 5001, package_dir: Path = Path("models_for_download"),
                 force: bool = False) -> PipelineResult:
    """corpus → curate → tokenizer → shards → train → validate → package, into `run_dir`.

    A run directory holding an earlier run's checkpoints is refused unless `resume` (continue
    it) or `force` (move it aside to RUN/replaced-STAMP/ and start over) is given."""
    from simone.train.lock import RunLock

    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    with RunLock(run.root, warn=run.log_line):  # a second `simone run` here is refused, before any write
        claim_run_dir(run, resume, force)
        run.make()
        return _run_locked(cfg, run, resume, monitor, monitor_port, package_dir)


def _run_locked(cfg: Config, run: RunDir, resume: str | None, monitor: bool, monitor_port: int,
                package_dir: Path) -> PipelineResult:
    from simone.generate import load_model, sample_text
    from simone.package import package_run
    from simone.validate import print_report, validate

    t0 = time.time()
    save_config(cfg, run.config)
    run.write_status(state="running", stage="curate", preset=cfg.preset, started=t0, error=None)
    stage = "curate"
    try:
        if monitor:
            from simone.monitor import start_background_monitor

            url = start_background_monitor(run_dir=run.root, port=monitor_port)
            _say(f"dashboard: {url}")
        if resume is None or not (run.data / "index.json").exists():
            stage_curate(cfg, run.root)
            stage = "tokenizer"
            run.write_status(stage=stage)
            stage_tokenizer(cfg, run.root)
            stage = "shards"
            run.write_status(stage=stage)
            stage_shards(cfg, run.root)
        stage = "train"
        run.write_status(stage=stage)
        result = stage_train(cfg, run.root, resume=resume)
        if getattr(result, "stop_reason", None) == "signal":
            _say("stopped by signal; resume with --resume latest")
            return PipelineResult(ok=False, run_dir=run.root, error="stopped")
        stage = "validate"
        run.write_status(state="running", stage=stage)
        report = validate(run.root, out_dir=run.validation)
        print_report(report)
        stage = "package"
        run.write_status(stage=stage)
        pkg = package_run(run, package_dir)
        with load_model(pkg) as loaded:
            sample = sample_text(loaded, prompt=SAMPLE_PROMPT, max_tokens=40, seed=cfg.train.seed)
        status = "finished" if report["ok"] else "failed"
        run.write_status(state=status, stage="done", package=str(pkg.resolve()), elapsed_s=time.time() - t0,
                         error=None if report["ok"] else "validation failed: " + ", ".join(report["failed"]))
        _say(f"package: {pkg.resolve()}")
        _say(f"sample: {sample}")
        _say(f"done in {time.time() - t0:.0f}s ({status})")
        return PipelineResult(ok=report["ok"], run_dir=run.root, package=pkg, sample=sample)
    except KeyboardInterrupt:
        run.write_status(state="stopped", stage=stage)
        raise
    except Exception as e:
        run.write_status(state="failed", stage=stage, error=f"{type(e).__name__}: {e}")
        run.log_line(f"FAILED in {stage}: {traceback.format_exc()}")
        raise

