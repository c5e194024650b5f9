"""A real headless Chromium for the HTML report tests (Debian's ``chromium`` + ``chromium-driver``).

The driver path is passed explicitly, so selenium never tries to download one. Where CI runs (``CI`` is
set) a missing browser is a test failure that says how to install it; on a developer's machine without
one, the browser tests are skipped with the same instructions.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "install it with: apt-get install -y chromium chromium-driver (and pip install selenium)"


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _binary() -> str:
    for path in CHROMIUM:
        if Path(path).is_file():
            return path
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        _missing(f"Chromium is not installed; the HTML report is tested in a real browser: {INSTALL}")
    return found


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver that records the browser console."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing(f"selenium is not installed; {INSTALL}")
    binary = _binary()
    if not Path(CHROMEDRIVER).is_file():
        _missing(f"chromedriver is not at {CHROMEDRIVER}; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars", "--allow-file-access-from-files"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """Console entries at error level (uncaught exceptions, failed loads, console.error)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
