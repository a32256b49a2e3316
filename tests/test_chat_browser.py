"""The chat page of `simone serve` in a real browser: headless Debian `chromium` driven by
Playwright, against a tiny templated model behind an API key, whose replies are scripted.

The page asks for the key, streams a reply, shows one holding `<b>x</b>` and `<script>` as
text, sends the history and its settings (temperature, max tokens) with the next message,
starts a new chat, and stops a slow reply with its Stop button; it requests nothing from any
other host. A screenshot is saved to test-artifacts/chat.png.
"""

from __future__ import annotations

import pytest

from simone.data.chat_template import END_OF_TURN, chat_ids
from simone.inference import model_worker
from simone.inference.load import load_model
from simone.inference.serve import start_background_server
from test_chat_session import ScriptedModel, make_chat_model_dir, script
from test_dashboard_browser import ARTIFACTS, CHROMIUM_ARGS, find_or_install_chromium
from test_serve import CONTEXT

KEY = "browser-key"
HOSTILE = "<b>x</b><script>alert(1)</script>"  # short: the tiny model's context is 64 tokens


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_chat_model_dir(tmp_path_factory.mktemp("chat-browser")), device="cpu")


@pytest.fixture
def server(loaded):
    srv = start_background_server(loaded, api_key=KEY)
    yield srv
    srv.stop()


def test_the_chat_page_streams_replies_as_text_with_history_and_settings(loaded, server, monkeypatch) -> None:
    chromium = find_or_install_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright for Python: pip install playwright "
                    "(do not run `playwright install`; the Debian chromium is used)")
    tok = loaded.tokenizer
    eot = tok.chat_ids[END_OF_TURN]
    first = ScriptedModel(script(tok, HOSTILE, eot), delay=0.01)
    second = ScriptedModel(script(tok, "sun moon", eot))
    slow = ScriptedModel(script(tok, "star " * 40), delay=0.1)
    replies = iter([first, second, slow])
    monkeypatch.setattr(model_worker, "sample_tokens", lambda *a, **k: next(replies)(*a, **k))
    base = server.url.removesuffix("/v1")
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            # the page's first look at /v1/models, before the key is given, is a 401 by design
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" and "401" not in m.text else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(base + "/") else problems.append("offsite " + r.url))
            page.goto(base + "/")
            page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
            page.click("#settings-btn")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("() => document.getElementById('model').textContent.includes('template chat')")

            page.fill("#input", "hi")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            page.wait_for_function("() => !document.querySelector('.msg.streaming') && "
                                   "document.querySelectorAll('.msg.assistant').length === 1", timeout=15000)
            assert reply.text_content() == HOSTILE  # shown as written: not bold, not run
            assert page.locator("#log b").count() == 0 and page.locator("#log script").count() == 0
            assert page.title() == "simone chat"

            page.fill("#temperature", "0")
            page.fill("#max-tokens", "5")
            page.fill("#input", "more?")
            page.click("#send")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2 && "
                                   "!document.querySelector('.msg.streaming')", timeout=15000)
            assert page.locator(".msg.assistant").last.text_content() == "sun moon"
            history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": HOSTILE},
                       {"role": "user", "content": "more?"}]
            assert second.calls == [{"ids": chat_ids(tok, history, True), "max_tokens": 5, "temperature": 0.0}]
            page.wait_for_timeout(200)
            png = page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
            assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a drawn page, not a blank one

            page.click("#reset")  # a new chat: no history, no bubbles
            assert page.locator(".msg").count() == 0
            page.fill("#max-tokens", "")  # what the context leaves
            page.fill("#input", "count")
            page.press("#input", "Enter")
            page.wait_for_function("() => document.querySelector('.msg.streaming')?.textContent.includes('star star')",
                                   timeout=15000)
            page.click("#stop")
            page.wait_for_function("() => document.getElementById('status').textContent === 'stopped'")
            stopped = page.locator(".msg.assistant").last.text_content()
            assert stopped.startswith("star star") and len(stopped) < len("star " * 40)
            ids = chat_ids(tok, [{"role": "user", "content": "count"}], True)
            assert slow.calls == [{"ids": ids, "max_tokens": CONTEXT - len(ids), "temperature": 0.0}]
        finally:
            browser.close()
    assert not problems, problems
