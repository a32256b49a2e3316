"""Matrix products for decoding on a CPU: a few rows against weights streamed from memory.

Generating a token multiplies one row (or a batch's few) by every weight matrix, so its speed
is how fast the weights stream through the BLAS. PyTorch's CPU wheels multiply with Intel's MKL,
which runs generic code on other vendors' CPUs: on an AMD EPYC (2 cores) the 110M shape's
matrices (438 MB) stream through it at 17.8 GB/s at one row, and at 26.5 GB/s through OpenBLAS
(NumPy's, which picks kernels for the CPU at run time): `bench/bench_decode_blas.py`. So on a CPU
that is not Intel's, a model too big for the caches multiplies float32 rows through NumPy
(`np.matmul` on the tensors' own memory, no copies) while decoding. Intel CPUs keep MKL. The
summation order differs from MKL's: results agree to float32 rounding, not bit for bit.

A model small enough for the caches decodes through `decode.numpy_decode_step` instead, on any
CPU: there the cost is dispatch, not the BLAS, and NumPy dispatches faster.

OpenBLAS and PyTorch each keep a pool of threads that spin while they wait for work; used one
after the other on the same cores they slow each other ~5x. So NumPy multiplies only inside
`decoding_threads()`, which sets PyTorch to one thread (a step's other operations are too small
to share out) and OpenBLAS to the threads PyTorch had (one for a model in the caches, whose
products are too small to share out either); `LanguageModel.generate` runs each step of a few
rows, the pick of its token included, inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import threadpoolctl
import torch

from simone.devices import cpu_vendor


def numpy_rows_product() -> bool:
    """Whether NumPy's BLAS is the faster for decoding rows here: PyTorch multiplies with MKL
    (its CPU wheels for x86) and the CPU is not Intel's (module docstring)."""
    return torch.backends.mkl.is_available() and cpu_vendor() not in ("GenuineIntel", "")


NUMPY_ROWS_PRODUCT = numpy_rows_product()  # a fact of the machine, read once


# A model whose weights exceed this streams them from memory for every token; a smaller one
# (the `cpu` preset's 4 MB) sits in the caches, where MKL is as fast and PyTorch's second thread
# still pays.
STREAMED_BYTES = 64 << 20


def in_caches(model: torch.nn.Module) -> bool:
    """Whether `model`'s float32 CPU weights are small enough to stay in the caches while decoding."""
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.dtype is torch.float32]
    return sum(p.numel() * p.element_size() for p in params) < STREAMED_BYTES


def streams_weights(model: torch.nn.Module) -> bool:
    """Whether `model`'s decoding products should go through NumPy's BLAS: a CPU where it is the
    faster one, and float32 weights too big for the caches."""
    return NUMPY_ROWS_PRODUCT and not in_caches(model)


class _NumpyBlas:
    """Whether a decoding step is running (`decoding_threads`), and the thread count NumPy's BLAS
    was last given. Process-wide, as PyTorch's and OpenBLAS's thread pools are; one model thread
    decodes at a time (a second one would at worst take the slower, equally correct, MKL path)."""

    active = False
    threads: int | None = None


def rows_matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight_t [in, out] for a few rows of x, without gradients, on a CPU."""
    if _NumpyBlas.active and x.dtype is torch.float32 and weight_t.dtype is torch.float32:
        # as one [rows, in] matrix: NumPy would multiply a [B, 1, in] stack row by row, reading
        # the weights B times
        rows = x.detach().reshape(-1, x.size(-1)).numpy()
        return torch.from_numpy(np.matmul(rows, weight_t.numpy())).view(*x.shape[:-1], weight_t.size(1))
    return x @ weight_t


@contextmanager
def decoding_threads(blas_threads: int | None = None) -> Iterator[None]:
    """Run a decoding step's products through NumPy's BLAS, on `blas_threads` threads (default:
    those PyTorch has), with PyTorch on one thread meanwhile."""
    if _NumpyBlas.active:
        yield
        return
    threads = torch.get_num_threads()
    blas_threads = blas_threads or threads
    if blas_threads != _NumpyBlas.threads:  # ~0.5 ms: only when the count changes
        threadpoolctl.threadpool_limits(blas_threads, user_api="blas")
        _NumpyBlas.threads = blas_threads
    torch.set_num_threads(1)
    _NumpyBlas.active = True
    try:
        yield
    finally:
        _NumpyBlas.active = False
        torch.set_num_threads(threads)
