"""`simone serve` through the official `openai` client: completions and chat, streaming and
not, seeds, logprobs, stop strings, 8 concurrent clients, errors and the API key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from simone.config import Config, ModelConfig, TokenizerConfig  # noqa: E402
from simone.inference.generate import stream_tokens  # noqa: E402
from simone.inference.load import load_model  # noqa: E402
from simone.inference.decoding import StopText  # noqa: E402
from simone.inference.model_worker import _DONE, Job, ModelWorker, Piece, Sampling  # noqa: E402
from simone.inference.openai_api import CHAT_STOP, render_chat, token_bytes  # noqa: E402
from simone.inference.serve import ServeError, check_bind, start_background_server  # noqa: E402
from simone.model import build_model  # noqa: E402

CONTEXT = 64
PROMPTS = ["sun", "moon", "law", "court vote", "rain", "star star", "café sun", "vote law"]


def make_model_dir(root: Path) -> Path:
    """A checkpoint folder of a tiny untrained Llama-style model (weights scaled up so that
    greedy continuations depend on the prompt) with a byte-level tokenizer."""
    from safetensors.torch import save_model

    from simone.data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    docs = root / "documents.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i, (domain, words) in enumerate([("alpha", "sun moon star rain café"), ("beta", "law court vote über")] * 3):
            f.write(json.dumps({"id": str(i), "domain": domain, "split": "train", "text": (words + " ") * 30}) + "\n")
    tok = train_tokenizer(docs, root / "tok", TokenizerConfig(vocab_size=300, min_frequency=1))
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=CONTEXT)
    model_dir = root / "tiny-model"
    model_dir.mkdir()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    save_model(model, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(cfg.to_json())
    tok.save(model_dir / "tokenizer.json")
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    srv = start_background_server(loaded)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)


def greedy(loaded, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    """The library's own greedy continuation (text of every token up to end-of-document)."""
    ids: list[int] = []
    for _ in stream_tokens(loaded, prompt, max_tokens=max_tokens, temperature=0.0, token_ids=ids):
        pass
    return loaded.tokenizer.decode(ids), ids


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-model"]
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-model"


def test_completion_greedy_equals_the_library_streaming_or_not(client, loaded):
    expected, ids = greedy(loaded, "law", 12)
    assert len(ids) == 12 and expected  # no end-of-document in these 12
    r = client.completions.create(model="tiny-model", prompt="law", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(loaded.tokenizer.encode("law"))
    chunks = list(client.completions.create(model="tiny-model", prompt="law", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"


def test_a_list_of_prompts_with_n_choices(client, loaded):
    r = client.completions.create(model="tiny-model", prompt=["sun", "law"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    sun, law = greedy(loaded, "sun", 8)[0], greedy(loaded, "law", 8)[0]
    assert [c.text for c in r.choices] == [sun, sun, law, law]


def test_eight_concurrent_clients_each_get_their_own_text(server, loaded):
    expected = {p: greedy(loaded, p, 16)[0] for p in PROMPTS}
    assert len(set(expected.values())) >= 6  # the prompts lead to different texts
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def one_client(i: int, prompt: str) -> None:
        try:
            c = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
            start.wait()
            if i % 2:  # half stream, half do not
                stream = c.completions.create(model="tiny-model", prompt=prompt, max_tokens=16, temperature=0,
                                              stream=True)
                results[prompt] = "".join(ch.choices[0].text for ch in stream)
            else:
                results[prompt] = c.completions.create(model="tiny-model", prompt=prompt, max_tokens=16,
                                                       temperature=0).choices[0].text
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one_client, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == expected


def test_same_seed_same_text_and_the_global_rng_is_untouched(client):
    def sample(seed: int, stream: bool = False) -> list[str]:
        kw = dict(model="tiny-model", prompt="star", max_tokens=16, temperature=1.0, seed=seed, n=3)
        if stream:
            texts = ["", "", ""]
            for ch in client.completions.create(stream=True, **kw):
                texts[ch.choices[0].index] += ch.choices[0].text
            return texts
        return [c.text for c in client.completions.create(**kw).choices]

    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # per-request generator only
    assert sample(7) == first and sample(7, stream=True) == first
    assert len(set(first)) > 1  # the choices are different draws
    assert sample(8) != first


def test_chat_uses_the_documented_template(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sun moon"}]
    prompt = render_chat(messages)
    assert prompt == "System: Be brief.\n\nUser: sun moon\n\nAssistant:"
    raw, _ = greedy(loaded, prompt, 20)
    cut = min([raw.find(s) for s in CHAT_STOP if s in raw] + [len(raw)])
    expected = raw[:cut].strip()
    r = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    a = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=20, seed=3)
    b = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=20, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_strings_cut_the_text_streaming_or_not(client, loaded):
    full, _ = greedy(loaded, "law", 12)
    stop = full[3:5]
    cut = full.find(stop)
    r = client.completions.create(model="tiny-model", prompt="law", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-model", prompt="law", max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]


def test_a_job_whose_client_left_stops_at_its_next_token(loaded):
    worker = ModelWorker(loaded)
    delivered: list = []
    skipped: list = []
    ids = loaded.tokenizer.encode("law")
    job = Job([ids], 1, Sampling(40, 0.0, None, None, [], None), seed=0)

    def deliver(item):  # the client goes away after the first piece of text
        delivered.append(item)
        job.cancelled.set()

    job.deliver = deliver
    waiting = Job([ids], 1, Sampling(40, 0.0, None, None, [], None), seed=0, deliver=skipped.append)
    waiting.cancelled.set()  # left while it waited in the queue
    worker.jobs.put(job)
    worker.jobs.put(waiting)
    worker.stop()
    worker.thread.join(10)
    assert isinstance(delivered[0], Piece) and delivered[1:] == [_DONE]
    assert skipped == []


class _PieceTokenizer:
    """decode(ids) = the pieces joined: a stand-in to drive StopText token by token."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_stop_text_never_releases_what_a_stop_string_may_take_back():
    pieces = ["Hi", " there", "\n", "\nUs", "er:", " more"]
    text = StopText(_PieceTokenizer(pieces), ["\nUser:"], strip=True)
    released = [text.add(i)[1] for i in range(5)]
    assert released == ["Hi", " there", "", "", ""] and text.stop_at == len("Hi there\n")
    assert text.finish() == ""
    text = StopText(_PieceTokenizer(["  ", "a", "\n", "b", "\n"]), ["\nUser:"], strip=True)
    assert [text.add(i)[1] for i in range(5)] + [text.finish()] == ["", "a", "", "\nb", "", ""]


def test_logprobs_are_the_models_log_softmax(client, loaded):
    r = client.completions.create(model="tiny-model", prompt="moon", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    _, ids = greedy(loaded, "moon", 6)
    tok = loaded.tokenizer
    assert lp.tokens == [tok.decode([i]) for i in ids]
    prompt = tok.encode("moon")
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([prompt + ids]))
    want = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1)
    got = torch.tensor(lp.token_logprobs)
    torch.testing.assert_close(got, want[torch.arange(len(ids)), torch.tensor(ids)], atol=1e-4, rtol=0)
    assert all(len(top) >= 1 and max(top.values()) == pytest.approx(t) for top, t in zip(lp.top_logprobs, got.tolist()))
    chat = client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "law"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_token_bytes_rebuild_the_text_even_inside_a_character(loaded):
    tok = loaded.tokenizer
    ids = tok.encode("café über sun")
    assert b"".join(token_bytes(tok, i) for i in ids) == "café über sun".encode()
    splits = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]
    assert splits and all(token_bytes(tok, i) not in (b"", "\ufffd".encode()) for i in splits)
    assert token_bytes(tok, tok.eod_id) == tok.eod_token.encode()


def _post(server, path: str, body, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=30)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": -1}, 400, "top_p"),
    ({"prompt": 3}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": [100000]}, 400, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "sun " * 80}, 400, "prompt"),  # past the 64-token context
    ({"prompt": "sun", "max_tokens": 64}, 400, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    r = _post(server, "/completions", {"model": "tiny-model", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "sun " * 80}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_requests_get_openai_errors(server, body, param):
    r = _post(server, "/chat/completions", {"model": "tiny-model", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_errors_reach_the_openai_client_and_the_server_lives_on(client, server):
    r = _post(server, "/completions", b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/nowhere").status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-model", prompt="sun", max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert client.completions.create(model="tiny-model", prompt="sun", max_tokens=2).choices[0].finish_reason


def test_api_key_is_required_when_set_and_off_loopback(loaded):
    with pytest.raises(ServeError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    check_bind("::1", None)
    srv = start_background_server(loaded, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
        r = httpx.post(srv.url + "/completions", json={"model": "tiny-model", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url, api_key="sekrit", max_retries=0)
        assert good.completions.create(model="tiny-model", prompt="sun", max_tokens=2).choices
        assert httpx.get(srv.url.removesuffix("/v1") + "/health").status_code == 200
    finally:
        srv.stop()


def test_cli_refuses_a_public_address_without_a_key(model_dir, capsys):
    from simone.cli import main

    env_key = os.environ.pop("SIMONE_API_KEY", None)
    try:
        assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    finally:
        if env_key is not None:
            os.environ["SIMONE_API_KEY"] = env_key
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err


@pytest.mark.slow  # a fresh interpreter imports torch: 5-30 s on a busy machine
def test_simone_serve_command_answers_the_openai_client(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "simone", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "sun"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "http://127.0.0.1:" in out and "API key required" in out


def test_bench_serve_smoke(model_dir, tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    result = bench.main(["--model", str(model_dir), "--requests", "1", "--concurrency", "1", "--concurrency", "2",
                         "--prompt-tokens", "4", "--max-tokens", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["clients"] for r in result["served"]] == [1, 2] and [r["requests"] for r in result["served"]] == [1, 2]
    for row in [result["direct"], *result["served"]]:
        assert 0 < row["tokens"] <= 3 * row["requests"] and row["tokens_per_s"] > 0
        assert row["latency_p50_s"] <= row["latency_p95_s"]
