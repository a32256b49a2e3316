"""Training: `trainer.train(cfg, run, resume)` and what it is made of.

    trainer.py        the loop: the stop rule, the optimizer step, logging and bad steps, the hooks
    callbacks.py      its side effects: metrics rows, status.json and heartbeat, signals, fault
                      injection, evaluation with early stopping, console line, samples, checkpoints
    state.py          TrainState (what changes as a run trains): start, save, resume, roll back
    parallelize.py    activation checkpointing, compile, FSDP2 and DDP, applied to the model
    precision.py      the autocast dtype, the fp16 grad scaler, whether compile can run
    schedule.py       every learning-rate function: warmup + cosine (lr_at), or planned by time under a cap
    optim.py          the optimizers (AdamW, Muon + AdamW) over the model's parameter kinds, setting the lr
    budget.py         a model shape for a time budget, and the one step-timing probe
    early_stopping.py the min_epochs / num_epochs / patience rule
    metrics.py        metrics.jsonl, TensorBoard, progress bar, MFU
    distributed.py    torchrun / DDP process layout
    system_stats.py   CPU / RAM / disk / GPU rows for metrics.jsonl

The checkpoint format (`simone/checkpoint.py`), the run lock (`simone/lock.py`) and fault
injection (`simone/faults.py`) live below training: inference and the pipeline use them too.

`python -m simone.train --run-dir DIR [--resume latest] [--set k=v]` trains a prepared run dir.
"""
