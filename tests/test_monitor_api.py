"""The dashboard's HTTP API, with FastAPI's test client: run states, half-written lines,
path traversal, tokens, escaping and read-only-ness."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from simone.monitor import MonitorError, create_dashboard_app
from simone.monitor.server import check_bind, dashboard_url
from simone.rundir import RunDir, append_jsonl, atomic_write_json

STATIC = Path(__file__).resolve().parents[1] / "simone" / "monitor" / "static"


def make_run(root: Path, name: str, state: str = "running", heartbeat_age: float = 0.0, steps: int = 20,
             error: str | None = None, total_steps: int = 100) -> RunDir:
    run = RunDir(root / name).make()
    atomic_write_json(run.config, {"preset": "tiny", "train": {"num_epochs": 2}})
    t0 = time.time() - 100
    for s in range(1, steps + 1):
        append_jsonl(run.metrics, {"t": t0 + s, "kind": "train", "step": s, "epoch": 0, "loss": 5.0 - s * 0.1,
                                   "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "mfu": 0.3, "tokens_seen": s * 512})
    append_jsonl(run.metrics, {"t": t0 + steps, "kind": "eval", "step": steps, "epoch": 0, "val_loss": 3.5,
                               "val_bpb": 1.2, "val_ppl": 33.0, "per_domain": {"poetry": {"loss": 3.4, "bpb": 1.1, "ppl": 30.0}}})
    append_jsonl(run.metrics, {"t": t0 + steps, "kind": "system", "cpu_percent": 50.0, "ram_used_gb": 2.0, "ram_total_gb": 8.0,
                               "rss_gb": 0.5, "disk_free_gb": 10.0, "gpus": []})
    run.log_line("started")
    atomic_write_json(run.status, {"schema": 1, "state": state, "stage": "train", "step": steps, "epoch": 0,
                                   "total_steps": total_steps, "pid": 1, "host": "h", "error": error,
                                   "heartbeat": time.time() - heartbeat_age})
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


def client(root: Path, **kw) -> TestClient:
    # the dashboard answers only to its own names (DNS-rebinding guard), not to "testserver"
    return TestClient(create_dashboard_app(runs_root=root, **kw), base_url="http://127.0.0.1:5001")


def test_states_of_live_finished_failed_and_stalled_runs(runs_root: Path) -> None:
    make_run(runs_root, "live", "running", heartbeat_age=1)
    make_run(runs_root, "done", "finished", heartbeat_age=500)
    make_run(runs_root, "broke", "failed", heartbeat_age=500, error="loss became NaN 3 times at step 17")
    make_run(runs_root, "hung", "running", heartbeat_age=120)
    c = client(runs_root, stall_after_s=60)
    runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
    assert {n: r["state"] for n, r in runs.items()} == {
        "live": "running", "done": "finished", "broke": "failed", "hung": "stalled"}
    assert runs["broke"]["error"] == "loss became NaN 3 times at step 17"
    assert runs["live"]["step"] == 20 and runs["live"]["progress"] == pytest.approx(0.2)
    assert runs["live"]["eta_s"] == pytest.approx(80.0, rel=0.01)  # 80 steps left at 1 step/s
    assert runs["hung"]["eta_s"] is None
    detail = c.get("/api/runs/broke").json()
    assert detail["summary"]["state"] == "failed" and "NaN" in detail["summary"]["error"]
    # the stall threshold is the server's setting
    assert client(runs_root, stall_after_s=600).get("/api/runs/hung").json()["summary"]["state"] == "running"


def test_run_detail_has_series_log_checkpoints_and_links(runs_root: Path) -> None:
    run = make_run(runs_root, "r", steps=30)
    ck = run.checkpoints / "step_000030"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"\0" * 1000)
    atomic_write_json(ck / "MANIFEST.json", {"step": 30})
    (run.checkpoints / "latest").write_text("step_000030\n")
    (run.data / "report.html").write_text("<h1>report</h1>")
    d = client(runs_root).get("/api/runs/r").json()
    xs, ys = d["series"]["train/loss"]
    assert xs == list(range(1, 31)) and ys[-1] == pytest.approx(2.0)
    assert d["series"]["domain/poetry/loss"] == [[30], [3.4]]
    assert d["series"]["system/cpu_percent"][1] == [50.0]
    assert d["log"][-1].endswith("started")
    assert d["checkpoints"][0]["step"] == 30 and d["checkpoints"][0]["latest"]
    assert d["checkpoints"][0]["val_loss"] == 3.5 and d["checkpoints"][0]["size_bytes"] > 1000
    assert {"data/report.html", "config.json"} <= {link["path"] for link in d["links"]}
    assert d["summary"]["val_loss"] == 3.5 and d["summary"]["preset"] == "tiny"


def test_half_written_last_line_is_held_back_until_complete(runs_root: Path) -> None:
    run = make_run(runs_root, "r", steps=5)
    row = json.dumps({"t": time.time(), "kind": "train", "step": 6, "epoch": 0, "loss": 1.5, "lr": 1e-3})
    with open(run.metrics, "a") as f:
        f.write(row[:25])  # the trainer was interrupted mid-line
    c = client(runs_root)
    d = c.get("/api/runs/r").json()
    assert d["series"]["train/loss"][0] == [1, 2, 3, 4, 5]
    assert d["summary"]["partial_line"] is True and d["summary"]["bad_lines"] == 0
    assert c.get("/api/runs").json()["runs"][0]["step"] == 5
    with open(run.metrics, "a") as f:
        f.write(row[25:] + "\n")
    d = c.get("/api/runs/r").json()
    assert d["series"]["train/loss"][0] == [1, 2, 3, 4, 5, 6]
    assert d["summary"]["partial_line"] is False and d["summary"]["step"] == 6


def test_corrupt_lines_and_nan_losses_do_not_break_the_page(runs_root: Path) -> None:
    run = make_run(runs_root, "r", steps=3)
    with open(run.metrics, "a") as f:
        f.write("not json at all\n")
        f.write('{"t": 1, "kind": "train", "step": 4, "loss": NaN, "lr": 0.001}\n')
    r = client(runs_root).get("/api/runs/r")
    assert r.status_code == 200
    d = json.loads(r.text)  # strict JSON: a NaN would not parse in a browser
    assert d["summary"]["bad_lines"] == 1
    assert d["series"]["train/loss"][0] == [1, 2, 3]  # the NaN point is skipped, not sent
    assert d["series"]["train/lr"][0] == [1, 2, 3, 4]


TRAVERSALS = [
    "/api/runs/r/files/..%2F..%2Fsecret.txt",
    "/api/runs/r/files/%2e%2e/%2e%2e/secret.txt",
    "/api/runs/r/files/%2E%2E%2Fother%2Fstatus.json",
    "/api/runs/r/files/data/..%2F..%2F..%2Fsecret.txt",
    "/api/runs/r/files/%2Fetc%2Fpasswd",
    "/api/runs/r/files//etc/passwd",
    "/api/runs/r/files/%252e%252e%252fsecret.txt",
    "/api/runs/r/files/data%5C..%5C..%5Csecret.txt",
    "/api/runs/r/files/data/leak.txt",  # symlink to a file outside the run
    "/api/runs/r/files/outside/secret.txt",  # symlinked directory outside the run
    "/api/runs/..%2Fsecret.txt",
    "/api/runs/%2e%2e/files/secret.txt",
    "/api/runs/escaped",  # a run dir symlinked from outside the runs root
    "/api/runs/escaped/files/status.json",
    "/api/runs/r/files/checkpoints",  # a directory, not a file
]


def test_path_traversal_and_outside_symlinks_get_404(runs_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    run = make_run(runs_root, "r")
    make_run(runs_root, "other")
    (run.data / "leak.txt").symlink_to(secret)
    (run.root / "outside").symlink_to(tmp_path)
    (run.data / "inside.txt").symlink_to(run.log)  # inside the run: allowed
    elsewhere = make_run(tmp_path / "elsewhere", "escaped")
    (runs_root / "escaped").symlink_to(elsewhere.root)
    c = client(runs_root)
    for url in TRAVERSALS:
        r = c.get(url)
        assert r.status_code == 404, url
        assert "TOP SECRET" not in r.text and "root:" not in r.text
    assert "escaped" not in [x["name"] for x in c.get("/api/runs").json()["runs"]]
    ok = c.get("/api/runs/r/files/data/inside.txt")
    assert ok.status_code == 200 and "started" in ok.text
    report = c.get("/api/runs/r/files/config.json")
    assert report.status_code == 200 and report.json()["preset"] == "tiny"


def test_served_run_files_are_sandboxed(runs_root: Path) -> None:
    run = make_run(runs_root, "r")
    (run.data / "report.html").write_text("<script>alert(1)</script>")
    r = client(runs_root).get("/api/runs/r/files/data/report.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "sandbox" in r.headers["content-security-policy"]
    assert "allow-scripts" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_token_required_when_set(runs_root: Path) -> None:
    make_run(runs_root, "r")
    c = client(runs_root, token="s3cret-token")
    for url in ("/", "/api/runs", "/api/runs/r", "/static/app.js", "/api/stream/runs", "/api/runs/r/files/config.json"):
        assert c.get(url).status_code == 401, url
    assert c.get("/api/runs", params={"token": "wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    first = c.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
    assert first.status_code == 303 and "set-cookie" in first.headers
    assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=Lax" in first.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200  # the cookie now carries the token
    c.cookies.clear()
    assert c.get("/api/runs").status_code == 401


def test_loopback_by_default_and_token_required_elsewhere() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(MonitorError, match="--token"):
            check_bind(host, None)
        check_bind(host, "t")
    assert dashboard_url("127.0.0.1", 5001, None) == "http://127.0.0.1:5001/"
    assert dashboard_url("127.0.0.1", 5001, "abc").endswith("/?token=abc")


def test_run_text_is_data_never_markup(runs_root: Path) -> None:
    run = make_run(runs_root, "r", state="failed", error='<img src=x onerror="alert(1)">')
    run.log_line("<script>alert('x')</script>")
    c = client(runs_root)
    d = c.get("/api/runs/r").json()
    assert d["log"][-1].endswith("<script>alert('x')</script>")  # verbatim, as JSON text
    assert d["summary"]["error"] == '<img src=x onerror="alert(1)">'
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script runs
    js = (STATIC / "app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_page_and_plotly_are_served_locally(runs_root: Path) -> None:
    c = client(runs_root)
    page = c.get("/").text
    assert '<script src="/static/plotly.min.js"' in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline
    js = c.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    assert c.get("/static/../app.py").status_code == 404
    assert c.get("/static/runs.py").status_code == 404


def test_dashboard_never_writes_into_the_run(runs_root: Path) -> None:
    run = make_run(runs_root, "r")
    (run.data / "report.html").write_text("<p>x</p>")

    def fingerprint() -> dict[str, tuple]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(run.root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
                out[str(p)] = (st.st_size, st.st_mtime_ns, digest)
        return out

    before = fingerprint()
    c = client(runs_root)
    for url in ("/", "/api/runs", "/api/runs/r", "/api/runs/r/files/data/report.html",
                "/api/compare?runs=r", "/api/runs/r/files/nope.txt"):
        c.get(url)
    assert fingerprint() == before


def test_single_run_mode_and_compare(runs_root: Path) -> None:
    make_run(runs_root, "a", steps=10)
    make_run(runs_root, "b", steps=20)
    single = TestClient(create_dashboard_app(run_dir=runs_root / "a"), base_url="http://localhost:5001")
    names = [r["name"] for r in single.get("/api/runs").json()["runs"]]
    assert names == ["a"]
    assert single.get("/api/runs/b").status_code == 404  # a sibling is not served
    cmp = client(runs_root).get("/api/compare", params={"runs": "a,b,missing"}).json()["runs"]
    assert set(cmp) == {"a", "b"}
    assert cmp["b"]["train/loss"][0][-1] == 20 and cmp["a"]["eval/val_loss"][1] == [3.5]


def test_run_monitor_generates_a_token_off_loopback(monkeypatch, capsys) -> None:
    from simone.monitor import server as serve_mod

    calls = []
    monkeypatch.setattr(serve_mod, "serve", lambda **kw: calls.append(kw))
    serve_mod.run_monitor(Path("runs"), None, host="0.0.0.0", port=5002, token=None, say=print)
    token = calls[0]["token"]
    assert token and len(token) >= 16 and calls[0]["host"] == "0.0.0.0"
    assert f":5002/?token={token}" in capsys.readouterr().out
    serve_mod.run_monitor(Path("runs"), None, host="127.0.0.1", port=5001, token=None, say=print)
    assert calls[1]["token"] is None and "http://127.0.0.1:5001/\n" in capsys.readouterr().out


# ----------------------------------------------------------------------------- DNS rebinding (issue 13, item 15)

FOREIGN_HOSTS = ["evil.example", "evil.example:5001", "localhost.evil.example", "127.0.0.1.evil.example:5001",
                 "10.0.0.7:5001", ""]


def test_requests_naming_another_host_get_421(runs_root: Path) -> None:
    """A DNS-rebinding page (its name now resolving to 127.0.0.1) must not read the corpus."""
    run = make_run(runs_root, "r")
    (run.data / "documents.jsonl").write_text('{"text": "THE WHOLE CORPUS"}\n')
    c = client(runs_root)
    urls = ["/", "/api/runs", "/api/runs/r", "/api/runs/r/files/data/documents.jsonl", "/static/app.js",
            "/static/plotly.min.js", "/api/compare?runs=r", "/api/stream/runs", "/api/stream/run/r", "/nope"]
    for host in FOREIGN_HOSTS:
        for url in urls:
            r = c.get(url, headers={"Host": host})
            assert r.status_code == 421, (host, url)
            assert "CORPUS" not in r.text and "loss" not in r.text
    for host in ("localhost", "localhost:5001", "127.0.0.1", "127.0.0.1:5001", "[::1]", "[::1]:5001", "LocalHost:80"):
        r = c.get("/api/runs/r/files/data/documents.jsonl", headers={"Host": host})
        assert r.status_code == 200 and "CORPUS" in r.text, host
        assert c.get("/", headers={"Host": host}).status_code == 200, host


def test_host_check_comes_before_the_token_and_allows_the_bound_host(runs_root: Path) -> None:
    make_run(runs_root, "r")
    auth = {"Authorization": "Bearer tok"}
    lan = TestClient(create_dashboard_app(runs_root=runs_root, token="tok", host="192.168.1.20"))
    assert lan.get("/api/runs", headers={**auth, "Host": "192.168.1.20:5001"}).status_code == 200
    assert lan.get("/api/runs", headers={**auth, "Host": "localhost:5001"}).status_code == 200
    assert lan.get("/api/runs", headers={**auth, "Host": "evil.example:5001"}).status_code == 421
    assert lan.get("/", params={"token": "tok"}, headers={"Host": "evil.example"}, follow_redirects=False).status_code == 421
    assert lan.get("/api/runs", headers={"Host": "192.168.1.20"}).status_code == 401  # right host, no token
    named = TestClient(create_dashboard_app(runs_root=runs_root, token="tok", host="gpu-box.lan"))
    assert named.get("/api/runs", headers={**auth, "Host": "gpu-box.lan:5001"}).status_code == 200
    assert named.get("/api/runs", headers={**auth, "Host": "192.168.1.20:5001"}).status_code == 421
    # all interfaces: any address and the machine's name (what `simone monitor` prints), no other name
    wild = TestClient(create_dashboard_app(runs_root=runs_root, token="tok", host="0.0.0.0"))
    assert wild.get("/api/runs", headers={**auth, "Host": "10.1.2.3:5001"}).status_code == 200
    assert wild.get("/api/runs", headers={**auth, "Host": f"{socket.gethostname()}:5001"}).status_code == 200
    assert wild.get("/api/runs", headers={**auth, "Host": "evil.example:5001"}).status_code == 421


# ----------------------------------------------------------------------------- hostile run files (item 16)

DEEP = "[" * 100_000
BIG = "1" + "0" * 400  # beyond float range; below Python's int-string limit, so it parses


@pytest.mark.parametrize("status_text", [
    DEEP,
    '{"state": "failed", "error": %s}' % ("[" * 900 + "]" * 900),  # parses, then too deep to walk
    '{"state": "running", "heartbeat": %s, "step": %s, "total_steps": %s, "eta_s": %s}' % (BIG, BIG, BIG, BIG),
    '{"state": "running", "step": %s}' % ("9" * 5000),  # over the int-string limit: ValueError
    '["not", "an", "object"]',
    '{"state": %s, "step": {"a": 1}, "host": [1]}' % ("[" * 900 + "]" * 900),  # fields that are no scalar
], ids=["deep-nesting", "deep-error-value", "400-digit-ints", "5000-digit-int", "not-an-object", "deep-state"])
def test_one_hostile_status_json_does_not_break_the_run_list(runs_root: Path, status_text: str) -> None:
    make_run(runs_root, "good", steps=20)
    bad = make_run(runs_root, "bad", steps=5)
    bad.status.write_text(status_text)
    c = client(runs_root)
    r = c.get("/api/runs")
    assert r.status_code == 200
    runs = {x["name"]: x for x in r.json()["runs"]}
    assert runs["good"]["state"] == "running" and runs["good"]["step"] == 20
    assert "bad" in runs
    if status_text in (DEEP, '["not", "an", "object"]') or "9" * 5000 in status_text:
        assert runs["bad"]["state"] == "unreadable" and "status.json" in runs["bad"]["error"]
    if status_text.startswith('{"state": [['):
        assert runs["bad"]["state"] == "unknown" and runs["bad"]["host"] is None
    detail = c.get("/api/runs/bad")
    assert detail.status_code == 200 and detail.json()["summary"]["state"] == runs["bad"]["state"]
    assert c.get("/api/runs/good").status_code == 200


def test_hostile_metrics_lines_are_counted_bad_not_fatal(runs_root: Path) -> None:
    run = make_run(runs_root, "r", steps=3)
    with open(run.metrics, "a") as f:
        f.write(DEEP + "\n")
        f.write('{"t": 1, "kind": "train", "step": 4, "loss": %s, "lr": %s, "x": %s}\n' % (BIG, BIG, "[" * 900 + "]" * 900))
        f.write('{"t": 1, "kind": "event", "event": "odd", "step": 4, "deep": %s}\n' % ("[" * 900 + "]" * 900))
    make_run(runs_root, "other")
    c = client(runs_root)
    r = c.get("/api/runs")
    assert r.status_code == 200 and {x["name"] for x in r.json()["runs"]} == {"r", "other"}
    d = c.get("/api/runs/r")
    assert d.status_code == 200
    summary = d.json()["summary"]
    assert summary["bad_lines"] == 1 and summary["step"] == 4 and summary["loss"] == int(BIG)
    assert d.json()["series"]["train/loss"][0] == [1, 2, 3]  # the 400-digit loss is not a point


def test_two_broken_lines_that_join_into_valid_json_are_both_bad(runs_root: Path) -> None:
    from simone.monitor.metrics_tail import parse_lines

    halves = [b'{"kind": "train", "step": 1, "loss": 1.0}, {"kind": "train", "step": 2, "loss": [1',
              b'2]}']
    assert parse_lines(halves) == ([], 2)
    assert parse_lines([b'{"a": 1}', b"", b'{"b": 2']) == ([{"a": 1}], 1)
    run = make_run(runs_root, "r", steps=3)
    with open(run.metrics, "ab") as f:
        f.write(b"\n".join(halves) + b"\n")
    d = client(runs_root).get("/api/runs/r").json()
    assert d["summary"]["bad_lines"] == 2 and d["series"]["train/loss"][0] == [1, 2, 3]


# ----------------------------------------------------------------------------- token out of the address bar (item 17)


def test_token_in_the_query_is_traded_for_a_cookie_and_a_clean_url(runs_root: Path) -> None:
    make_run(runs_root, "r")
    c = client(runs_root, token="s3cret-token")
    r = c.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "s3cret-token" in r.headers["set-cookie"] and r.headers["cache-control"] == "no-store"
    r = c.get("/api/runs/r/files/config.json?x=1&token=s3cret-token&y=a%20b", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/api/runs/r/files/config.json?x=1&y=a+b"
    assert "s3cret-token" not in r.headers["location"]
    for target in ("//evil.example/x", "/\\evil.example/x"):  # the redirect stays on this site
        r = c.get(f"{target}?token=s3cret-token", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/") and r.headers["location"][1] not in "/\\"
    c.cookies.clear()
    page = c.get("/", params={"token": "s3cret-token"})  # followed: the page, with the token gone
    assert page.status_code == 200 and "token" not in str(page.url) and "SIM-ONE" in page.text
    c.cookies.clear()
    assert c.get("/", params={"token": "wrong"}, follow_redirects=False).status_code == 401
