"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against the example service.

`make test` installs chromium when it is missing; without it (and without root
to install it) this test skips, saying why. Playwright never downloads a browser
here: it drives /usr/bin/chromium through ``executable_path``. On failure a
screenshot is saved under the test's tmp_path, and its path is printed.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect
from pytest_aiohttp import AiohttpServer

from asyncsched import Scheduler
from examples import web_service

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "browser-token"
TIMEOUT_MS = 30_000
SCRIPT = "<script>window.pwned = 1</script> six words of text"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"{CHROMIUM} is missing: `make test` installs Debian's chromium (as root)")


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A page of a fresh browser; a screenshot of it is saved if the test fails."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error"
                    and "status of 401" not in message.text else None)  # the first request, before the token
            try:
                yield page
                assert not errors, errors
            except BaseException:
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=shot, full_page=True)
                print(f"screenshot of the failed page: {shot}")
                raise
        finally:
            await browser.close()


async def test_the_dashboard_runs_a_batch_and_shows_it_live(aiohttp_server: AiohttpServer, page: Page) -> None:
    server = await aiohttp_server(web_service.build_app(Scheduler(workers=2), token=TOKEN))
    await page.goto(str(server.make_url("/asyncsched/")))

    # the token is asked for once, then kept for the tab's session
    await page.fill("#token-input", TOKEN)
    await page.click("#token-form button")
    await expect(page.locator("#submit-form")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('asyncsched.token')") == TOKEN

    texts = ["one two three", "", SCRIPT, "a b", "   ", "just four words here", "x", "y z"]
    await page.select_option("#task-select", "word_count")
    await page.fill("#inputs", json.dumps(texts))
    await page.click("#submit-form button")
    await expect(page.locator("#submit-status")).to_contain_text("is running")

    card = page.locator("#live .card").first
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "100")
    await expect(card.locator(".percent")).to_have_text("100%")
    await expect(card.locator(".done")).to_have_text("8/8")
    await expect(card.locator(".card-state")).to_have_text("finished")
    await expect(card.locator(".success")).to_have_text("75%")
    await expect(card.locator(".counts")).to_contain_text("failed 2")

    rows = page.locator("#results tbody tr")
    await page.select_option("#results-status", "failed")
    await expect(rows).to_have_count(2)
    for status in await rows.evaluate_all("rows => rows.map(row => row.dataset.status)"):
        assert status == "failed"
    await expect(rows.first).to_contain_text("ValueError: the text is empty")

    await page.select_option("#results-status", "completed")
    await expect(rows).to_have_count(6)
    shown = page.locator("#results td", has_text="<script>window.pwned")
    await expect(shown).to_have_text(f"counting the words of {SCRIPT}")  # the tag shows as text
    assert await page.locator("main script").count() == 0
    assert await page.evaluate("window.pwned") is None

    # a slow batch, cancelled from its card
    await page.select_option("#task-select", "slow_square")
    await page.fill("#inputs", json.dumps([[n, 60] for n in range(3)]))
    await page.click("#submit-form button")
    slow = page.locator("#live .card").first
    await expect(slow.locator(".card-state")).to_have_text("running")
    await expect(slow.locator(".messages li").first).to_contain_text("step 1 of 4")
    await slow.locator("button.cancel").click()
    await expect(slow.locator(".card-state")).to_have_text("finished")
    await expect(slow.locator(".counts")).to_contain_text("cancelled 3")
    await expect(page.locator("#batches tbody tr")).to_have_count(2)


async def test_a_token_entered_after_the_events_were_refused_follows_them_again(aiohttp_server: AiohttpServer,
                                                                                page: Page) -> None:
    first = await aiohttp_server(web_service.build_app(Scheduler(workers=1), token=TOKEN))
    await page.goto(str(first.make_url("/asyncsched/")))
    await page.fill("#token-input", TOKEN)
    await page.click("#token-form button")
    connection = page.locator("#connection")
    await expect(connection).to_have_text("live")
    port = first.port
    await first.close()  # the server comes back with another token before the page reconnects
    await aiohttp_server(web_service.build_app(Scheduler(workers=1), token="another-token"), port=port)
    await expect(page.locator("#token-form")).to_be_visible()
    await page.fill("#token-input", "another-token")
    await page.click("#token-form button")
    await expect(connection).to_have_text("live")  # it stayed "reconnecting", with no events, until a reload


async def test_the_dashboard_pages_through_more_batches_than_one_page_holds(aiohttp_server: AiohttpServer,
                                                                           page: Page) -> None:
    scheduler = Scheduler(workers=1)
    server = await aiohttp_server(web_service.build_app(scheduler, token=TOKEN))
    for n in range(105):
        await scheduler.run([], batch_id=f"b{n:03}")
    await page.goto(str(server.make_url("/asyncsched/")))
    await page.fill("#token-input", TOKEN)
    await page.click("#token-form button")
    rows, shown = page.locator("#batches tbody tr"), page.locator("#batches-range")
    await expect(shown).to_have_text("1\u2013100 of 105")
    await expect(rows).to_have_count(100)
    await page.click("#batches-older")  # the oldest were out of reach
    await expect(shown).to_have_text("101\u2013105 of 105")
    await expect(rows.first).to_have_attribute("data-batch-id", "b004")  # newest first
    await expect(page.locator("#batches-older")).to_be_disabled()

    # a batch run meanwhile has its live card, though its row is on the first page
    pages: list[str] = []
    page.on("request", lambda request: pages.append(request.url) if "api/batches?" in request.url else None)
    await page.select_option("#task-select", "slow_square")
    await page.fill("#inputs", json.dumps([[3, 2]]))
    await page.click("#submit-form button")
    card = page.locator("#live .card").first
    await expect(card.locator(".card-state")).to_have_text("running")
    await expect(card.locator(".messages li").first).to_contain_text("step 3 of 4")
    assert len(pages) <= 3, pages  # the page is read again for the batch's start, not for each of its events
    await page.click("#batches-newer")
    await expect(rows).to_have_count(100)
    await expect(rows.nth(1)).to_have_attribute("data-batch-id", "b104")  # after the new one
