"""The chat page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through selenium):
load ``/``, attach a bundled example image, ask its question, watch the answer stream in, start a new chat."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from minillava.config import BUNDLED_MODEL
from tests.serve_fixtures import server_process

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run installs them)"
if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI"):
    raise RuntimeError(f"the page test must run in CI: {MISSING}")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=MISSING)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# Records every text the answer bubble shows, so the test can tell a streamed answer from one that appears whole.
WATCH_ANSWERS = """
window.seenAnswers = [];
new MutationObserver(() => {
  const box = document.querySelector('.assistant');
  if (box && box.textContent) window.seenAnswers.push(box.textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with server_process(tmp_path_factory.mktemp("page") / "server.log", "--slots", "2") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_streams_an_answer_about_an_attached_image(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    example = json.loads((BUNDLED_MODEL / "examples.json").read_text())[0]
    wait = WebDriverWait(browser, 60)
    browser.get(server)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "shapes")
    browser.find_element(By.ID, "image").send_keys(str(BUNDLED_MODEL / example["image"]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#previews img"))
    browser.execute_script(WATCH_ANSWERS)
    browser.find_element(By.ID, "message").send_keys(example["question"])
    browser.find_element(By.ID, "send").click()

    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant[data-done]"))
    assert answer.get_attribute("data-done") == "true", answer.text
    assert answer.text == example["answer"]
    seen = browser.execute_script("return window.seenAnswers")
    assert len(set(seen)) > 1 and all(example["answer"].startswith(text) for text in seen), seen
    user = browser.find_element(By.CSS_SELECTOR, ".user")
    assert user.text == example["question"] and user.find_elements(By.TAG_NAME, "img")

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .message")
