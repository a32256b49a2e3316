"""Training: `trainer.train(cfg, run, resume)` and what it is made of.

    trainer.py        the loop, evaluation, samples, resume, rollback, signals, heartbeat
    checkpoint.py     atomic verified checkpoints (safetensors + weights-only state)
    schedule.py       the learning-rate schedule: warmup + cosine, or planned by time under a cap
    optim.py          the cosine curve (lr_at), setting the lr, fused-AdamW support
    early_stopping.py the min_epochs / num_epochs / patience rule
    metrics.py        metrics.jsonl, TensorBoard, progress bar, MFU
    lock.py           one live process per run directory
    faults.py         SIMONE_FAULT_* fault injection for tests
    distributed.py    torchrun / DDP process layout
    system_stats.py   CPU / RAM / disk / GPU rows for metrics.jsonl

`python -m simone.train --run-dir DIR [--resume latest] [--set k=v]` trains a prepared run dir.
"""
