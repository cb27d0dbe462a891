"""The chat page at / in headless Chromium: type, send, and see a streamed answer."""

from __future__ import annotations

import os

import pytest

from tests.server.conftest import live_server

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def live():
    with live_server() as s:
        yield s


def test_chat_page_streams_an_answer(live, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'smollm2'")
            page.fill("#max_tokens", "12")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.trim().length > 0",
                                   timeout=60_000)
            page.wait_for_function("document.querySelector('.stats')?.textContent.includes('tok/s')",
                                   timeout=60_000)
            answer = page.text_content(".msg.assistant")
            stats = page.text_content(".stats")
            page.screenshot(path=str(tmp_path / "chat.png"))
            assert answer.strip() and "cached" in stats
            # a second turn keeps the conversation; reset clears it
            page.fill("#input", "And of Italy?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.stats').length === 2 && "
                                   "document.querySelectorAll('.stats')[1].textContent.includes('tok/s')",
                                   timeout=60_000)
            assert page.locator(".msg.user").count() == 2
            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 0
