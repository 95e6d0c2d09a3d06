"""The web chat page in a real browser: headless Debian Chromium driven by Playwright for Python.

Setup (once): `apt-get update && apt-get install -y chromium` and `pip install playwright` (the Python
package only; Playwright's own browser download is not used: we launch /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llamaworks.serve.app import create_app
from serve_testutil import engine_for, running_server, tiny_model, wait_until

CHROMIUM = os.environ.get("LLAMAWORKS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SETUP_HINT = ("run the browser test setup: `apt-get update && apt-get install -y chromium` and "
              "`pip install playwright` (never `playwright install`)")
SCREENSHOT = "/tmp/llamaworks-webchat.png"



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    from llamaworks.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    # A long context so that a reply can outlast the stop button's click.
    engine = engine_for(tiny_model(tokenizer.vocab_size, max_seq_len=4096), tokenizer, max_rows=4)
    with running_server(create_app(engine, model_name="tiny-serve")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {SETUP_HINT}")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: {SETUP_HINT}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server[0] + "/")
    pg.wait_for_function("document.getElementById('model-name').textContent === 'tiny-serve'")
    yield pg
    context.close()
    assert not errors, errors


def _last_reply(pg):
    pg.wait_for_selector(".msg.assistant[data-streaming='false']", timeout=60_000)
    reply = pg.locator(".msg.assistant").last
    return reply, int(reply.get_attribute("data-chunks")), reply.inner_text()


def test_message_streams_a_reply_and_persists(page, server):
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
            else None)
    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are a terse assistant.")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Hello! Please write a haiku.")
    page.press("#input", "Enter")
    _, chunks, text = _last_reply(page)
    assert chunks > 1 and text.strip()  # the reply arrived in several streamed pieces
    assert page.locator(".msg.user").last.inner_text() == "Hello! Please write a haiku."
    body = requests[-1]
    assert body["stream"] is True and body["max_tokens"] == 24
    assert body["messages"][0] == {"role": "system", "content": "You are a terse assistant."}
    page.screenshot(path=SCREENSHOT, full_page=True)
    # The conversation is kept in the browser: it survives a reload.
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_korean_ime_enter_does_not_send_while_composing(page):
    page.click("#toggle-settings")
    page.fill("#max-tokens", "24")
    cdp = page.context.new_cdp_session(page)
    page.focus("#input")
    # A real IME composition (compositionstart/update events) of a Hangul syllable in progress.
    cdp.send("Input.imeSetComposition", {"text": "안녕하세", "selectionStart": 4, "selectionEnd": 4})
    page.keyboard.press("Enter")
    # What the browser sends for Enter during composition (keyCode 229, isComposing) must not send either.
    page.evaluate("""() => document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',
        {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))""")
    page.wait_for_timeout(300)
    assert page.locator(".msg").count() == 0
    cdp.send("Input.insertText", {"text": "안녕하세요"})  # commits the composition
    page.wait_for_timeout(50)
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.user")
    # (CDP has no real IME to swallow the Enter pressed while composing, so the textarea got a newline.)
    assert page.locator(".msg.user").last.inner_text().strip() == "안녕하세요"
    _, chunks, text = _last_reply(page)
    assert chunks > 1 and text.strip()


def test_stop_button_aborts_and_frees_the_slot(page, server):
    engine = server[1]
    cancelled = engine.stats.cancelled
    page.click("#toggle-settings")
    page.fill("#max-tokens", "4000")
    page.fill("#input", "Tell me a very long story.")
    page.click("#send")
    page.wait_for_function("Number(document.querySelector('.msg.assistant')?.dataset.chunks || 0) >= 2")
    page.click("#stop")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert wait_until(lambda: engine.stats.cancelled > cancelled and engine.stats.active == 0, timeout=15)
    # Stopped means stopped: neither the page nor the engine moves on afterwards (a stop button that only hid
    # itself would leave the 4000-token reply running, and growing, for minutes).
    _, chunks, text = _last_reply(page)
    stopped_at = engine.stats.generated_tokens
    page.wait_for_timeout(1000)
    assert engine.stats.generated_tokens == stopped_at
    assert _last_reply(page)[1:] == (chunks, text)


def test_markdown_renderer_is_safe(page):
    html = page.evaluate("""() => renderMarkdown(
        "# Title\\n<img src=x onerror=alert(1)> **bold** and `a<b`\\n\\n- one\\n- two\\n\\n```python\\n" +
        "print('<b>')\\n```\\n[ok](https://example.com) [bad](javascript:alert(1))")""")
    page.set_content(f"<div id='r'>{html}</div>")
    assert page.locator("#r img").count() == 0 and "&lt;img" in html
    assert page.inner_text("#r h1") == "Title"
    assert page.inner_text("#r strong") == "bold"
    assert page.locator("#r li").count() == 2
    assert page.inner_text("#r pre code") == "print('<b>')"
    assert page.locator("#r a").count() == 1 and page.get_attribute("#r a", "href") == "https://example.com"
