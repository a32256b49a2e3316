"""Benchmarks that compare, in one run: our model against its peer, and the data preparation.

    simone bench train    [--preset cpu]    training tokens/s, ours vs transformers.LlamaForCausalLM
    simone bench generate [--preset cpu]    KV-cache generation tokens/s, batch 1 and batch 8
                                            (+ llama.cpp on the same weights, when installed)
    simone bench prep --corpus DIR          curate + tokenizer + shards: wall time and peak RSS

The peer is `transformers.LlamaForCausalLM` built from the same `ModelConfig` with a copy of
our weights (`simone.inference.export.to_hf_llama`): same vocabulary, width, depth, heads, SwiGLU size,
tied embeddings, sequence length, batch, optimizer (AdamW, decay on matrices only, fused
where available), dtype and data. Both models live in this process and are timed in
alternation, repeat after repeat, so load from other processes on the machine hits both
alike; tables show medians, and each returned dict has a top-level "ratio" (ours over the
peer; above 1 means ours is faster). `bench_prep` has no peer: it returns "seconds" and
"peak_rss_mb" (of this process and its workers together).

MFU uses the trainer's own peak-FLOPS function (`simone.train.metrics.peak_flops`: a table of
dense bf16 peaks for GPUs, a short matmul probe in the row's dtype on a CPU) and the model's
own FLOP count (`flops_per_token`: 6·N plus the attention term).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.table import Table
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from simone.config import Config, ModelConfig
from simone.config import preset as load_preset
from simone.data.curate import curate
from simone.data.shards import build_shards
from simone.data.tokenizer import train_tokenizer
from simone.devices import pick_device
from simone.inference import gguf_file
from simone.inference.export import to_hf_llama
from simone.model import LanguageModel, build_model
from simone.progress import Say
from simone.progress import quiet as say_nothing
from simone.rundir import atomic_write_json
from simone.train.metrics import cpu_peak_flops, mfu, peak_flops
from simone.train.optim import build_optimizer
from simone.train.precision import autocast_dtype


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (reported as one line by the CLI)."""


# The goals of issue 7 (shown beside the measured numbers).
GOALS = {"train": 1.2, "generate": 1.5, "prep_seconds": 60.0, "prep_peak_rss_mb": 2048.0}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) that fn takes."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_alternating(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Run every fn once per round, `warmup + repeats` rounds; time the last `repeats`.

    Returns {name: {"wall": [s...], "cpu": [s...], "first_s": wall time of the first call}}
    (the first call of a compiled model includes its compilation).
    """
    times: dict[str, dict[str, Any]] = {k: {"wall": [], "cpu": [], "first_s": None} for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            wall, cpu = _timed(fn, device)
            if r == 0:
                times[name]["first_s"] = wall
            if r >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def _rate(work: float, t: dict[str, Any]) -> dict[str, float]:
    """Throughput from a median wall time, and from the smallest CPU time (a single-threaded
    run's CPU time is barely touched by other processes on a shared machine)."""
    return {
        "per_s": work / statistics.median(t["wall"]),
        "per_cpu_s": work / min(t["cpu"]),
        "median_s": statistics.median(t["wall"]),
    }


# ----------------------------------------------------------------------------- setup


def bench_device(cfg: Config, device: str | None) -> torch.device:
    """`device` if given, else the preset's train.device ("auto": CUDA when present)."""
    name = device if device is not None else cfg.train.device
    dev = pick_device(name or "auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            f"preset {cfg.preset}: device {name} but no CUDA GPU is visible; "
            f"pass --device cpu to run this shape on the CPU anyway"
        )
    return dev


def _dtypes_for(device: torch.device, dtypes: Iterable[str] | None) -> list[str]:
    if dtypes:
        return list(dtypes)
    # bfloat16 autocast runs on every CPU (fast with AMX) and on recent GPUs; float32 on
    # a GPU is not how anyone trains, so the GPU default is bf16 only.
    return ["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]


def _preset_dtype(cfg: Config, device: torch.device) -> str:
    """The dtype `simone train` would compute in for this preset on this device."""
    dtype = autocast_dtype(cfg.train.dtype, device)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def model_pair(model_cfg: ModelConfig, device: torch.device, seed: int = 0):
    """(ours, hf): our Llama-style model and a `LlamaForCausalLM` with a copy of its weights."""
    if model_cfg.arch != "llama":
        raise ValueError(
            f"model.arch={model_cfg.arch!r}: the benchmark peer is "
            f"LlamaForCausalLM, so only the Llama-style model compares"
        )
    if model_cfg.governance:  # the peer has no governance parts (h100/h200 train them): time the plain shape
        model_cfg = dataclasses.replace(model_cfg, governance=False)
    torch.manual_seed(seed)
    ours = build_model(model_cfg).to(device)
    return ours, to_hf_llama(ours)


def hf_optimizer(
    hf: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str
) -> torch.optim.AdamW:
    """The peer's AdamW set up as ours is (`simone.train.optim.build_optimizer`): decay on
    parameters with ≥2 dimensions only, fused kernel on CPU and CUDA."""
    params = [p for p in hf.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _header(cfg: Config, m: ModelConfig, device: torch.device, n_params: int, extra: str = "") -> str:
    return (
        f"preset {cfg.preset}  device {device}  threads {torch.get_num_threads()}  "
        f"params {n_params / 1e6:.2f}M  dim {m.dim}  layers {m.n_layers}  heads {m.n_heads}"
        f"  kv_heads {m.n_kv_heads or m.n_heads}  vocab {m.vocab_size}  seq {m.max_seq_len}"
        f"{extra}"
    )


def _table(title: str, columns: list[str], rows: list[list[str]], caption: str = "") -> Table:
    """A rich table: the first column left-aligned, the numbers right."""
    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def tables(result: dict[str, Any]) -> list[Table]:
    """The tables of a benchmark's result, for the console (the caller prints them)."""
    return {"train": _train_tables, "generate": _generate_tables, "prep": _prep_tables}[result["kind"]](result)


def _write_json(result: dict[str, Any], json_path: str | Path | None) -> None:
    if json_path:
        atomic_write_json(Path(json_path), result)


# ----------------------------------------------------------------------------- train


def bench_train(
    preset: str = "cpu",
    *,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    device: str | None = None,
    batch: int | None = None,
    dtypes: Iterable[str] | None = None,
    compile: bool | None = None,
    model_cfg: ModelConfig | None = None,
    json_path: str | Path | None = None,
    quiet: bool = False,
    say: Say = say_nothing,
) -> dict[str, Any]:
    """Training tokens/s (forward, backward, AdamW step on a fixed random batch) of our
    model against `LlamaForCausalLM` with the same config and weights.

    Rows: for each dtype (default float32 and bfloat16 on a CPU, bfloat16 on a GPU) ours
    eager vs HF eager and, with compile (default True; each compilation takes tens of
    seconds, not counted in the medians), ours compiled vs HF eager and ours compiled vs HF
    compiled. The top-level "ratio" is the headline row: the preset's dtype, ours the way
    `simone train` runs it (compiled iff the preset compiles) against HF eager.
    `model_cfg` replaces the preset's model shape (tests use a tiny one). `say` hears the
    model's shape before the timing starts (unless `quiet`); `tables(result)` shows the result.
    """
    _set_threads(threads)
    cfg = load_preset(preset)
    mcfg = model_cfg or cfg.model
    dev = bench_device(cfg, device)
    batch = batch or cfg.train.batch_size
    seq = mcfg.max_seq_len
    dtype_list = _dtypes_for(dev, dtypes)
    headline_dtype = _preset_dtype(cfg, dev)
    if headline_dtype not in dtype_list:
        dtype_list.insert(0, headline_dtype)
    do_compile = True if compile is None else compile
    headline_compiled = cfg.train.compile and do_compile

    ours, hf = model_pair(mcfg, dev)
    ours.train()
    hf.train()
    tc = cfg.train
    opt_ours = build_optimizer(ours, "adamw", tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), dev.type)
    opt_hf = hf_optimizer(hf, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), dev.type)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    x, y = data[:, :-1], data[:, 1:]
    models = {"ours": ours, "hf": hf}
    if do_compile:
        models["ours_compiled"] = torch.compile(ours)
        models["hf_compiled"] = torch.compile(hf)

    def step_fn(name: str, dtype: str) -> Callable[[], None]:
        model = models[name]
        opt = opt_ours if name.startswith("ours") else opt_hf

        def step() -> None:
            with _autocast(dev, dtype):
                if name.startswith("ours"):
                    _, loss = model(x, y)
                else:  # HF shifts the labels itself: the same next-token task
                    loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    peaks = {dtype: _peak_for(peak_flops, dev, dtype) for dtype in dtype_list}
    flops = ours.flops_per_token(seq)
    tokens = batch * seq
    n_params = ours.num_params()
    if not quiet:
        say(_header(cfg, mcfg, dev, n_params, f"  batch {batch}"))
    rates: dict[str, dict[str, dict[str, float]]] = {}
    compile_s: dict[str, dict[str, float]] = {}
    for dtype in dtype_list:
        fns = {name: step_fn(name, dtype) for name in models}
        times = time_alternating(fns, repeats, warmup, dev)
        rates[dtype] = {name: _rate(tokens, t) for name, t in times.items()}
        compile_s[dtype] = {name: t["first_s"] for name, t in times.items() if "compiled" in name}
    if dev.type == "cpu":
        # Probe the CPU peak again now and keep the larger: a probe that another process
        # disturbed reads low, and MFU over 100% would follow.
        for dtype in dtype_list:
            peaks[dtype] = max(peaks[dtype] or 0.0, cpu_peak_flops.__wrapped__(getattr(torch, dtype)))
    peak = peaks[headline_dtype]

    pairs = [("ours eager", "ours", "HF eager", "hf")]
    if do_compile:
        pairs += [
            ("ours compiled", "ours_compiled", "HF eager", "hf"),
            ("ours compiled", "ours_compiled", "HF compiled", "hf_compiled"),
        ]
    rows = []
    for dtype in dtype_list:
        for ours_label, ours_key, peer_label, peer_key in pairs:
            a, b = rates[dtype][ours_key], rates[dtype][peer_key]
            rows.append(
                {
                    "dtype": dtype,
                    "ours": ours_label,
                    "peer": peer_label,
                    "ours_tokens_per_s": a["per_s"],
                    "peer_tokens_per_s": b["per_s"],
                    "ratio": a["per_s"] / b["per_s"],
                    "ratio_cpu_time": a["per_cpu_s"] / b["per_cpu_s"],
                    "ours_mfu": mfu(flops, a["per_s"], peaks[dtype]),
                    "peer_mfu": mfu(flops, b["per_s"], peaks[dtype]),
                }
            )
    headline_ours = "ours compiled" if headline_compiled else "ours eager"
    headline = next(
        r for r in rows if r["dtype"] == headline_dtype and r["ours"] == headline_ours and r["peer"] == "HF eager"
    )
    result = {
        "kind": "train",
        "preset": cfg.preset,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "ratio": headline["ratio"],
        "headline": f"{headline_ours} vs HF eager, {headline_dtype}",
        "goal": GOALS["train"],
        "config": {
            "dim": mcfg.dim,
            "n_layers": mcfg.n_layers,
            "n_heads": mcfg.n_heads,
            "n_kv_heads": mcfg.n_kv_heads or mcfg.n_heads,
            "vocab_size": mcfg.vocab_size,
            "seq_len": seq,
            "batch": batch,
            "params": n_params,
        },
        "flops_per_token": flops,
        "peak_flops": peak,
        "peak_flops_by_dtype": peaks,
        "repeats": repeats,
        "warmup": warmup,
        "rows": rows,
        "compile_s": compile_s,
    }
    _write_json(result, json_path)
    return result


def _peak_for(peak_flops: Callable[..., float | None], device: torch.device, dtype: str) -> float | None:
    """The device's peak FLOP/s for `dtype`, from the trainer's function (a matmul probe in
    that dtype on a CPU, where AMX makes bf16 several times faster than float32; the bf16
    table on a GPU, which says nothing about float32, so a GPU float32 row gets no MFU)."""
    if device.type == "cuda" and dtype == "float32":
        return None
    return peak_flops(device, dtype=getattr(torch, dtype))


def _fmt_mfu(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _train_tables(result: dict[str, Any]) -> list[Table]:
    rows = [
        [
            r["dtype"],
            r["ours"],
            r["peer"],
            f"{r['ours_tokens_per_s']:,.0f}",
            f"{r['peer_tokens_per_s']:,.0f}",
            f"{r['ratio']:.2f}x",
            f"{r['ratio_cpu_time']:.2f}x",
            _fmt_mfu(r["ours_mfu"]),
            _fmt_mfu(r["peer_mfu"]),
        ]
        for r in result["rows"]
    ]
    peak_txt = ", ".join(
        f"{d} {'unknown' if not v else f'{v / 1e9:,.0f} GFLOP/s'}" for d, v in result["peak_flops_by_dtype"].items()
    )
    compile_txt = "; ".join(
        f"{d}: " + ", ".join(f"{k} {v:.0f} s" for k, v in c.items()) for d, c in result["compile_s"].items() if c
    )
    return [
        _table(
            f"train tokens/s (median of {result['repeats']}), ours / transformers.LlamaForCausalLM",
            ["dtype", "ours", "peer", "ours tok/s", "peer tok/s", "ratio", "ratio (CPU time)", "ours MFU", "peer MFU"],
            rows,
            f"headline ({result['headline']}): {result['ratio']:.2f}x, goal ≥ {result['goal']}x.  "
            f"MFU = flops_per_token·tok/s / peak ({peak_txt}"
            f"{'; CPU: matmul probe' if result['device'] == 'cpu' else ''}); "
            f"load average {result['load_average']:.1f}."
            + (f"\nfirst call incl. compile: {compile_txt}" if compile_txt else ""),
        )
    ]


# ----------------------------------------------------------------------------- generate


def bench_generate(
    preset: str = "cpu",
    *,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    device: str | None = None,
    batches: Iterable[int] = (1, 8),
    dtypes: Iterable[str] | None = None,
    prompt_len: int = 16,
    new_tokens: int = 128,
    sampling: bool = True,
    compile: bool = False,
    model_cfg: ModelConfig | None = None,
    json_path: str | Path | None = None,
    quiet: bool = False,
    say: Say = say_nothing,
) -> dict[str, Any]:
    """New tokens/s of greedy decoding with a KV cache: our `generate` against
    `LlamaForCausalLM.generate(do_sample=False)` (its default dynamic cache) on the same
    weights, for each batch size and dtype. Both run under `torch.no_grad` in eval mode.
    dtypes default to float32 (how `simone generate` runs: the checkpoint's weights, no
    autocast) and bfloat16 autocast; the first is the headline dtype. With `sampling`, also
    "sample" rows in it: temperature 0.8, top-k 50, top-p 0.95 (the `simone generate`
    defaults) on both sides. With `compile`, also greedy rows in it where our forward is
    `torch.compile(dynamic=True)`d (applied from outside, to a copy: `simone generate`
    itself runs eager), against HF eager.

    The top-level "ratio" is the smallest greedy eager ratio over the batch sizes in the
    headline dtype. "same_tokens" says whether both produced identical tokens (greedy ties can break
    differently in bfloat16 or on a random-init model's flat logits; sampled tokens differ
    since the two draw random numbers differently).

    When llama-cpp-python is installed, "llama_cpp" also holds a second peer: the same weights
    written as an f32 GGUF file and run by llama.cpp, greedy at batch 1 against ours in float32
    (`_llama_cpp_peer`); it is [] otherwise. `say` hears the model's shape first (unless
    `quiet`); `tables(result)` shows the result.
    """
    _set_threads(threads)
    cfg = load_preset(preset)
    mcfg = model_cfg or cfg.model
    dev = bench_device(cfg, device)
    # `simone generate` runs the checkpoint's float32 weights without autocast: that is the
    # headline; bf16 autocast rows show what lower precision does.
    dtype_list = list(dtypes) if dtypes else ["float32", "bfloat16"]
    headline_dtype = dtype_list[0]
    ours, hf = model_pair(mcfg, dev)
    ours.eval()
    hf.eval()
    n_new = max(1, min(new_tokens, mcfg.max_seq_len - prompt_len))
    if not quiet:
        say(_header(cfg, mcfg, dev, ours.num_params(), f"  prompt {prompt_len}  new {n_new}"))

    runners = {"eager": ours}
    if compile:
        # One graph for every cache length and batch size (dynamic shapes), compiled on the
        # first call of each row's warm-up.
        runners["compiled"] = copy.deepcopy(ours)
        runners["compiled"].forward = torch.compile(runners["compiled"].forward, dynamic=True)
    cases = [(dtype, b, "greedy", "eager") for dtype in dtype_list for b in batches]
    if sampling:
        cases += [(headline_dtype, b, "sample", "eager") for b in batches]
    if compile:
        cases += [(headline_dtype, b, "greedy", "compiled") for b in batches]

    def measure(dtype: str, b: int, mode: str, runner: str) -> dict[str, Any]:
        """One row: ours (`runner`) against the peer at batch `b`, decoding `mode`, in `dtype`."""
        model = runners[runner]
        g = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, mcfg.vocab_size, (b, prompt_len), generator=g).to(dev)
        out: dict[str, torch.Tensor] = {}
        ours_kw: dict[str, Any] = {"temperature": 0.0}
        hf_kw: dict[str, Any] = {"do_sample": False}
        if mode == "sample":
            ours_kw = {
                "temperature": 0.8,
                "top_k": 50,
                "top_p": 0.95,
                "generator": torch.Generator(device=dev).manual_seed(3),
            }
            hf_kw = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}

        def gen_ours() -> None:
            with torch.no_grad(), _autocast(dev, dtype):
                out["ours"] = torch.cat(list(model.generate(prompt, n_new, **ours_kw)), 1)

        def gen_hf() -> None:
            with torch.no_grad(), _autocast(dev, dtype):
                seq = hf.generate(
                    prompt,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    use_cache=True,
                    pad_token_id=0,
                    eos_token_id=None,
                    **hf_kw,
                )
            out["hf"] = seq[:, prompt_len:]

        times = time_alternating({"ours": gen_ours, "hf": gen_hf}, repeats, warmup, dev)
        a, p = _rate(b * n_new, times["ours"]), _rate(b * n_new, times["hf"])
        return {
            "dtype": dtype,
            "batch": b,
            "mode": mode,
            "ours": runner,
            "first_s": times["ours"]["first_s"],
            "ours_tokens_per_s": a["per_s"],
            "peer_tokens_per_s": p["per_s"],
            "ratio": a["per_s"] / p["per_s"],
            "ratio_cpu_time": a["per_cpu_s"] / p["per_cpu_s"],
            "ours_ms_per_step": 1000 * a["median_s"] / n_new,
            "peer_ms_per_step": 1000 * p["median_s"] / n_new,
            "same_tokens": bool(torch.equal(out["ours"], out["hf"])),
        }

    rows = [measure(*case) for case in cases]
    llama_cpp_rows = _llama_cpp_peer(ours, mcfg, prompt_len, n_new, repeats, warmup, dev)
    headline_rows = [r for r in rows if r["dtype"] == headline_dtype and r["mode"] == "greedy" and r["ours"] == "eager"]
    sampled = [r["ratio"] for r in rows if r["mode"] == "sample"]
    compiled = [r["ratio"] for r in rows if r["ours"] == "compiled"]
    result = {
        "kind": "generate",
        "preset": cfg.preset,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "ratio": min(r["ratio"] for r in headline_rows),
        "headline": f"smallest greedy ratio over batch sizes {list(batches)}, {headline_dtype}",
        "ratio_sampled": min(sampled) if sampled else None,
        "ratio_compiled": min(compiled) if compiled else None,
        "goal": GOALS["generate"],
        "config": {
            "dim": mcfg.dim,
            "n_layers": mcfg.n_layers,
            "n_heads": mcfg.n_heads,
            "vocab_size": mcfg.vocab_size,
            "seq_len": mcfg.max_seq_len,
            "prompt_len": prompt_len,
            "new_tokens": n_new,
            "params": ours.num_params(),
        },
        "repeats": repeats,
        "warmup": warmup,
        "rows": rows,
        "llama_cpp": llama_cpp_rows,
    }
    _write_json(result, json_path)
    return result


# the generate tables: column -> the format of its cell (`str.format_map` of a row)
GENERATE_COLUMNS = {
    "dtype": "{dtype}",
    "batch": "{batch}",
    "decoding": "{mode}",
    "ours": "{ours}",
    "ours tok/s": "{ours_tokens_per_s:,.0f}",
    "peer tok/s": "{peer_tokens_per_s:,.0f}",
    "ratio": "{ratio:.2f}x",
    "ratio (CPU time)": "{ratio_cpu_time:.2f}x",
    "ours ms/step": "{ours_ms_per_step:.2f}",
    "peer ms/step": "{peer_ms_per_step:.2f}",
    "same tokens": "{same_tokens}",
}
LLAMA_CPP_COLUMNS = {
    "gguf": "{gguf}",
    "batch": "{batch}",
    "decoding": "{mode}",
    "ours tok/s": "{ours_tokens_per_s:,.0f}",
    "llama.cpp tok/s": "{peer_tokens_per_s:,.0f}",
    "ratio": "{ratio:.2f}x",
    "ours ms/step": "{ours_ms_per_step:.2f}",
    "llama.cpp ms/step": "{peer_ms_per_step:.2f}",
    "same tokens": "{same_tokens}",
}


def _generate_tables(result: dict[str, Any]) -> list[Table]:
    rows, llama_cpp_rows, repeats = result["rows"], result["llama_cpp"], result["repeats"]
    compiled = [r for r in rows if r["ours"] == "compiled"]
    out = [
        _table(
            f"generate tokens/s (KV cache, median of {repeats}), ours / LlamaForCausalLM.generate",
            list(GENERATE_COLUMNS),
            [[cell.format_map(r) for cell in GENERATE_COLUMNS.values()] for r in rows],
            f"headline ({result['headline']}): {result['ratio']:.2f}x, goal ≥ {result['goal']}x; "
            f"load average {result['load_average']:.1f}."
            + (
                ""
                if result["ratio_sampled"] is None
                else " sample: temperature 0.8, top-k 50, top-p 0.95 on both sides."
            )
            + (
                ""
                if not compiled
                else f" compiled: torch.compile(dynamic=True) of our forward "
                f"(first call incl. compile {max(r['first_s'] for r in compiled):.0f} s)"
                f" vs HF eager: {result['ratio_compiled']:.2f}x."
            ),
        )
    ]
    if llama_cpp_rows:
        out.append(
            _table(
                f"generate tokens/s (median of {repeats}), ours / llama.cpp on the same weights (GGUF)",
                list(LLAMA_CPP_COLUMNS),
                [[cell.format_map(r) for cell in LLAMA_CPP_COLUMNS.values()] for r in llama_cpp_rows],
                f"ours: float32 on {result['device']}; llama.cpp: llama-cpp-python {llama_cpp_rows[0]['llama_cpp_python']}"
                + (
                    " (every layer offloaded, if its build has a GPU backend)"
                    if result["device"].startswith("cuda")
                    else " on the CPU"
                )
                + ", running the model as written by `simone export --format gguf`.",
            )
        )
    return out


def _bytes_only_tokenizer(path: Path) -> Path:
    """A byte-level BPE `tokenizer.json` of <|endoftext|>, the 256 bytes and one merge: the
    random benchmark model has no trained tokenizer, and llama.cpp wants a vocabulary (with merges)."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    vocab["Ġt"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def _llama_cpp_peer(
    ours: LanguageModel, mcfg: ModelConfig, prompt_len: int, n_new: int, repeats: int, warmup: int, dev: torch.device
) -> list[dict[str, Any]]:
    """Greedy decoding at batch 1, ours (float32) against llama.cpp running the same weights
    as an f32 GGUF file; [] when llama-cpp-python is not installed."""
    if not gguf_file.llama_cpp_available() or mcfg.vocab_size < 258:
        return []
    import llama_cpp  # noqa: PLC0415  # deferred: optional (llama-cpp-python), checked for just above

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, mcfg.vocab_size, (1, prompt_len), generator=g)
    out: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="simone-bench-gguf-") as tmp:
        cfg = Config(model=mcfg)
        path = gguf_file.write_gguf(
            ours, cfg, _bytes_only_tokenizer(Path(tmp) / "tokenizer.json"), 0, Path(tmp) / "model.gguf", "bench", "f32"
        )
        llm = gguf_file.open_in_llama_cpp(
            path, mcfg.max_seq_len, threads=torch.get_num_threads(), gpu=dev.type == "cuda"
        )

        def gen_ours() -> None:
            with torch.no_grad():
                steps = ours.generate(prompt.to(dev), n_new, temperature=0.0)
                out["ours"] = torch.cat(list(steps), 1)[0].tolist()

        def gen_llama_cpp() -> None:
            out["llama.cpp"] = gguf_file.llama_cpp_greedy(llm, prompt[0].tolist(), n_new)

        times = time_alternating({"ours": gen_ours, "llama.cpp": gen_llama_cpp}, repeats, warmup, dev)
        llm = None  # llama.cpp's model freed before its file is removed
    a, p = _rate(n_new, times["ours"]), _rate(n_new, times["llama.cpp"])
    return [
        {
            "gguf": "f32",
            "batch": 1,
            "mode": "greedy",
            "ours_tokens_per_s": a["per_s"],
            "peer_tokens_per_s": p["per_s"],
            "ratio": a["per_s"] / p["per_s"],
            "ours_ms_per_step": 1000 * a["median_s"] / n_new,
            "peer_ms_per_step": 1000 * p["median_s"] / n_new,
            "same_tokens": out["ours"] == out["llama.cpp"],
            "llama_cpp_python": llama_cpp.__version__,
        }
    ]


# ----------------------------------------------------------------------------- prep


class ResourceMeter:
    """Wall time, CPU time and peak RSS of the code inside a `with` block, counting this
    process and its child processes (the worker pools) together; RSS is sampled every 20 ms,
    so a spike shorter than that can be missed. The sum of RSS counts a page that forked
    processes share once in each: `peak_pss` (where the system reports PSS, which splits a
    shared page between its processes; sampled every `pss_every` samples, as it costs ~5 ms a
    process to read) is what the tree really holds. The child processes are listed again every
    `list_every` samples (listing reads every process of the system: too dear every 20 ms)."""

    def __init__(self, name: str, interval_s: float = 0.02, pss_every: int = 25, list_every: int = 10):
        self.name = name
        self.interval_s = interval_s
        self.pss_every, self.list_every = pss_every, list_every
        self.proc = psutil.Process()
        self.procs = [self.proc]
        self.wall = self.cpu = 0.0
        self.peak = self.peak_pss = 0

    def _tree_rss(self, pss: bool = False, relist: bool = True) -> int:
        if relist:
            self.procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error, AttributeError):  # exited since listed; no PSS here
                total += proc.memory_full_info().pss if pss else proc.memory_info().rss
        return total

    def _cpu_s(self) -> float:
        t = self.proc.cpu_times()  # children_*: workers that have been waited for
        return t.user + t.system + t.children_user + t.children_system

    def _sample(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            self.peak = max(self.peak, self._tree_rss(relist=n % self.list_every == 0))
            if n % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, self._tree_rss(pss=True, relist=False))

    def __enter__(self) -> ResourceMeter:
        self.peak = self._tree_rss()
        self.peak_pss = self._tree_rss(pss=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.cpu0 = self._cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = self._cpu_s() - self.cpu0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._tree_rss())

    def row(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "seconds": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "cores_used": round(self.cpu / max(self.wall, 1e-9), 2),
            "peak_rss_mb": round(self.peak / 2**20, 1),
            "peak_pss_mb": round(self.peak_pss / 2**20, 1),
        }


def bench_prep(
    corpus: str | Path,
    *,
    preset: str = "cpu",
    out_dir: str | Path | None = None,
    threads: int | None = None,
    vocab_size: int | None = None,
    json_path: str | Path | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Time `simone prepare` on `corpus`: curate → tokenizer training → shards, each stage
    measured (wall, CPU seconds, cores used, peak RSS of the process tree). `workers`: as
    `simone prepare --workers` (default: one per core); the tokenizer's threads follow it only
    when this process has not trained or used a tokenizer in parallel yet.

    Writes into `out_dir` (a fresh temporary folder, removed afterwards, when None).
    Returns {"kind": "prep", "seconds", "peak_rss_mb", "stages": [...], ...}; `tables(result)`
    shows it.
    """
    _set_threads(threads)
    cfg = load_preset(preset)
    if vocab_size:
        cfg.tokenizer.vocab_size = vocab_size
    if workers:
        cfg.curate.workers = workers
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))  # read when the Rust thread pool starts
    corpus = Path(corpus)
    if not corpus.exists():
        raise BenchError(f"{corpus}: corpus folder not found")
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="simone-bench-prep-")
        out = Path(tmp)
    else:
        out = Path(out_dir)
        shutil.rmtree(out, ignore_errors=True)  # every stage runs fresh
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    stages = []
    try:
        with ResourceMeter("total", interval_s=1.0) as total:  # the stages' meters sample closely
            with ResourceMeter("curate") as m:
                curate(corpus, data_dir, cfg)
            stages.append(m.row())
            documents = data_dir / "documents.jsonl"
            with ResourceMeter("tokenizer") as m:
                tok = train_tokenizer(documents, out / "tokenizer", cfg.tokenizer)
            stages.append(m.row())
            with ResourceMeter("shards") as m:
                index = build_shards(documents, tok, data_dir, cfg.data.control_token_prob, workers=cfg.curate.workers)
            stages.append(m.row())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    splits = {
        s: {k: v.get(k) for k in ("n_tokens", "n_bytes")} | {"n_docs": len(v.get("docs", []))}
        for s, v in index["splits"].items()
    }
    result = {
        "kind": "prep",
        "preset": cfg.preset,
        "corpus": str(corpus),
        "seconds": round(total.wall, 3),
        "peak_rss_mb": round(max(total.peak / 2**20, *(s["peak_rss_mb"] for s in stages)), 1),
        "peak_pss_mb": round(max(total.peak_pss / 2**20, *(s["peak_pss_mb"] for s in stages)), 1),
        "cpu_s": round(total.cpu, 3),
        "cores_used": round(total.cpu / max(total.wall, 1e-9), 2),
        "cores": os.cpu_count(),
        "workers": cfg.curate.workers or os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "goal": {"seconds": GOALS["prep_seconds"], "peak_rss_mb": GOALS["prep_peak_rss_mb"]},
        "vocab_size": tok.vocab_size,
        "stages": stages,
        "splits": splits,
    }
    _write_json(result, json_path)
    return result


def _prep_tables(result: dict[str, Any]) -> list[Table]:
    stages, splits = result["stages"], result["splits"]
    rows = [
        [
            s["stage"],
            f"{s['seconds']:.1f}",
            f"{s['cpu_s']:.1f}",
            f"{s['cores_used']:.2f}",
            f"{s['peak_rss_mb']:,.0f}",
            f"{s['peak_pss_mb']:,.0f}",
        ]
        for s in [*stages, {**result, "stage": "total"}]
    ]
    tokens = ", ".join(f"{s} {v['n_tokens']:,} tokens / {v['n_docs']} docs" for s, v in splits.items())
    return [
        _table(
            f"prepare {result['corpus']} (curate + tokenizer + shards), preset {result['preset']}, "
            f"{result.get('workers', result['cores'])} workers",
            ["stage", "seconds", "CPU s", "cores used", "peak RSS MB", "peak PSS MB"],
            rows,
            f"goal ≤ {GOALS['prep_seconds']:.0f} s and ≤ {GOALS['prep_peak_rss_mb']:,.0f} MB on "
            f"{result['cores']} cores (load average {result['load_average']:.1f}); "
            f"vocab {result['vocab_size']}; {tokens}",
        )
    ]
