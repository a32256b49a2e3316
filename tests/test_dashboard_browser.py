"""The dashboard in a real browser: headless Debian `chromium` driven by Playwright.

A fake trainer appends to a run directory while the page is open; the step counter and
the loss chart must advance without a reload, and a log line containing `<script>` must
show as text. A screenshot is saved to test-artifacts/dashboard.png.

Chromium: the Debian package (`apt-get install -y chromium`); Playwright cannot download
its own browsers here. If it is missing, this test installs it when it runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from simone.monitor import start_background_monitor
from tests.fake_trainer import FakeTrainer

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
INJECTED = '<script>document.title="pwned"</script> <b>not bold</b>'
HOSTILE_ERROR = 'RuntimeError: CUDA out of memory <img src=x onerror="document.title=1">'


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


@pytest.fixture
def live_run(tmp_path: Path):
    root = tmp_path / "runs"
    trainer = FakeTrainer(root / "browser-run", total_steps=5000, eval_every=20, system_every=3,
                          checkpoint_every=40, sample_every=15)
    for _ in range(30):
        trainer.step()
    trainer.log(INJECTED)
    failed = FakeTrainer(root / "failed-run", total_steps=200, eval_every=20, seed=1)
    for _ in range(60):
        failed.step()
    failed.run.write_status(state="failed", error=HOSTILE_ERROR)
    stop = threading.Event()

    def keep_training() -> None:
        while not stop.is_set():
            trainer.step()
            time.sleep(0.08)

    thread = threading.Thread(target=keep_training, daemon=True)
    thread.start()
    mon = start_background_monitor(runs_root=root, port=0)
    yield mon.url
    stop.set()
    thread.join(5)
    mon.stop()


def test_dashboard_updates_live_and_shows_log_lines_as_text(live_run: str) -> None:
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
            page.on("request", lambda r: None if r.url.startswith(live_run.rstrip("/")) else problems.append("offsite " + r.url))
            page.goto(live_run)
            page.wait_for_function("() => /^\\d+$/.test(document.getElementById('kpi-step').textContent)", timeout=15000)
            page.wait_for_function("() => document.querySelector('#chart-loss .js-plotly-plot') !== null", timeout=15000)
            page.evaluate("() => { window.__notReloaded = true; }")

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

            # the injected log line is text: visible verbatim, not executed, not parsed
            line = page.locator(".log-line", has_text="<script>")
            assert line.count() == 1 and INJECTED in line.text_content()
            assert page.title() == "SIM-ONE monitor"
            assert page.locator("#log script").count() == 0 and page.locator("#log b").count() == 0

            assert page.text_content("#state-badge") == "running"
            page.wait_for_function("() => document.querySelectorAll('#checkpoints tr').length >= 1 && "
                                   "document.querySelectorAll('.sample').length >= 1", timeout=10000)
            page.wait_for_timeout(800)  # let the last chart redraw land before the picture
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # compare: tick the failed run, overlay both runs' losses
            page.locator('.run-item[data-run="failed-run"] input').check()
            page.click("#compare-btn")
            page.wait_for_function("() => { const p = document.querySelector('#compare-chart');"
                                   " return p.data && p.data.length >= 4; }", timeout=10000)
            names = page.evaluate("() => document.querySelector('#compare-chart').data.map(t => t.name)")
            assert {"browser-run train", "failed-run train", "failed-run val"} <= set(names)

            # a failed run shows its error from status.json, as text
            page.click('.run-item[data-run="failed-run"]')
            page.wait_for_function("() => document.getElementById('state-badge').textContent === 'failed'", timeout=10000)
            error_box = page.locator("#error-box")
            assert error_box.is_visible() and HOSTILE_ERROR in error_box.text_content()
            assert page.locator("#error-box img").count() == 0 and page.title() == "SIM-ONE monitor"
            page.screenshot(path=str(ARTIFACTS / "dashboard-failed.png"))
        finally:
            browser.close()
    assert not problems, problems
