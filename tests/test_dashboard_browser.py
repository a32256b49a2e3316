"""The dashboard in a real browser: headless Debian `chromium` driven by Playwright.

A fake trainer appends to a run directory while the page is open; the step counter and
the loss chart must advance without a reload, log lines containing `<script>` (in the
first snapshot and pushed live) must show as text, and run and domain names must show in
Plotly legends as written, not as Plotly markup. A screenshot is saved to
test-artifacts/dashboard.png.

The trainer waits until the page has drawn the run: the page keeps the newest 500 log
lines, and on a slow machine a trainer started earlier had pushed the injected line out
of them before the page looked (about 12 steps/s, one line each, for ~40 s).

Chromium: the Debian package (`apt-get install -y chromium`); Playwright cannot download
its own browsers here. If it is missing, this test installs it when it runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from simone.monitor import start_background_monitor
from simone.rundir import append_jsonl
from tests.fake_trainer import FakeTrainer
from tests.test_monitor_api import make_run

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
INJECTED = '<script>document.title="pwned"</script> <b>not bold</b>'
INJECTED_LIVE = '<script>document.title="pwned live"</script> <i>not italic</i>'
HOSTILE_ERROR = 'RuntimeError: CUDA out of memory <img src=x onerror="document.title=1">'
HOSTILE_DOMAIN = '<b>bold</b> & <a href="https://example.com">link</a>'
ODD_RUN = "<i>odd & run"  # a directory name Plotly would render in italics


def find_or_install_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=600,
                           capture_output=True)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {e}")
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get): "
                "run `apt-get install -y chromium` first")


@dataclass
class LiveRun:
    url: str
    trainer: FakeTrainer
    go: threading.Event  # set by the test once the page shows the run: the trainer starts


@pytest.fixture
def live_run(tmp_path: Path):
    root = tmp_path / "runs"
    trainer = FakeTrainer(root / "browser-run", total_steps=5000, eval_every=20, system_every=3,
                          checkpoint_every=40, sample_every=15)
    for _ in range(30):
        trainer.step()
    per_domain = {d: {"loss": 8.5 + i / 10, "bpb": 2.7} for i, d in enumerate(("educational", HOSTILE_DOMAIN))}
    append_jsonl(trainer.run.metrics, {"t": time.time(), "kind": "eval", "step": 30, "val_loss": 8.55,
                                       "val_bpb": 2.7, "per_domain": per_domain})
    trainer.log(INJECTED)
    failed = FakeTrainer(root / "failed-run", total_steps=200, eval_every=20, seed=1)
    for _ in range(60):
        failed.step()
    # numbers that arrive as text must not stop the header from updating
    append_jsonl(failed.run.metrics, {"t": time.time(), "kind": "train", "step": 61, "loss": 1.2345,
                                      "lr": "warmup", "tokens_per_s": "n/a", "mfu": None})
    failed.run.write_status(state="failed", error=HOSTILE_ERROR)
    odd = FakeTrainer(root / ODD_RUN, total_steps=100, seed=2)
    for _ in range(20):
        odd.step()
    odd.run.write_status(state="stopped")
    stop, go = threading.Event(), threading.Event()

    def keep_training() -> None:
        while not stop.is_set():
            if go.wait(0.1):
                trainer.step()
                time.sleep(0.08)

    thread = threading.Thread(target=keep_training, daemon=True)
    thread.start()
    mon = start_background_monitor(runs_root=root, port=0)
    yield LiveRun(mon.url, trainer, go)
    stop.set()
    thread.join(5)
    mon.stop()


def legend_texts(page, chart: str) -> list[str]:
    return page.evaluate(f"() => Array.from(document.querySelectorAll('{chart} .legendtext'), e => e.textContent)")


def test_dashboard_updates_live_and_shows_log_lines_as_text(live_run: LiveRun) -> None:
    chromium = find_or_install_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright for Python: pip install playwright "
                    "(do not run `playwright install`; the Debian chromium is used)")
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(live_run.url.rstrip("/")) else problems.append("offsite " + r.url))
            page.goto(live_run.url + "#run=browser-run")
            page.wait_for_function("() => /^\\d+$/.test(document.getElementById('kpi-step').textContent)", timeout=15000)
            page.wait_for_function("() => document.querySelector('#chart-loss .js-plotly-plot') !== null", timeout=15000)
            page.evaluate("() => { window.__notReloaded = true; }")

            # the injected log line (first snapshot) is text: visible verbatim, not executed, not parsed
            line = page.locator(".log-line", has_text="<script>")
            assert line.count() == 1 and INJECTED in line.text_content()
            assert page.title() == "SIM-ONE monitor"
            assert page.locator("#log script").count() == 0 and page.locator("#log b").count() == 0

            # a domain name is legend text, not Plotly markup (<b>, <a href>)
            page.wait_for_function("() => document.querySelectorAll('#chart-domain-loss .legendtext').length >= 2",
                                   timeout=10000)
            assert HOSTILE_DOMAIN in legend_texts(page, "#chart-domain-loss")
            assert page.locator("#chart-domain-loss a").count() == 0
            assert page.evaluate("() => plotlyText('<a href=\"x\">&amp;</a>')") == '&lt;a href="x"&gt;&amp;amp;&lt;/a&gt;'
            live_run.go.set()

            def loss_points() -> int:
                return page.evaluate("() => document.querySelector('#chart-loss .js-plotly-plot').data[0].x.length")

            step0 = int(page.text_content("#kpi-step"))
            points0 = loss_points()
            page.wait_for_function(f"() => Number(document.getElementById('kpi-step').textContent) >= {step0 + 10}",
                                   timeout=10000)
            page.wait_for_function(
                f"() => document.querySelector('#chart-loss .js-plotly-plot').data[0].x.length > {points0 + 5}",
                timeout=10000)
            assert page.evaluate("() => window.__notReloaded === true"), "the page reloaded"
            assert int(page.text_content("#kpi-step")) > step0 and loss_points() > points0

            # a log line pushed live is text too
            live_run.trainer.log(INJECTED_LIVE)
            page.wait_for_function("() => Array.from(document.querySelectorAll('.log-line'))"
                                   ".some(e => e.textContent.includes('pwned live'))", timeout=10000)
            line = page.locator(".log-line", has_text="pwned live")
            assert line.count() == 1 and INJECTED_LIVE in line.text_content()
            assert page.title() == "SIM-ONE monitor"
            assert page.locator("#log script").count() == 0 and page.locator("#log i").count() == 0

            assert page.text_content("#state-badge") == "running"
            page.wait_for_function("() => document.querySelectorAll('#checkpoints tr').length >= 1 && "
                                   "document.querySelectorAll('.sample').length >= 1", timeout=10000)
            live_run.go.clear()  # live updates are shown: pause the trainer so the clicks below meet an idle page
            page.wait_for_timeout(800)  # let the last chart redraw land before the picture
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # compare: tick the failed and the oddly named run, overlay the runs' losses
            page.locator('.run-item[data-run="failed-run"] input').check()
            page.locator(f'.run-item[data-run="{ODD_RUN}"] input').check()
            page.click("#compare-btn")
            page.wait_for_function("() => { const p = document.querySelector('#compare-chart');"
                                   " return p.data && p.data.length >= 5; }", timeout=10000)
            names = page.evaluate("() => document.querySelector('#compare-chart').data.map(t => t.name)")
            assert {"browser-run train", "failed-run train", "failed-run val"} <= set(names)
            assert f"{ODD_RUN} train" in legend_texts(page, "#compare-chart")  # as written, not in italics

            # a failed run shows its error from status.json, as text
            page.click('.run-item[data-run="failed-run"]')
            page.wait_for_function("() => document.getElementById('state-badge').textContent === 'failed'", timeout=10000)
            error_box = page.locator("#error-box")
            assert error_box.is_visible() and HOSTILE_ERROR in error_box.text_content()
            assert page.locator("#error-box img").count() == 0 and page.title() == "SIM-ONE monitor"
            # its last train row has "lr": "warmup": the header still updates past it
            assert page.text_content("#kpi-loss") == "1.2345" and page.text_content("#kpi-loss-sub") == "lr warmup"
            assert page.text_content("#kpi-tps") == "n/a" and page.text_content("#kpi-step") == "61"
            page.screenshot(path=str(ARTIFACTS / "dashboard-failed.png"))
        finally:
            browser.close()
    assert not problems, problems


def test_token_link_clicked_on_another_site_opens_the_page_and_leaves_the_address_bar(tmp_path: Path) -> None:
    """The printed `?token=` URL, clicked in a web chat: the page opens (cookie set, 303 to a
    clean URL) and the token is neither in the address bar nor in the history."""
    chromium = find_or_install_chromium()
    from playwright.sync_api import sync_playwright

    make_run(tmp_path / "runs", "r")
    mon = start_background_monitor(runs_root=tmp_path / "runs", port=0, token="tok-for-the-browser-test")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                statuses: list[int] = []
                page.on("response", lambda r: statuses.append(r.status) if r.url.startswith(mon.url.split("?")[0]) else None)
                page.set_content(f'<a id="link" href="{mon.url}">the dashboard</a>')  # another origin
                with page.expect_navigation():
                    page.click("#link")
                assert statuses[:2] == [303, 200], statuses  # 401 here: the cookie was not sent after the 303
                assert "token" not in page.url and page.url.startswith(mon.url.split("?")[0])
                page.wait_for_function("() => /^\\d+$/.test(document.getElementById('kpi-step').textContent)",
                                       timeout=15000)
                page.go_back()
                assert "token" not in page.url
            finally:
                browser.close()
    finally:
        mon.stop()
