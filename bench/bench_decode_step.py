"""The NumPy decoding step against the PyTorch flat step it replaced, side by side in one run.

    python bench/bench_decode_step.py                          # the `cpu` shape, batch 1, 2 threads
    python bench/bench_decode_step.py --preset h100 --batch 8  # the 110M shape (random weights)

`generate` (greedy, KV cache) on one model and prompt, alternating the two decoders each round:
the default `CachedDecoder` (the NumPy step where `cpu_blas` picks it) and the same decoder with
its NumPy plan taken away (PyTorch's `decode.decode_step`, with NumPy's products only where the
weights are streamed, as before the NumPy step). Prints the median milliseconds a step of each,
their ratio, and whether both gave the same tokens. The peers against llama.cpp and
`transformers` are `simone bench generate`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simone.config import preset  # noqa: E402
from simone.devices import cpu_model  # noqa: E402
from simone.model import build_model  # noqa: E402
from simone.model.base import CachedDecoder  # noqa: E402
from simone.model.cpu_blas import streams_weights  # noqa: E402


def decoder(model, prompt: torch.Tensor, n_new: int, numpy_step: bool) -> CachedDecoder:
    d = CachedDecoder(model, prompt, n_new)
    if not numpy_step:
        d.numpy_plan = None
        d.blas_threads = d.blas_threads if streams_weights(model) else None  # NumPy's products: streamed weights only
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens (at most the context less the prompt)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(preset(args.preset).model, governance=False)  # the plain model: the flat steps' case
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt_len = 16
    n_new = max(1, min(args.tokens, cfg.max_seq_len - prompt_len))
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, prompt_len), generator=torch.Generator().manual_seed(2))

    def run(numpy_step: bool) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            d = decoder(model, prompt, n_new, numpy_step)
            out = torch.cat(list(model.generate(prompt, n_new, temperature=0.0, decoder=d)), 1)
        return (time.perf_counter() - start) / n_new, out

    arms = {"numpy step": True, "pytorch step": False}
    for numpy_step in arms.values():  # warm-up
        run(numpy_step)
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for arm, numpy_step in arms.items():
            s, tokens[arm] = run(numpy_step)
            seconds[arm].append(s)
    ms = {a: 1000 * statistics.median(v) for a, v in seconds.items()}
    print(
        f"preset {args.preset} ({model.num_params() / 1e6:.2f}M), batch {args.batch}, {args.threads} threads, "
        f"{n_new} new tokens, median of {args.rounds} (CPU: {cpu_model()})"
    )
    for arm, value in ms.items():
        print(f"  {arm:13s} {value:8.3f} ms a step")
    same = torch.equal(tokens["numpy step"], tokens["pytorch step"])
    print(f"  pytorch / numpy: {ms['pytorch step'] / ms['numpy step']:.2f}x; same tokens: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
