"""Scaling out with torchrun (issue 7): the batch layout that keeps the effective batch, the
`simone train` verb on a fresh run directory under torchrun, resuming on another process
count, FSDP2 on gloo, and what rank 0 alone writes.

Every multi-process test runs 2 gloo processes with OMP_NUM_THREADS=1 on the tiny preset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from simone.config import preset
from simone.model import build_model
from simone.rundir import RunDir
from simone.train.distributed import DistributedConfigError, split_batch
from simone.train.metrics import gpu_peak_flops, mfu
from train_support import (
    losses_by_step,
    new_run,
    prepared_template,
    read_metrics,
    run_training,
    subprocess_env,
)

# 6 steps of 16 sequences; an epoch is 9 steps, so no epoch end inside the run
SETTINGS = dict(max_steps=6, batch_size=8, grad_accum=2, eval_every=3, checkpoint_every=3, num_epochs=2)


def torchrun(args: list[str], env=None, port: int = 29541, module: str = "simone.train",
             timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m MODULE ARGS` on this machine; the whole process group
    is killed on a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", module, *args]
    proc = subprocess.Popen(cmd, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_2(run: RunDir, *args: str, port: int, env=None) -> subprocess.CompletedProcess:
    """`python -m simone.train` on a prepared run directory, 2 processes."""
    return torchrun(["--run-dir", str(run.root), *args], env=env, port=port)


# ----------------------------------------------------------------------------- batch layout


def test_split_batch_keeps_the_effective_batch():
    assert split_batch(12, 4, 1) == (12, 4)
    assert split_batch(12, 4, 2) == (12, 2)  # the accumulation is divided first
    assert split_batch(12, 4, 4) == (12, 1)
    assert split_batch(12, 4, 8) == (6, 1)  # then the micro-batch
    assert split_batch(8, 1, 2) == (4, 1)  # the tiny preset under torchrun
    assert split_batch(8, 6, 4) == (4, 3)
    for b, a, w in [(12, 4, 2), (12, 4, 8), (8, 6, 4), (16, 3, 6)]:
        micro, accum = split_batch(b, a, w)
        assert micro * accum * w == b * a


def test_split_batch_refuses_what_cannot_be_spread_evenly():
    with pytest.raises(DistributedConfigError, match=r"batch_size=3 x train.grad_accum=1 = 3 sequences.*2 processes"):
        split_batch(3, 1, 2)
    with pytest.raises(DistributedConfigError, match="3 processes"):
        split_batch(8, 4, 3)


def test_mfu_of_the_125m_model_on_an_h100():
    """MFU on a known configuration: the h100 preset's model (vocab 32,000, dim 768, 12
    layers, SwiGLU 2048, tied embeddings) at 1024 tokens, counted by hand."""
    cfg = preset("h100").model
    cfg.governance = False  # the preset trains the governance model; this counts the language model
    with torch.device("meta"):
        model = build_model(cfg)
    per_layer = 768 * 3 * 768 + 768 * 768 + 3 * 768 * 2048 + 2 * 768  # qkv, wo, SwiGLU, 2 norms
    n = 12 * per_layer + 32000 * 768 + 768  # + the tied embedding and the final norm
    assert model.num_params(exclude_embeddings=True) == n == 109_529_856
    flops = model.flops_per_token(1024)
    assert flops == 6 * n + 12 * 12 * 768 * 1024 == 770_425_344
    peak = gpu_peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989e12
    assert mfu(flops, 500_000, peak) == pytest.approx(0.38950, abs=1e-5)


# ----------------------------------------------------------------------------- the CLI verb


@pytest.mark.slow
def test_torchrun_simone_train_prepares_a_fresh_run_dir_and_only_rank_0_writes(tiny_corpus, tmp_path):
    """The documented command line, verbatim, on a run directory that does not exist yet."""
    run = RunDir(tmp_path / "run")
    done = torchrun(["train", "--preset", "tiny", "--data", str(tiny_corpus), "--run-dir", str(run.root),
                     "--max-steps", "5", "--set", "train.sample_every=5"], module="simone", port=29551)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (run.data / "index.json").exists() and run.tokenizer.exists()
    assert done.stdout.count("preparing them first") == 1  # rank 0 alone prepared the data
    assert run.read_status()["state"] == "finished"

    # rank 0 alone writes: every row, line, sample, checkpoint and TensorBoard file once
    events = read_metrics(run, "event")
    start = [r for r in events if r["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2
    assert start[0]["tokens_per_step"] == 8 * 64  # the tiny preset's batch of 8, as 2 x 4
    assert [r["step"] for r in read_metrics(run, "train")] == [5]
    assert len([r for r in events if r["event"] == "finished"]) == 1
    assert len([r for r in events if r["event"] == "expected_time"]) == 1
    assert len(run.samples.read_text().splitlines()) == 1
    log = run.log.read_text()
    assert log.count("training stopped: max_steps") == 1 and log.count("expected: ") == 1
    assert sorted(p.name for p in run.checkpoints.iterdir() if p.name.startswith("step_")) == ["step_000005"]
    assert len(list((run.root / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_when_rank_0_cannot_prepare_every_rank_stops_with_its_reason(tmp_path):
    done = torchrun(["train", "--preset", "tiny", "--data", str(tmp_path / "no-such-corpus"),
                     "--run-dir", str(tmp_path / "run")], module="simone", port=29552, timeout=60)
    assert done.returncode != 0
    assert "rank 0 could not prepare" in done.stderr  # rank 1 heard why instead of waiting
    assert "no-such-corpus" in done.stderr


# ----------------------------------------------------------------------------- resume on another world size


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return prepared_template(tmp_path_factory.mktemp("dist_template"))


@pytest.fixture(scope="module")
def one_process(template, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted reference: one process, 2 micro-batches of 8 per step."""
    _, run = new_run(template, tmp_path_factory.mktemp("one") / "run", **SETTINGS)
    done = run_training(run)
    assert done.returncode == 0, done.stderr
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(1, 7))
    return losses


def assert_close(losses: dict[int, float], reference: dict[int, float], tol: float = 1e-5) -> None:
    assert sorted(losses) == sorted(reference)
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], abs=tol), step


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(template, tmp_path, one_process):
    """Stopped at step 3 by 2 processes (SIGTERM, checkpoint), finished by 1: the step, data
    position, schedule and optimizer carry over, so with dropout 0 every resumed loss equals
    the uninterrupted run's."""
    _, run = new_run(template, tmp_path / "run", **SETTINGS)
    first = train_2(run, port=29561, env=subprocess_env(SIMONE_FAULT_SIGTERM_AT_STEP="3"))
    assert run.read_status()["state"] == "stopped" and run.read_status()["step"] == 3, first.stderr[-3000:]
    done = run_training(run, "--resume", "latest")
    assert done.returncode == 0, done.stderr
    assert_close(losses_by_step(run), one_process)
    (resume,) = [r for r in read_metrics(run, "event") if r["event"] == "resume"]
    assert resume["step"] == 3
    assert "saved by 2 process(es), resumed on 1" in run.log.read_text()


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two_with_fsdp(template, tmp_path, one_process):
    """1 → 2 processes, and the 2 shard the model with FSDP2: the same losses again."""
    _, run = new_run(template, tmp_path / "run", **SETTINGS)
    run_training(run, env=subprocess_env(SIMONE_FAULT_SIGTERM_AT_STEP="3"))
    assert run.read_status()["step"] == 3
    done = train_2(run, "--resume", "latest", "--set", "train.parallel=fsdp", "--set", "train.sample_every=6",
                   port=29571)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert_close(losses_by_step(run), one_process, tol=1e-4)
    # every rank ran the sharded model to generate the sample; rank 0 alone wrote it
    assert [json.loads(line)["step"] for line in run.samples.read_text().splitlines()] == [6]
    # the FSDP run's own checkpoint holds full tensors: one process loads and checks it
    from simone.checkpoint import load_checkpoint

    weights, state, _ = load_checkpoint(run.checkpoints / "step_000006")
    model_cfg = preset("tiny").model
    model_cfg.vocab_size = 320 + 4  # the BPE vocabulary, then the 4 chat tokens
    reference = build_model(model_cfg)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert int(state["step"]) == 6 and set(state["optimizer"]["state"]) == set(range(len(list(reference.parameters()))))


DDP_POLICY_ONLY_READS = """
import os, socket, sys, torch, torch.distributed as dist
from simone.config import ModelConfig
from simone.model import build_model
from simone.train.distributed import DistEnv, wrap_model
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=32, governance=True,
                  policy=True, memory=False, n_domains=3, policy_loss_weight=0.0, coherence_weight=0.0)
ddp = wrap_model(build_model(cfg), DistEnv(rank=0, local_rank=0, world_size=2), torch.device("cpu"), "ddp")
x = torch.randint(0, 32, (2, 8))
for step in range(3):  # DDP notices a parameter without gradient at the second backward
    _, loss = ddp(x, x, domain_ids=torch.tensor([0, 1]))
    loss.backward()
dist.destroy_process_group()
print("trained")
"""


def test_ddp_trains_a_policy_head_that_no_loss_term_reaches():
    """Both governance loss weights 0: the policy head gets no gradient, and DDP is told to
    expect that (find_unused_parameters) instead of failing at the next step."""
    from simone.config import ModelConfig
    from simone.train.distributed import has_unreached_parameters

    assert not has_unreached_parameters(ModelConfig(governance=True, policy=True))
    assert not has_unreached_parameters(ModelConfig())
    done = subprocess.run([sys.executable, "-c", DDP_POLICY_ONLY_READS], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
