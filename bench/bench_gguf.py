"""The GGUF export run by llama.cpp itself, against `simone` on the same weights.

    python bench/bench_gguf.py                                # an untrained `cpu`-preset model
    python bench/bench_gguf.py --model runs/NAME              # a trained model (run, checkpoint, .tar.gz)
    python bench/bench_gguf.py --dtypes f32,q8_0 --json out.json

Needs llama-cpp-python (`pip install llama-cpp-python`: it builds llama.cpp from source, which
takes longer than the test budget allows, so this check lives here and `make test` reads the
file back with the `gguf` package instead).

For each --dtype the model is written with `simone export --format gguf` and loaded in
llama.cpp (CPU). Reported, per dtype:
- tokenizer: llama.cpp's own tokenizer (the GGUF's vocabulary, merges and "gpt-2" pre-tokenizer)
  against ours on a few hundred strings (Unicode, whitespace runs, special-token text);
- greedy: the same prompts, `--new-tokens` greedy tokens each (batch 1); "identical" says
  whether llama.cpp produced exactly our tokens;
- top-1: teacher-forced on our greedy text, the share of positions where llama.cpp's most
  likely next token is ours, and the largest logit difference;
- speed: new tokens/s of greedy decoding with a KV cache, ours (`model.generate`, float32) and
  llama.cpp's, median of --repeats, timed in alternation.
f32 must be identical (exit status 1 otherwise); quantized types report their agreement.

An untrained model's logits are nearly flat, so rounding alone would flip greedy ties: the
default model gets its embedding (tied with the output) scaled up and random norm weights,
which spreads the logits as training does. A trained model (--model) is used as it is.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import WORDS, random_model  # noqa: E402

DTYPES = ["f32", "f16", "bf16", "q8_0"]


def sharpened_random_model(preset_name: str):
    loaded = random_model(preset_name, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        loaded.model.tok_embeddings.weight.mul_(25.0)
    return loaded


def tokenizer_strings(domains: list[str], n_random: int = 300) -> list[str]:
    fixed = ["", " ", "  ", "\t", "\n", "\n\n\n", " \t \n ", "   leading", "trailing   ", "a  b   c    d",
             "line\r\nbreak", "In the beginning God created the heaven and the earth.", "café naïve résumé",
             "Ωμέγα λόγος", "Привет, мир", "中文字符测试", "日本語のテキスト", "한국어", "عربي",
             "emoji 🙂👍🏽 family 👨‍👩‍👧", "e\u0301 combining", "\u00a0nbsp\u2009thin", "zero\u200bwidth",
             "<|endoftext|>", "a<|endoftext|>b", "<|domain:x|>", "’quotes’ “double”", "do n't it's we'll I'M",
             "1234567 3.14159 1,000,000", "x" * 300]
    fixed += [f"<|domain:{d}|>The lord" for d in domains]
    rng = random.Random(0)
    pool = list("abcdefghij KLMNOP.,;:!?'\"-\n\t  0123") + list("éüß中文🙂ωж") + ["<|endoftext|>", "lord ", "  "]
    return fixed + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]


def make_prompts(tok, n: int, length: int) -> list[list[int]]:
    rng = random.Random(1)
    prompts = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        prompts.append(ids[:length])
    return prompts


@torch.no_grad()
def ours_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    steps = model.generate(torch.tensor([prompt]), n_new, temperature=0.0)
    return torch.cat(list(steps), 1)[0].tolist()


def timed_alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternation after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="run dir, checkpoint dir or .tar.gz (default: untrained)")
    ap.add_argument("--preset", default="cpu", help="shape of the untrained model")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from simone.inference.gguf_file import (llama_cpp_available, llama_cpp_greedy, llama_cpp_logits,
                                            open_in_llama_cpp, write_gguf)

    if not llama_cpp_available():
        print("bench_gguf: needs llama-cpp-python (pip install llama-cpp-python)", file=sys.stderr)
        return 2
    import llama_cpp

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.model:
        from simone.inference.load import load_model

        loaded = load_model(Path(args.model), device="cpu")
    else:
        loaded = sharpened_random_model(args.preset)
    model, tok, mcfg = loaded.model.eval(), loaded.tokenizer, loaded.config.model
    n_new = max(1, min(args.new_tokens, mcfg.max_seq_len - args.prompt_len))
    prompts = make_prompts(tok, args.prompts, args.prompt_len)
    print(f"bench_gguf: {loaded.source}  {model.num_params():,} params  dim {mcfg.dim} layers {mcfg.n_layers} "
          f"vocab {mcfg.vocab_size}  prompts {len(prompts)}×{args.prompt_len} new {n_new}  threads {threads}  "
          f"llama-cpp-python {llama_cpp.__version__}", flush=True)

    ours_out = [ours_greedy(model, p, n_new) for p in prompts]
    with torch.no_grad():
        ours_logits = [model(torch.tensor([p + o[:-1]]))[0][0].float().numpy() for p, o in zip(prompts, ours_out)]
    strings = tokenizer_strings(tok.domains)
    ours_ids = [tok.encode(s) for s in strings]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        for dtype in args.dtypes.split(","):
            path = write_gguf(model, loaded.config, loaded.files.get("tokenizer") or tok.path, tok.eod_id,
                              Path(tmp) / f"model-{dtype}.gguf", "bench", dtype)
            checker = open_in_llama_cpp(path, mcfg.max_seq_len, logits_all=True, threads=threads)
            theirs_ids = [checker.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in strings]
            tok_mismatch = [s for s, a, b in zip(strings, ours_ids, theirs_ids) if a != b]
            theirs_out = [llama_cpp_greedy(checker, p, n_new) for p in prompts]
            agree, total, max_diff = 0, 0, 0.0
            for p, o, want in zip(prompts, ours_out, ours_logits):
                got = llama_cpp_logits(checker, p + o[:-1])
                scored = slice(len(p) - 1, None)  # the positions that predict the continuation
                agree += int((got[scored].argmax(-1) == want[scored].argmax(-1)).sum())
                total += len(o)
                max_diff = max(max_diff, float(np.abs(got - want).max()))
            del checker

            runner = open_in_llama_cpp(path, mcfg.max_seq_len, threads=threads)
            secs = timed_alternating({"ours": lambda: ours_greedy(model, prompts[0], n_new),
                                      "llama.cpp": lambda: llama_cpp_greedy(runner, prompts[0], n_new)},
                                     args.repeats)
            del runner
            rows.append({
                "dtype": dtype, "file_mb": path.stat().st_size / 2**20,
                "tokenizer_mismatches": len(tok_mismatch), "tokenizer_strings": len(strings),
                "tokenizer_mismatch_examples": tok_mismatch[:3],
                "greedy_identical": theirs_out == ours_out,
                "greedy_identical_prompts": sum(a == b for a, b in zip(theirs_out, ours_out)),
                "top1_agreement": agree / total, "max_logit_diff": max_diff,
                "ours_tokens_per_s": n_new / secs["ours"], "llama_cpp_tokens_per_s": n_new / secs["llama.cpp"],
            })
            r = rows[-1]
            print(f"{dtype:>5}  {r['file_mb']:7.2f} MB  tokenizer {len(strings) - len(tok_mismatch)}/{len(strings)}  "
                  f"greedy identical {r['greedy_identical_prompts']}/{len(prompts)}  top-1 {r['top1_agreement']:.4f}  "
                  f"max |Δlogit| {max_diff:.2e}  tok/s ours {r['ours_tokens_per_s']:,.0f} "
                  f"llama.cpp {r['llama_cpp_tokens_per_s']:,.0f}", flush=True)
            for s in tok_mismatch[:3]:
                print(f"       tokenizer differs on {s!r}")

    f32 = [r for r in rows if r["dtype"] == "f32"]
    ok = all(r["greedy_identical"] for r in f32)
    result = {"kind": "gguf", "model": str(loaded.source), "new_tokens": n_new, "prompts": len(prompts),
              "threads": threads, "llama_cpp_python": llama_cpp.__version__, "f32_greedy_identical": ok,
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if f32:
        print("f32 greedy tokens identical to ours" if ok else "FAIL: f32 greedy tokens differ from ours")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
