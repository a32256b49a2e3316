"""The trainer's callback interface: every hook is called, at its point of the loop."""

from __future__ import annotations

from simone.train.callbacks import Callback, LogStats, default_callbacks
from simone.train.distributed import dist_env_from_environ
from simone.train.trainer import Trainer
from train_support import losses_by_step, new_run


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_start(self, trainer):
        self.calls.append(("train_start", trainer.step))

    def on_step_start(self, trainer):
        self.calls.append(("step_start", trainer.step))

    def on_step_end(self, trainer):
        self.calls.append(("step_end", trainer.step))

    def on_log(self, trainer, stats: LogStats):
        self.calls.append(("log", stats.step, stats.loss))

    def on_eval(self, trainer, results, improved):
        self.calls.append(("eval", trainer.step, results["val_loss"], improved))

    def on_pause(self, trainer, epoch_ended):
        self.calls.append(("pause", trainer.step))

    def on_checkpoint(self, trainer, path, best):
        self.calls.append(("checkpoint", trainer.step, path.name, best))

    def on_train_end(self, trainer, status):
        self.calls.append(("train_end", status["state"], status["stop_reason"]))

    def close(self, trainer):
        self.calls.append(("close",))


def test_a_callback_sees_each_point_of_the_loop(template, tmp_path):
    cfg, run = new_run(template, tmp_path / "r", max_steps=4, log_every=2, eval_every=4, checkpoint_every=100)
    trainer = Trainer(cfg, run, dist_env_from_environ())
    assert [type(c).__name__ for c in trainer.callbacks] == [type(c).__name__ for c in default_callbacks(trainer)]
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    try:
        result = trainer.fit(None)
    finally:
        trainer.close()
    assert result.steps == 4
    calls = recorder.calls
    assert calls[0] == ("train_start", 0)
    assert [c[1] for c in calls if c[0] == "step_start"] == [0, 1, 2, 3]
    assert [c[1] for c in calls if c[0] == "step_end"] == [1, 2, 3, 4]
    assert [c[1] for c in calls if c[0] == "pause"] == [1, 2, 3, 4]
    losses = losses_by_step(run)
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == [(2, losses[2]), (4, losses[4])]
    (ev,) = [c for c in calls if c[0] == "eval"]
    assert ev[1] == 4 and ev[3] is True  # the first evaluation is a best
    assert [c[1:] for c in calls if c[0] == "checkpoint"] == [(4, "step_000004", True)]
    # the order at step 4: step end, log, eval, pause, checkpoint; then the end, and close from
    # both fit and Trainer.close (closing twice is harmless)
    names = [c[0] for c in calls]
    assert names[-8:] == ["step_end", "log", "eval", "pause", "checkpoint", "train_end", "close", "close"]
    assert calls[-3] == ("train_end", "finished", "max_steps")
    assert run.read_status()["state"] == "finished"
