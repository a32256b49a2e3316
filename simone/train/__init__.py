"""Training: `trainer.train(cfg, run, resume)` and what it is made of.

    trainer.py        the loop, evaluation, samples, resume, rollback, signals, heartbeat
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
