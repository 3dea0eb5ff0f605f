"""Headless Chromium to look at the atlas as a reader does: the browser tests, the page-load
benchmark (``bench/report.py``) and the findings screenshot share this one set-up. It needs
Debian's ``chromium`` and ``chromium-driver`` packages and ``selenium`` (the dev extra); nothing
else in headlab imports it."""

from __future__ import annotations

import shutil
from typing import Any

from headlab.errors import ConfigError

__all__ = ["CHROMIUM", "DRIVER", "headless_chromium", "missing"]

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: 1400 × 1000 pixels, and no network: every host but loopback goes to a dead proxy
ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1400,1000", "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>")  # fmt: skip


def missing() -> str | None:
    """Why no headless browser can start here, naming the fix; ``None`` when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, or the dev extra)"
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        return (f"{CHROMIUM} or {DRIVER} is missing (Debian: apt-get install -y chromium "
                "chromium-driver)")  # fmt: skip
    return None


def headless_chromium(*, console_log: bool = False, offline: bool = False) -> Any:
    """A selenium driver of headless Chromium with no network (see :data:`ARGS`); ``offline``
    also switches the network off in DevTools, and ``console_log`` keeps the page's console
    messages for ``driver.get_log("browser")``. The caller quits it."""
    why = missing()
    if why is not None:
        raise ConfigError(f"cannot start a headless browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ARGS:
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    if offline:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
        )
    return driver
