"""`python -m simone.train --run-dir DIR [--resume latest|best|PATH] [--set key=value ...]`

Trains an already prepared run directory (tokenizer and shards present) with its own
config.json, after applying the `--set` overrides (which are saved back to config.json).
Exit status: 0 finished, 1 failed, 2 refused (run directory in use, bad config or
checkpoint), 128+N stopped by signal N (a checkpoint was saved; resume with --resume latest).
Works under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simone.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume", default=None, help="latest | best | a checkpoint directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from simone.config import apply_overrides, load_config, save_config
    from simone.errors import SimoneError
    from simone.rundir import RunDir
    from simone.train.distributed import dist_env_from_environ
    from simone.lock import RunLock
    from simone.data.tokenizer import load_tokenizer
    from simone.train.trainer import TrainingError, settle_model_sizes, train

    run = RunDir(args.run_dir)
    is_main = dist_env_from_environ().is_main
    try:
        # the lock before config.json is rewritten (train() takes it again, re-entrantly)
        with RunLock(run.root, warn=run.log_line) if is_main and run.root.is_dir() else contextlib.nullcontext():
            cfg = apply_overrides(load_config(run.config), args.overrides)
            # each rank alike, from the same tokenizer (a run dir prepared before the sizes
            # were settled in config.json gets them here)
            if run.tokenizer.exists():
                settle_model_sizes(cfg, load_tokenizer(run.tokenizer), keep_larger_vocab=True,
                                   log=run.log_line if is_main else None)
            if is_main and args.overrides:
                save_config(cfg, run.config)
            result = train(cfg, run, resume=args.resume)
    except TrainingError as e:  # a SimoneError too, but it has its own exit status
        print(f"training failed ({e.reason}): {e}", file=sys.stderr)
        return 1
    except (SimoneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from simone.train.schedule import stop_summary

    print(f"stopped at step {result.steps}: {stop_summary(result.stop_reason, result.schedule_progress)} "
          f"(best val loss {result.best_val_loss})", file=sys.stderr)
    if result.stop_reason == "signal":
        status = run.read_status()
        return 128 + int(status.get("signal") or 15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
