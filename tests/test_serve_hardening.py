"""`simone serve` against hostile clients: the Host check (DNS rebinding), requests whose
clients leave, a bounded queue and bounded work, body and prompt sizes, sampling values that
cannot sample, no exception text in responses, and API keys that could never match."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import torch

httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from simone.inference import model_worker, serve  # noqa: E402
from simone.inference.load import load_model  # noqa: E402
from simone.inference.openai_api import longest_token_chars  # noqa: E402
from simone.inference.serve import (  # noqa: E402
    ServeError,
    ServeLimits,
    check_bind,
    create_api_app,
    start_background_server,
)
from simone.model.sampling import GREEDY_BELOW, sample_next_token  # noqa: E402
from test_serve import CONTEXT, greedy, make_model_dir  # noqa: E402

MODEL = "tiny-model"
TOKEN_DELAY_S = 0.01  # the slowed model: a 16 × 60-token request takes ~10 s unless cancelled


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve-hardening"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, device="cpu")


def app_client(loaded, **kwargs) -> TestClient:
    """An in-process client that names the server as a browser on this machine would."""
    return TestClient(create_api_app(loaded, **kwargs), base_url="http://127.0.0.1:8000")


def assert_openai_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture
def tokens_sampled(monkeypatch):
    """Slow the model down to TOKEN_DELAY_S a token and count the tokens it samples."""
    count = [0]
    real = model_worker.sample_tokens

    def slow_sample_tokens(*args, **kwargs):
        for step in real(*args, **kwargs):
            count[0] += 1
            time.sleep(TOKEN_DELAY_S)
            yield step

    monkeypatch.setattr(model_worker, "sample_tokens", slow_sample_tokens)
    return count


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def send_and_keep_open(server, path: str, body: dict) -> socket.socket:
    """Send a request and return its socket unread: closing it is a client going away."""
    url = urlsplit(server.url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def health(server) -> dict:
    return httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10).json()


LONG = {"model": MODEL, "prompt": "x", "n": 16, "max_tokens": 60, "temperature": 1.0}  # 960 tokens


# ----------------------------------------------------------------------------- 1. Host header


def test_a_host_header_naming_another_server_gets_421_before_anything_runs(loaded):
    with app_client(loaded) as c:
        for host in ["evil.example:8000", "evil.example", "localhost.evil.example", "10.0.0.7:8000", ""]:
            for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")]:
                r = c.request(method, path, headers={"Host": host}, json={"model": MODEL, "prompt": "sun"})
                err = assert_openai_error(r, 421, code="misdirected_request")
                assert "DNS rebinding" in err["message"] and MODEL not in r.text, (host, path)
        for host in ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LocalHost"]:
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    # the host check comes before the key, and a server bound to all interfaces takes any address
    with TestClient(create_api_app(loaded, api_key="k", host="0.0.0.0")) as c:
        auth = {"Authorization": "Bearer k"}
        assert c.get("/v1/models", headers={**auth, "Host": "10.1.2.3:8000"}).status_code == 200
        assert_openai_error(c.get("/v1/models", headers={"Host": "evil.example"}), 421)
        assert_openai_error(c.get("/v1/models", headers={"Host": "10.1.2.3"}), 401, code="invalid_api_key")


# ----------------------------------------------------------------------------- 2. clients that leave, queue, work


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_leaves_stops_at_its_next_token(loaded, tokens_sampled, stream):
    server = start_background_server(loaded)
    try:
        sock = send_and_keep_open(server, "/completions", {**LONG, "stream": stream})
        wait_until(lambda: tokens_sampled[0] > 0)  # it runs
        time.sleep(0.1)
        sock.close()
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/completions", json={"model": MODEL, "prompt": "sun", "max_tokens": 1},
                       timeout=30)
        waited = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        # unstopped, the first request would have sampled 960 tokens (~10 s) before this one ran
        assert tokens_sampled[0] - 1 < 200 and waited < 4, (tokens_sampled[0], waited)
    finally:
        server.stop()


def test_a_full_queue_answers_429_with_retry_after_and_leavers_free_their_place(loaded, tokens_sampled):
    server = start_background_server(loaded, limits=ServeLimits(max_queue=1))
    running = waiting = None
    try:
        running = send_and_keep_open(server, "/completions", LONG)
        wait_until(lambda: tokens_sampled[0] > 0)
        waiting = send_and_keep_open(server, "/chat/completions",
                                     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        wait_until(lambda: health(server)["waiting"] == 1)
        for path, body in [("/completions", {"model": MODEL, "prompt": "sun", "max_tokens": 1}),
                           ("/completions", {"model": MODEL, "prompt": "sun", "max_tokens": 1, "stream": True}),
                           ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})]:
            r = httpx.post(server.url + path, json=body, timeout=10)
            assert_openai_error(r, 429, code="queue_full")
            assert r.headers["retry-after"] == "1"
        waiting.close()  # a client that leaves while it waits gives its place back at once
        wait_until(lambda: health(server)["waiting"] == 0)
        running.close()
        r = httpx.post(server.url + "/completions", json={"model": MODEL, "prompt": "sun", "max_tokens": 2,
                                                          "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        for sock in (running, waiting):
            if sock is not None:
                sock.close()
        server.stop()


def test_the_work_of_one_request_is_bounded(loaded):
    with app_client(loaded, limits=ServeLimits(max_request_tokens=100)) as c:
        prompt_tokens = len(loaded.tokenizer.encode("sun"))
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "sun", "n": 16, "max_tokens": 10})
        err = assert_openai_error(r, 400, code="request_too_large", param="max_tokens")
        assert "100" in err["message"] and str(16 * (prompt_tokens + 10)) in err["message"]
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["sun", "law"], "n": 4, "max_tokens": 10})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8
        # chat without max_tokens: as many as the limit leaves (not the whole context)
        messages = [{"role": "user", "content": "sun"}]
        for _ in range(3):
            usage = c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "n": 2}).json()["usage"]
            assert usage["prompt_tokens"] * 2 + usage["completion_tokens"] <= 100
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "n": 2,
                                                 "max_completion_tokens": 40})
        assert_openai_error(r, 400, code="request_too_large", param="max_completion_tokens")


def test_limits_must_be_positive():
    with pytest.raises(ServeError, match="--max-queue must be at least 1, got 0"):
        ServeLimits(max_queue=0)


# ----------------------------------------------------------------------------- 3. sizes and the event loop


def test_a_body_over_the_limit_gets_413_declared_or_chunked(loaded):
    server = start_background_server(loaded, limits=ServeLimits(max_body_bytes=2000))
    try:
        big = json.dumps({"model": MODEL, "prompt": "sun " * 2000}).encode()
        r = httpx.post(server.url + "/completions", content=big, headers={"Content-Type": "application/json"})
        err = assert_openai_error(r, 413, code="request_too_large")
        assert "2000 bytes" in err["message"]

        def chunks():  # no Content-Length: the size shows only as the bytes arrive
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        r = httpx.post(server.url + "/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413, code="request_too_large")
        small = {"model": MODEL, "prompt": "sun", "max_tokens": 2}
        assert httpx.post(server.url + "/completions", json=small).status_code == 200
    finally:
        server.stop()


def test_a_prompt_too_long_for_the_context_is_refused_without_tokenizing_it(loaded, monkeypatch):
    tok = loaded.tokenizer
    longest = longest_token_chars(tok)
    assert all(len(tok.decode([i])) <= longest for i in range(tok.vocab_size))
    encoded: list[int] = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: encoded.append(len(text)) or real_encode(text, *a, **k))
    too_long = "s" * ((CONTEXT - 1) * longest + 1)  # at least CONTEXT tokens, whatever they are
    with app_client(loaded) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["sun", too_long]})
        assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": too_long}]})
        assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
        assert encoded == []  # neither the long prompt nor its short neighbour was tokenized
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "sun", "max_tokens": 1}).status_code == 200
        assert encoded == [3]


def test_the_event_loop_neither_tokenizes_nor_builds_a_whole_response(loaded, monkeypatch):
    """Tokenizing and building a response (logprobs decode every token) run in threads;
    the event loop thread (named simone-serve) only moves bytes."""
    tok = loaded.tokenizer
    threads: set[str] = set()
    for method in ("encode", "decode"):
        real = getattr(tok, method)
        monkeypatch.setattr(tok, method, lambda *a, _real=real, **k: threads.add(threading.current_thread().name)
                            or _real(*a, **k))
    server = start_background_server(loaded)
    try:
        r = httpx.post(server.url + "/completions", timeout=30,
                       json={"model": MODEL, "prompt": ["sun", "law"], "n": 2, "max_tokens": 8, "logprobs": 5,
                             "seed": 7})
        # Seeded: an unseeded tiny model may end a choice at its first token (an empty logprobs list).
        assert r.status_code == 200 and any(len(c["logprobs"]["tokens"]) for c in r.json()["choices"])
        r = httpx.post(server.url + "/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "sun"}], "max_tokens": 8,
                             "logprobs": True, "top_logprobs": 3})
        assert r.status_code == 200
    finally:
        server.stop()
    assert threads and "simone-serve" not in threads, threads


def test_the_server_freezes_what_it_loaded_before_serving(model_dir, monkeypatch):
    """A full garbage collection walks every object the process holds (0.2 s with torch and a
    model loaded, a stall of every client and of /health); the server freezes them first."""
    frozen_when_serving = []

    class Server:  # stands in for uvicorn: notes the state in which serving would begin
        def run(self, sockets):
            frozen_when_serving.append(gc.get_freeze_count())
            for sock in sockets:
                sock.close()

    monkeypatch.setattr(serve, "_server", lambda *args, **kwargs: Server())
    try:
        serve.run_server(model_dir, port=0, device="cpu")
    finally:
        gc.unfreeze()
    assert frozen_when_serving[0] > 100_000  # torch, the model, the app: all of it


# ----------------------------------------------------------------------------- 4. sampling values, exception text


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, GREEDY_BELOW / 2])
def test_a_tiny_temperature_samples_as_greedy(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.25, 4.0, 4.0 - 1e-3]])
    for top_k, top_p in [(None, None), (2, None), (None, 0.9), (3, 0.5)]:
        got = sample_next_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
        assert got.tolist() == [[1], [2]]
    # at the threshold it still samples: two equal logits are both drawn
    draws = {int(sample_next_token(torch.tensor([[2.0, 2.0, -5.0]]), GREEDY_BELOW, generator=g)[0, 0])
             for g in [torch.Generator().manual_seed(s) for s in range(20)]}
    assert draws == {0, 1}


def test_a_tiny_temperature_over_http_is_greedy_not_a_500(loaded):
    expected, _ = greedy(loaded, "law", 6)
    with app_client(loaded) as c:
        for t in (1e-300, 5e-324):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "law", "max_tokens": 6, "temperature": t})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        for body in ['{"model": "tiny-model", "prompt": "x", "temperature": NaN}',
                     '{"model": "tiny-model", "prompt": "x", "top_p": Infinity}']:
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert_openai_error(r, 400, param="temperature" if "temperature" in body else "top_p")


def test_a_server_fault_reaches_the_log_but_never_the_client(loaded, monkeypatch, caplog):
    secret = "cannot open /home/alice/secret-weights.bin"

    def broken_job(*args, **kwargs):
        raise RuntimeError(secret)
        yield  # a generator, as run_job is

    monkeypatch.setattr(model_worker, "run_job", broken_job)
    body = {"model": MODEL, "prompt": "sun", "max_tokens": 3}
    with TestClient(create_api_app(loaded), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json=body)
        err = assert_openai_error(r, 500)
        assert err["type"] == "server_error" and "alice" not in r.text and "RuntimeError" not in r.text
        with caplog.at_level(logging.ERROR, logger="simone.serve"):
            r = c.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200 and "alice" not in r.text and "RuntimeError" not in r.text
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error" and r.text.endswith("data: [DONE]\n\n")
    assert secret in caplog.text and "Traceback" in caplog.text  # the server's log has it all
    # the non-streaming fault is raised on to the ASGI server, which logs it with its traceback
    with TestClient(create_api_app(loaded), base_url="http://127.0.0.1") as c, pytest.raises(RuntimeError, match="alice"):
        c.post("/v1/completions", json=body)


# ----------------------------------------------------------------------------- 5. API keys


@pytest.mark.parametrize("key", ["clé-secrète", "key with spaces", " padded", "tab\tkey", "ключ"])
def test_a_key_that_could_never_match_is_refused_at_start(loaded, model_dir, capsys, key):
    with pytest.raises(ServeError, match=r"\(--api-key or SIMONE_API_KEY\): use printable ASCII"):
        check_bind("127.0.0.1", key)
    with pytest.raises(ServeError, match="--api-key"):
        create_api_app(loaded, api_key=key)
    from simone.cli import main

    assert main(["serve", "--model", str(model_dir), "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err


def test_an_ascii_key_with_punctuation_matches(loaded):
    key = "sk-AZaz09_!#$%&'*+-.^`|~"
    with app_client(loaded, api_key=key) as c:
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)


def test_cli_limits_flags_reach_the_server(model_dir, monkeypatch):
    from simone import cli

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: seen.update(k))
    monkeypatch.setenv("SIMONE_API_KEY", "from-env")
    assert cli.main(["serve", "--model", str(model_dir), "--max-queue", "3", "--max-body-bytes", "5000"]) == 0
    assert seen["limits"] == ServeLimits(max_queue=3, max_body_bytes=5000) and seen["api_key"] == "from-env"
