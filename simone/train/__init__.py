"""Training: `trainer.train(cfg, run, resume)` and what it is made of.

    trainer.py        the loop: steps, evaluation, checkpoints, resume, rollback, the stop rule
    callbacks.py      its side effects: status.json and heartbeat, signals, fault injection,
                      the console line and expected time, samples
    state.py          the train state a checkpoint carries, RNG capture and restore
    parallelize.py    activation checkpointing, compile, FSDP2 and DDP, applied to the model
    precision.py      the autocast dtype, the fp16 grad scaler, whether compile can run
    schedule.py       the learning-rate schedule: warmup + cosine, or planned by time under a cap
    optim.py          the cosine curve (lr_at), setting the lr, fused-AdamW support
    early_stopping.py the min_epochs / num_epochs / patience rule
    metrics.py        metrics.jsonl, TensorBoard, progress bar, MFU
    distributed.py    torchrun / DDP process layout
    system_stats.py   CPU / RAM / disk / GPU rows for metrics.jsonl

The checkpoint format (`simone/checkpoint.py`), the run lock (`simone/lock.py`) and fault
injection (`simone/faults.py`) live below training: inference and the pipeline use them too.

`python -m simone.train --run-dir DIR [--resume latest] [--set k=v]` trains a prepared run dir.
"""
