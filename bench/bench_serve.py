"""Serving throughput and latency: `simone serve` under 1 and 8 concurrent clients.

    python bench/bench_serve.py                                  # a random `cpu`-preset model
    python bench/bench_serve.py --model runs/NAME                # a trained model
    python bench/bench_serve.py --preset h200 --device cuda --max-tokens 128

Starts the server in this process on a free loopback port and drives it over HTTP (httpx,
OpenAI's wire format) from C threads at once, each sending R streaming completion requests one
after another (a prompt of P token ids, greedy, up to --max-tokens new tokens). For each C it
reports completion tokens/s over the whole run, request latency p50/p95 and time to first
token p50/p95. The peer, measured in the same run: the same prompts through the model's own
`generate` in this process, one after another (no HTTP, no queue); `vs direct` is the
server's tokens/s over that.

The server runs requests one at a time on one model thread (a FIFO queue, no batching), so
8 clients get about the same total tokens/s as one, and each waits for the others: latency
and time to first token grow with the queue.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

WORDS = "lord god heaven earth light love heart rose summer congress people state law liberty union".split()


def random_model(preset_name: str, device: str):
    """An untrained model of the preset's shape with a small byte-level tokenizer (for speed
    only: its text is noise)."""
    from simone.config import TokenizerConfig, preset
    from simone.devices import pick_device
    from simone.inference.load import LoadedModel
    from simone.model import build_model
    from simone.data.tokenizer import train_tokenizer

    cfg = preset(preset_name)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    rng = random.Random(0)
    with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
        for i in range(20):
            text = " ".join(rng.choice(WORDS) for _ in range(400))
            f.write(json.dumps({"id": str(i), "domain": "d", "split": "train", "text": text}) + "\n")
    tok = train_tokenizer(tmp / "documents.jsonl", tmp / "tok", TokenizerConfig(vocab_size=512, min_frequency=1))
    cfg.model.vocab_size = tok.vocab_size
    dev = pick_device(device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, config=cfg, source=Path(f"random-{preset_name}"),
                       weights=tmp / "none.safetensors", device=dev)


def make_prompts(loaded, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` token ids."""
    rng = random.Random(1)
    prompts = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            ids += loaded.tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        prompts.append(ids[:length])
    return prompts


def run_clients(url: str, name: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """`clients` threads split `prompts` between them; returns the measurements."""
    import httpx

    records: list[tuple[float, float, int]] = []  # latency, time to first token, tokens
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(mine: list[list[int]]) -> None:
        # httpx, not the openai client: its per-chunk objects would take CPU (and the GIL)
        # from the server that shares this process
        with httpx.Client(base_url=url, timeout=3600) as c:
            start.wait()
            for prompt in mine:
                t0 = time.perf_counter()
                first, n = None, 0
                body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                with c.stream("POST", "/completions", json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                            first = time.perf_counter()
                        if chunk.get("usage"):
                            n = chunk["usage"]["completion_tokens"]
                end = time.perf_counter()
                with lock:
                    records.append((end - t0, (first or end) - t0, n))

    threads = [threading.Thread(target=client, args=(prompts[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latency, ttft, tokens = (np.array(x, dtype=float) for x in zip(*records))
    return {"clients": clients, "requests": len(records), "tokens": int(tokens.sum()), "seconds": wall,
            "tokens_per_s": tokens.sum() / wall,
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95))}


def run_direct(loaded, prompts: list[list[int]], max_tokens: int) -> dict:
    """The peer: the same prompts through the model's own generate, one after another."""
    latencies, n_tokens = [], 0
    t0 = time.perf_counter()
    for prompt in prompts:
        t = time.perf_counter()
        idx = torch.tensor([prompt], device=loaded.device)
        for token in loaded.model.generate(idx, max_tokens, temperature=0.0, eos_id=loaded.tokenizer.eod_id):
            n_tokens += 1
            if int(token[0, 0]) == loaded.tokenizer.eod_id:
                break
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"clients": 1, "requests": len(prompts), "tokens": n_tokens, "seconds": wall,
            "tokens_per_s": n_tokens / wall, "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p95_s": float(np.percentile(lat, 95)), "ttft_p50_s": None, "ttft_p95_s": None}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def print_table(result: dict) -> None:
    print(result["header"])
    columns = ["mode", "clients", "requests", "tokens/s", "latency p50", "p95", "TTFT p50", "p95", "vs direct"]
    rows = []
    direct = result["direct"]["tokens_per_s"]
    for mode, r in [("direct (generate)", result["direct"])] + [("simone serve", r) for r in result["served"]]:
        rows.append([mode, str(r["clients"]), str(r["requests"]), f"{r['tokens_per_s']:.1f}",
                     _ms(r["latency_p50_s"]), _ms(r["latency_p95_s"]), _ms(r["ttft_p50_s"]), _ms(r["ttft_p95_s"]),
                     f"{r['tokens_per_s'] / direct:.2f}x"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    for row in [columns] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="run dir, checkpoint dir or .tar.gz (default: a random model)")
    ap.add_argument("--preset", default="cpu", help="shape of the random model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--concurrency", type=int, action="append", default=None,
                    help="concurrent clients (repeatable; default 1 and 8)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    from simone.inference.load import load_model
    from simone.inference.serve import model_name, start_background_server

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(Path(args.model), device=args.device) if args.model else random_model(args.preset, args.device)
    context = loaded.config.model.max_seq_len
    prompt_tokens = min(args.prompt_tokens, context - 1)
    max_tokens = min(args.max_tokens, context - prompt_tokens)
    concurrency = args.concurrency or [1, 8]
    prompts = make_prompts(loaded, max(concurrency) * args.requests, prompt_tokens)
    m = loaded.config.model
    header = (f"model {model_name(loaded.source)}  device {loaded.device}  threads {torch.get_num_threads()}  "
              f"dim {m.dim}  layers {m.n_layers}  vocab {m.vocab_size}  prompt {prompt_tokens} tokens  "
              f"max_tokens {max_tokens}  greedy, streaming")

    server = start_background_server(loaded)
    try:
        run_clients(server.url, model_name(loaded.source), prompts[:1], 1, max_tokens)  # warm-up
        run_direct(loaded, prompts[:1], max_tokens)
        result = {"header": header, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                  "direct": run_direct(loaded, prompts[: args.requests], max_tokens),
                  "served": [run_clients(server.url, model_name(loaded.source), prompts[: c * args.requests], c,
                                         max_tokens) for c in concurrency]}
    finally:
        server.stop()
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
