"""`python -m simone.train --run-dir DIR [--resume latest|best|PATH] [--set key=value ...]`

Trains an already prepared run directory (tokenizer and shards present) with its own
config.json, after applying the `--set` overrides (which are saved back to config.json),
through `simone train`'s function (`simone.workflows.pipeline.stage_train`).
Exit status: 0 finished, 1 failed, 2 refused (run directory in use, bad config or
checkpoint), 128+N stopped by signal N (a checkpoint was saved; resume with --resume latest).
Works under torchrun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simone.config import apply_overrides, load_config
from simone.errors import SimoneError
from simone.rundir import RunDir
from simone.train.schedule import stop_summary
from simone.train.trainer import TrainingError
from simone.workflows.pipeline import stage_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simone.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume", default=None, help="latest | best | a checkpoint directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    run = RunDir(args.run_dir)
    try:
        cfg = apply_overrides(load_config(run.config), args.overrides)
        # `simone train`'s path on the run dir as it is (neither prepared nor claimed); the
        # settled sizes reach config.json with --set only, and the workflow's lines train.log
        result = stage_train(
            cfg, run.root, resume=args.resume, as_prepared=True, save=bool(args.overrides), say=run.log_line
        )
    except TrainingError as e:  # a SimoneError too, but it has its own exit status
        print(f"training failed ({e.reason}): {e}", file=sys.stderr)
        return 1
    except (SimoneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"stopped at step {result.steps}: {stop_summary(result.stop_reason, result.schedule_progress)} "
        f"(best val loss {result.best_val_loss})",
        file=sys.stderr,
    )
    if result.stop_reason == "signal":
        return 128 + int(run.read_status().get("signal") or 15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
