"""A stand-in trainer that writes a realistic run directory over time (no model, no torch).

Used by the dashboard's browser test and by bench/bench_monitor.py, and handy by hand:

    python tests/fake_trainer.py runs/demo --steps 2000 --interval 0.2

It follows the run-directory contract of docs/ARCHITECTURE.md: config.json, status.json
with a heartbeat, metrics.jsonl (train/eval/system/event rows), train.log, samples.jsonl,
checkpoints/step_N/MANIFEST.json with latest/best pointers, data/report.html and
validation/report.{md,json} at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from simone.rundir import RunDir, append_jsonl, atomic_write_json, atomic_write_text

DOMAINS = ("biblical_classical", "educational", "philosophical", "technical")
WORDS = "the word of light and truth was with the people in the beginning of days".split()


class FakeTrainer:
    """Writes one step's worth of rows per `step()` call."""

    def __init__(self, root: Path, total_steps: int = 1000, steps_per_epoch: int = 250,
                 log_every: int = 1, eval_every: int = 50, system_every: int = 5,
                 checkpoint_every: int = 100, sample_every: int = 50, seed: int = 0,
                 preset: str = "tiny"):
        self.run = RunDir(Path(root)).make()
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.log_every, self.eval_every, self.system_every = log_every, eval_every, system_every
        self.checkpoint_every, self.sample_every = checkpoint_every, sample_every
        self.rng = random.Random(seed)
        self.step_n = 0
        self.t0 = time.time()
        self.best = math.inf
        atomic_write_json(self.run.config, {"preset": preset, "train": {"num_epochs": self.epochs_total()}})
        atomic_write_text(self.run.data / "report.html",
                          "<html><body><h1>Curation report</h1><p>4 domains, 120 files</p></body></html>")
        self.run.write_status(state="running", stage="train", step=0, epoch=0, total_steps=total_steps, error=None)
        self.event("start", "training started")
        self.run.log_line(f"training {total_steps} steps on fake data")

    def epochs_total(self) -> int:
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))

    @property
    def epoch(self) -> int:
        return self.step_n // self.steps_per_epoch

    def loss_at(self, step: int) -> float:
        return 2.2 + 7.5 * math.exp(-step / 180) + self.rng.gauss(0, 0.05)

    def event(self, name: str, message: str, **extra) -> None:
        append_jsonl(self.run.metrics, {"t": time.time(), "kind": "event", "event": name,
                                        "step": self.step_n, "message": message, **extra})

    def system_row(self) -> None:
        append_jsonl(self.run.metrics, {
            "t": time.time(), "kind": "system", "cpu_percent": 40 + self.rng.random() * 50,
            "ram_used_gb": 6 + self.rng.random(), "ram_total_gb": 16.0, "rss_gb": 1.2 + 0.001 * self.step_n,
            "disk_free_gb": 120.0 - 0.0005 * self.step_n,
            "gpus": [{"index": 0, "name": "Fake H200", "util": 90 + self.rng.random() * 10,
                      "mem_used_gb": 60 + self.rng.random(), "mem_total_gb": 141.0,
                      "temp_c": 60 + self.rng.random() * 10, "power_w": 500 + self.rng.random() * 150}],
        })

    def step(self) -> None:
        """Advance one optimizer step and write what a real trainer would."""
        self.step_n += 1
        s, now = self.step_n, time.time()
        loss = self.loss_at(s)
        lr = 3e-4 * min(1.0, s / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / self.total_steps)))
        if s % self.log_every == 0:
            append_jsonl(self.run.metrics, {
                "t": now, "kind": "train", "step": s, "epoch": self.epoch, "loss": loss, "lr": lr,
                "grad_norm": 0.5 + abs(self.rng.gauss(0, 0.2)), "tokens_per_s": 52000 + self.rng.gauss(0, 800),
                "mfu": 0.41 + self.rng.gauss(0, 0.01), "tokens_seen": s * 49152,
            })
            self.run.log_line(f"step {s}/{self.total_steps} loss {loss:.4f} lr {lr:.2e}")
        if s % self.system_every == 0:
            self.system_row()
        if s % self.eval_every == 0:
            per = {d: {"loss": loss + 0.1 * i + 0.05, "bpb": (loss + 0.1 * i) / 3.1, "ppl": math.exp(loss + 0.1 * i)}
                   for i, d in enumerate(DOMAINS)}
            val = sum(v["loss"] for v in per.values()) / len(per)
            self.best = min(self.best, val)
            append_jsonl(self.run.metrics, {"t": now, "kind": "eval", "step": s, "epoch": self.epoch,
                                            "val_loss": val, "val_bpb": val / 3.1, "val_ppl": math.exp(val),
                                            "per_domain": per})
            self.run.log_line(f"eval step {s}: val_loss {val:.4f}")
        if s % self.sample_every == 0:
            words = [self.rng.choice(WORDS) for _ in range(24)]
            trace = [{"token": " " + w, "p": self.rng.random()} for w in words]
            append_jsonl(self.run.samples, {"t": now, "step": s, "epoch": self.epoch, "prompt": "In the beginning",
                                            "text": "".join(t["token"] for t in trace), "trace": trace})
        if s % self.checkpoint_every == 0:
            self.checkpoint()
        if s % self.steps_per_epoch == 0:
            self.event("epoch_end", f"epoch {self.epoch} done")
        self.run.write_status(state="running", stage="train", step=s, epoch=self.epoch, total_steps=self.total_steps)

    def checkpoint(self) -> None:
        name = f"step_{self.step_n:06d}"
        d = self.run.checkpoints / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"\0" * 4096)
        atomic_write_json(d / "MANIFEST.json", {"step": self.step_n, "files": {"model.safetensors": "0" * 64}})
        atomic_write_text(self.run.checkpoints / "latest", name + "\n")
        atomic_write_text(self.run.checkpoints / "best", name + "\n")
        self.event("checkpoint", f"saved {name}")

    def log(self, message: str) -> None:
        self.run.log_line(message)

    def finish(self) -> None:
        atomic_write_json(self.run.validation / "report.json", {"val_loss": self.best})
        atomic_write_text(self.run.validation / "report.md", f"# Validation\n\nval_loss {self.best:.4f}\n")
        self.run.write_status(state="finished", stage="done", step=self.step_n, epoch=self.epoch)
        self.run.log_line("training finished")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between steps")
    ap.add_argument("--inject-script", action="store_true", help="log a line containing <script>")
    args = ap.parse_args()
    ft = FakeTrainer(args.run_dir, total_steps=args.steps)
    for _ in range(args.steps):
        ft.step()
        if args.inject_script and ft.step_n == 3:
            ft.log('<script>document.title="pwned"</script> <b>not bold</b>')
        time.sleep(args.interval)
    ft.finish()
    print(json.dumps({"run": str(args.run_dir), "steps": ft.step_n}))


if __name__ == "__main__":
    main()
