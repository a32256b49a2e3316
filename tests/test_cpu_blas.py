"""Decoding through NumPy's BLAS (simone/model/cpu_blas.py): the same products and tokens as
PyTorch's, PyTorch's thread count given back, and only inside a decoding step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simone.model import cpu_blas
from simone.model.base import CachedDecoder
from simone.model.cpu_blas import decoding_threads, rows_matmul, streams_weights
from test_model import tiny_model


@pytest.fixture
def numpy_blas(monkeypatch):
    """As on a CPU where NumPy's BLAS is the faster (an AMD one), whatever this machine is;
    every model counts as too big for the caches; PyTorch on 2 threads (with the tests' usual 1,
    a step's lowering to one thread would not show)."""
    monkeypatch.setattr(cpu_blas, "NUMPY_ROWS_PRODUCT", True)
    monkeypatch.setattr(cpu_blas, "STREAMED_BYTES", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_rows_go_through_numpy_only_inside_a_decoding_step(numpy_blas, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 1, 40, generator=g), torch.randn(40, 24, generator=g)
    calls = []
    real = np.matmul
    monkeypatch.setattr(cpu_blas.np, "matmul", lambda a, b: calls.append((a.shape, b.shape)) or real(a, b))
    outside = rows_matmul(x, w)
    assert calls == []
    with decoding_threads():
        inside = rows_matmul(x, w)
        bf16 = rows_matmul(x.bfloat16(), w.bfloat16())  # NumPy has no bfloat16: PyTorch multiplies
    # one [rows, in] product (a [B, 1, in] stack would read the weights once per row)
    assert calls == [((3, 40), (40, 24))]
    assert inside.shape == outside.shape == (3, 1, 24) and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)


def test_a_decoding_step_runs_pytorch_on_one_thread_and_gives_its_threads_back(numpy_blas):
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), decoding_threads():
        assert torch.get_num_threads() == 1
        with decoding_threads():  # nested: the outer step's setting stands
            assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    assert cpu_blas._NumpyBlas.active is False


def test_generate_gives_the_same_tokens_through_numpy(numpy_blas, monkeypatch):
    """Greedy tokens at batch 1 and 3 (the prompt through the modules, then flat steps), with and
    without NumPy's BLAS."""
    model = tiny_model()
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(1))
    used = []
    real = np.matmul
    monkeypatch.setattr(cpu_blas.np, "matmul", lambda a, b: used.append(1) or real(a, b))

    def tokens(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(list(model.generate(batch, 12, temperature=0.0)), 1)

    assert streams_weights(model)
    with_numpy = [tokens(prompt[:1]), tokens(prompt)]
    assert used, "the steps did not go through NumPy"
    monkeypatch.setattr(cpu_blas, "NUMPY_ROWS_PRODUCT", False)
    assert not streams_weights(model)
    assert torch.equal(with_numpy[0], tokens(prompt[:1])) and torch.equal(with_numpy[1], tokens(prompt))


def test_which_step_and_threads_a_decoder_picks(monkeypatch):
    """A model in the caches: the NumPy step on one BLAS thread, on any CPU. A streamed one: the
    NumPy step on PyTorch's threads where NumPy's BLAS is the faster, else PyTorch's step (MKL)."""
    model = tiny_model()
    prompt = torch.zeros(1, 3, dtype=torch.long)

    def picked() -> tuple[bool, bool, int | None]:
        decoder = CachedDecoder(model, prompt, 4)
        return decoder.plan is not None, decoder.numpy_plan is not None, decoder.blas_threads

    for numpy_faster in (True, False):
        monkeypatch.setattr(cpu_blas, "NUMPY_ROWS_PRODUCT", numpy_faster)
        assert picked() == (True, True, 1)
    monkeypatch.setattr(cpu_blas, "STREAMED_BYTES", 0)  # every model is streamed
    assert picked() == (True, False, None)
    monkeypatch.setattr(cpu_blas, "NUMPY_ROWS_PRODUCT", True)
    assert picked() == (True, True, torch.get_num_threads())
    assert CachedDecoder(model, prompt, 4, use_cache=False).numpy_plan is None


def test_small_models_and_intel_cpus_keep_pytorch(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(cpu_blas, "NUMPY_ROWS_PRODUCT", True)
    assert not streams_weights(model)  # a few KB: it sits in the caches
    monkeypatch.setattr(cpu_blas, "STREAMED_BYTES", 0)
    assert streams_weights(model)
    monkeypatch.setattr(cpu_blas, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_blas.numpy_rows_product() is False


def test_an_autocast_generation_keeps_pytorchs_threads(numpy_blas, monkeypatch):
    """Under a bfloat16 autocast the products are PyTorch's: no step may take its threads."""
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(cpu_blas.torch, "set_num_threads", lambda n: seen.append(n) or real(n))
    model = tiny_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0.0))
    assert seen == []
    with torch.no_grad():
        list(model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0.0))
    assert seen == [1, 2] * 4  # each of the 4 steps on one thread, then given back


def test_only_cached_steps_of_a_few_rows_run_on_one_thread(numpy_blas, monkeypatch):
    """A long prompt, and the steps that recompute the whole context once the text outgrows the
    cache, keep PyTorch's threads: they are big products."""
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(cpu_blas.torch, "set_num_threads", lambda n: seen.append(n) or real(n))
    model = tiny_model()  # context 24 positions
    long_prompt = torch.zeros(3, 22, dtype=torch.long)  # 66 rows: more than a step's 64
    with torch.no_grad():
        out = list(model.generate(long_prompt, 4, temperature=0.0))
    assert len(out) == 4 and len(seen) == 2 * 2  # the 2 steps that fit in the cache; not the prompt, not the 2 after


def test_the_decode_step_benchmark_times_both_steps_on_the_same_tokens(capsys):
    """bench/bench_decode_step.py: one arm through the NumPy step, the other through PyTorch's,
    and the tokens of both compared."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_decode_step.py"
    spec = importlib.util.spec_from_file_location("bench_decode_step", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, prompt = tiny_model(), torch.zeros(1, 3, dtype=torch.long)
    assert bench.decoder(model, prompt, 4, numpy_step=True).numpy_plan is not None
    pytorch_arm = bench.decoder(model, prompt, 4, numpy_step=False)
    assert pytorch_arm.numpy_plan is None and pytorch_arm.plan is not None and pytorch_arm.blas_threads is None
    assert bench.main(["--preset", "tiny", "--tokens", "6", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "numpy step" in out and "pytorch step" in out and "same tokens: True" in out
