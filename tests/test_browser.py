"""The poetry page in a real browser: Debian's chromium, driven by Playwright, writes a poem with
the shipped model through `llmbook serve`'s streamed completions, and the page is saved as
build/serve.png. No browser is downloaded: without /usr/bin/chromium the test is skipped."""

import json
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from llmbook.data import poem_header
from llmbook.env import REPO_ROOT
from llmbook.pretrained import load_pretrained
from llmbook.serve import create_app, running

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO_ROOT / "build" / "serve.png"
WAIT_MS = 60_000  # for a poem to be written (the machine may be busy)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at "
                                f"{CHROMIUM} (apt-get install chromium); none is downloaded")

# counts the changes to the poem, not the observer's calls: the browser hands over all changes
# made in one task at once, and on a fast machine one network read can carry the whole stream
COUNT_UPDATES = """() => {
  window.updates = 0;
  new MutationObserver((changes) => { window.updates += changes.length; }).observe(
    document.getElementById("poem"), {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def served():
    """(a browser tab showing the page, the server's URL)."""
    model, tokenizer = load_pretrained("poetry-small", "cpu")
    with running(create_app(model, tokenizer, "poetry-small")) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            tab = browser.new_page(viewport={"width": 640, "height": 720})
            tab.goto(f"{url}/")
            yield tab, url
        finally:
            browser.close()


def test_the_page_writes_a_poem_as_it_streams(served):
    page, url = served
    page.select_option("#form", "七言绝句")
    page.fill("#title", "春夜")
    page.fill("#seed", "3")
    page.evaluate(COUNT_UPDATES)
    with page.expect_request("**/v1/completions") as sent:
        page.click("#write")
    body = json.loads(sent.value.post_data)
    assert body["prompt"] == poem_header("七言绝句", "春夜")  # the string the model trained on
    assert body["stream"] is True and body["stop"] == ["\n\n"] and body["seed"] == 3
    page.wait_for_function("document.getElementById('poem').dataset.state === 'done'",
                           timeout=WAIT_MS)
    shown = page.text_content("#poem")
    plain = httpx.post(f"{url}/v1/completions", json={**body, "stream": False},
                       timeout=60).json()
    assert shown == body["prompt"] + plain["choices"][0]["text"]  # all of it, nothing lost
    assert shown.count("\n") >= 2 and not shown.endswith("\n")  # author, verse; blank line cut
    # it grew piece by piece: about one change per character the model wrote (one token each)
    assert page.evaluate("window.updates") > len(plain["choices"][0]["text"]) // 2
    assert page.text_content("#status").startswith("Done")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_the_page_shows_the_servers_error(served):
    page, _ = served
    page.select_option("#form", "五言律诗")
    page.fill("#title", "  Hello ")  # Latin letters: outside the poetry model's vocabulary
    with page.expect_request("**/v1/completions") as sent:
        page.click("#write")
    assert json.loads(sent.value.post_data)["prompt"] == poem_header("五言律诗", "Hello")  # trimmed
    page.wait_for_function("document.getElementById('poem').dataset.state === 'error'",
                           timeout=WAIT_MS)
    status = page.text_content("#status")
    assert "outside the model's vocabulary" in status and "'H' (U+0048)" in status
    page.fill("#title", "")
    page.click("#write")  # the browser's own check for the required title comes first
    assert page.text_content("#status") == status
