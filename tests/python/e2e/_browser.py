"""Headless Chromium for the page tests (Debian's chromium and chromium-driver, installed by bench/setup.sh)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_LOAD_GUARD_S = 60  # a hang guard, not a timing assertion


@contextlib.contextmanager
def headless_chromium(window: str) -> Iterator[WebDriver]:
    """A browser with a `window` ("WIDTH,HEIGHT") viewport that logs the console (Content-Security-Policy
    violations show there), quit on exit."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    assert not missing, f"{missing} not installed: run `bash bench/setup.sh` (it installs chromium and chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: the tests run as root in a container, where Chromium's sandbox cannot start.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={window}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given, so selenium never looks for (or downloads) a browser or a driver of its own.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_LOAD_GUARD_S)
    try:
        yield driver
    finally:
        driver.quit()
