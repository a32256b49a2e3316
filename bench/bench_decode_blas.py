"""How fast a decoding step's products stream the weights: PyTorch's BLAS (MKL in its x86 CPU
wheels) against NumPy's (OpenBLAS), side by side in one run, and the memory's read bandwidth.

    python bench/bench_decode_blas.py                  # the 110M shape (`--preset h100`), 2 threads
    python bench/bench_decode_blas.py --preset cpu --threads 1

One pass multiplies `--rows` rows (a decoding step at batch 1 or 8) by every weight matrix of
the preset's model, in order (12 layers x q/k/v, output, SwiGLU in, SwiGLU out, then the head),
each laid out [in, out] as the decoding path keeps it; a model bigger than the caches then
streams from memory, as a real step does. Median of `--repeats` passes; GB/s = the weights'
bytes / the pass's time. The read bandwidth is the median time to sum a 1 GiB tensor: the bound
a step at batch 1 can reach. `simone.model.cpu_blas` picks NumPy where it wins (see there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simone.config import preset  # noqa: E402
from simone.devices import cpu_model  # noqa: E402
from simone.model.layers import swiglu_hidden_dim  # noqa: E402


def matrices(name: str) -> list[torch.Tensor]:
    m = preset(name).model
    head_dim = m.dim // m.n_heads
    qkv = (m.n_heads + 2 * (m.n_kv_heads or m.n_heads)) * head_dim
    hidden = swiglu_hidden_dim(m.dim, m.ffn_hidden, m.multiple_of)
    shapes = [(m.dim, qkv), (m.dim, m.dim), (m.dim, 2 * hidden), (hidden, m.dim)] * m.n_layers + [(m.dim, m.vocab_size)]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(i, o, generator=g) * 0.02 for i, o in shapes]


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    threadpoolctl.threadpool_limits(args.threads, user_api="blas")
    weights = matrices(args.preset)
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{cpu_model()}, {args.threads} threads; preset {args.preset}: {len(weights)} matrices, {n_bytes / 1e6:.0f} MB")
    for rows in (1, 8):
        xs = {w.size(0): torch.randn(rows, w.size(0)) for w in weights}
        nps = [(xs[w.size(0)].numpy(), w.numpy()) for w in weights]
        with torch.no_grad():
            t_torch = median_s(lambda: [xs[w.size(0)] @ w for w in weights], args.repeats)
        t_numpy = median_s(lambda: [np.matmul(x, w) for x, w in nps], args.repeats)
        print(
            f"rows {rows}: PyTorch (MKL) {t_torch * 1e3:6.2f} ms ({n_bytes / 1e9 / t_torch:5.1f} GB/s)   "
            f"NumPy (OpenBLAS) {t_numpy * 1e3:6.2f} ms ({n_bytes / 1e9 / t_numpy:5.1f} GB/s)   "
            f"NumPy / PyTorch speed {t_torch / t_numpy:.2f}x"
        )
    big = torch.ones(1 << 28)  # 1 GiB of float32
    t_read = median_s(lambda: big.sum(), args.repeats)
    print(f"memory read bandwidth (sum of 1 GiB, {args.threads} threads): {big.numel() * 4 / 1e9 / t_read:.1f} GB/s")


if __name__ == "__main__":
    main()
