"""The playground in a real browser: Debian's chromium, headless, driven by Playwright.

The app starts as a fresh install does with no network: default model, hub unreachable,
nothing cached, so it serves the labelled fallback (the shipped demo model, or the random
stand-in where none ships). The test opens the page with ?prompt=,
sends a message holding <script> and an onerror image, sees both panes fill and the stats,
the speed-up line and both charts appear, checks the markup is shown as text and never ran,
reopens the conversation from a deep link, and saves screenshots in its tmp folder.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.test_app_common import AppServer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> hello'

# CI sets BITNET_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping quietly.
REQUIRED = os.environ.get("BITNET_REQUIRE_BROWSER", "") not in ("", "0")
try:
    import playwright.sync_api as playwright_api
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not os.path.exists(CHROMIUM):
    if REQUIRED:
        raise RuntimeError(f"BITNET_REQUIRE_BROWSER is set but there is no chromium at {CHROMIUM}")
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("app-browser")
    env = {"HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"}
    with AppServer("microsoft/bitnet-b1.58-2B-4T", work, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_fresh_offline_start_serves_a_labelled_fallback(server):
    status = server.status
    assert status["fallback"]  # the demo model when it ships, else the random stand-in
    assert "Cannot reach the Hugging Face hub" in status["notice"]
    log = server.log_text()
    assert log.count("Cannot reach the Hugging Face hub") == 1


def test_page_chat_compare_stats_chart_and_script_as_text(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "?prompt=Hello%20from%20the%20URL", wait_until="domcontentloaded")
    box = page.locator("#message textarea")
    box.wait_for(timeout=60_000)
    # ?prompt= pre-fills the message box
    page.wait_for_function(
        "() => document.querySelector('#message textarea').value === 'Hello from the URL'",
        timeout=30_000)
    banner = page.locator("#banner").inner_text()
    assert "Cannot reach the Hugging Face hub" in banner
    if server.status["untrained"]:
        assert "untrained stand-in" in banner and "tiny random" in banner
    else:
        assert "Shakespeare demo model" in banner

    box.fill(HOSTILE)
    page.click("#send")
    page.wait_for_function(
        "() => (document.querySelector('#summary')?.innerText || '').includes('Speed-up')",
        timeout=60_000)
    # both panes hold the user message and a non-empty answer
    for pane in ("#chat-ternary", "#chat-baseline"):
        bot = page.locator(f"{pane} .message-row.bot-row, {pane} [data-testid='bot']").last
        assert bot.inner_text().strip(), f"{pane}: empty answer"
        user = page.locator(f"{pane} [data-testid='user']").last
        # the markup is shown as text ...
        assert "<script>window.__pwned = 1</script>" in user.inner_text()
        assert '<img src=x onerror="window.__pwned = 2">' in user.inner_text()
        # ... and is not in the DOM as elements
        assert page.locator(f"{pane} script").count() == 0
        assert page.locator(f"{pane} img[src='x']").count() == 0
    assert page.evaluate("window.__pwned") is None
    for stats in ("#stats-ternary", "#stats-baseline"):
        text = page.locator(stats).inner_text()
        assert "TTFT" in text and "decode" in text and "tok/s" in text and "weights" in text
    assert "int2" in page.locator("#stats-baseline").inner_text()
    # both charts drew something
    for plot in ("#speed-plot", "#time-plot"):
        page.wait_for_function(
            f"() => !!document.querySelector('{plot} svg, {plot} canvas')", timeout=30_000)
    page.wait_for_timeout(500)  # let the charts finish their transition
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    copy_to = os.environ.get("BITNET_SCREENSHOT_DIR")
    if copy_to:  # to look at it after the run
        os.makedirs(copy_to, exist_ok=True)
        shutil.copy(shot, os.path.join(copy_to, "playground.png"))

    # the deep link reopens the conversation (what the share button copies)
    link = page.evaluate("""async () => {
        const r = await fetch(`gradio_api/deep_link?session_hash=${window.__gradio_session_hash__}`);
        return (await r.text()).replace(/^"|"$/g, '');
    }""")
    assert link
    page.click("button:has-text('Share this conversation')")  # copies the link; must not fail
    reopened = browser.new_page(viewport={"width": 1400, "height": 1200})
    reopened.goto(f"{server.url}?deep_link={link}", wait_until="domcontentloaded")
    reopened.locator("#chat-ternary [data-testid='user']").last.wait_for(timeout=30_000)
    assert "<script>window.__pwned = 1</script>" in \
        reopened.locator("#chat-ternary [data-testid='user']").last.inner_text()
    assert "Speed-up" in reopened.locator("#summary").inner_text()
    # both panes, the stats and the charts come back
    assert "<script>" in reopened.locator("#chat-baseline [data-testid='user']").last.inner_text()
    assert "TTFT" in reopened.locator("#stats-baseline").inner_text()
    for plot in ("#speed-plot", "#time-plot"):
        reopened.wait_for_function(
            f"() => !!document.querySelector('{plot} svg, {plot} canvas')", timeout=30_000)
    reopened.wait_for_timeout(500)
    assert reopened.evaluate("window.__pwned") is None
    reopened.screenshot(path=str(tmp_path / "deep-link.png"), full_page=True)
    if copy_to:
        shutil.copy(tmp_path / "deep-link.png", os.path.join(copy_to, "deep-link.png"))
    assert not [e for e in errors if "pwned" in e]
    reopened.close()
    page.close()
