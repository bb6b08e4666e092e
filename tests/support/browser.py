"""Headless Chromium, driven through Selenium, for tests that look at a page as a person would.

Debian's ``chromium`` and ``chromium-driver`` (the same source package, so always the same version),
installed by ``scripts/setup.sh`` for the dev extra; Selenium is given both paths, so its Selenium
Manager never looks for (or downloads) a browser or a driver. Each browser gets a fresh, empty profile
and the flags that keep it off the network: without ``--disable-background-networking`` and the others
Chromium reaches for Google's services at start-up.

``python -m tests.support.browser PAGE.html SHOT.png`` takes a full-page screenshot of a page;
``--height`` keeps the top of it only, ``--colors`` makes a palette PNG of that many colours (small
enough for the docs: docs/quality.md says how its screenshot was taken).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("SL_TESTS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SL_TESTS_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # as root, and in containers without user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def missing() -> str | None:
    """Why no browser can be started here (a message saying what to run), or None."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not absent:
        return None
    return (
        f"headless Chromium is not installed ({', '.join(absent)} not found): run scripts/setup.sh "
        "(`make setup`), which installs Debian's chromium and chromium-driver for the dev extra "
        "(or: apt-get install -y --no-install-recommends chromium chromium-driver)"
    )


@contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A headless Chromium (a Selenium ``WebDriver``) with a fresh profile, quit on leaving."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = missing()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="sl-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        # the page's console and its uncaught errors, read back by console_errors()
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The errors logged since the last call: ``console.error``, uncaught exceptions, resources that
    failed to load (a broken image among them)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver: Any, path: Path, width: int = 1200, height: int | None = None) -> None:
    """The page as a PNG: all of it (the window made as tall as the document), or its top ``height``
    pixels."""
    if height is None:
        height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height)
    driver.save_screenshot(str(path))


def to_palette(path: Path, colors: int) -> None:
    """The PNG rewritten with a palette of ``colors`` colours (plots and text need few): a third of
    the bytes."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.quantize(colors, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=None, help="the top of the page only")
    parser.add_argument("--colors", type=int, default=None, help="a palette PNG of this many colours")
    args = parser.parse_args()
    with chromium(args.width) as driver:
        driver.get(args.page.resolve().as_uri())
        errors = console_errors(driver)
        screenshot(driver, args.png, args.width, args.height)
    if args.colors:
        to_palette(args.png, args.colors)
    print(f"{args.png}: {args.png.stat().st_size:,} bytes; console errors: {errors or 'none'}")


if __name__ == "__main__":
    main()
