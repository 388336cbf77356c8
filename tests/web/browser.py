"""Debian's Chromium driven by Playwright (Playwright's own browser download is not used)."""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None. In CI a missing browser is an error."""
    if CHROMIUM.exists():
        return None
    reason = f"{CHROMIUM} is missing; install Debian's chromium package (apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI=true but {reason}")
    return reason


# How long an expect() assertion waits for the page to reach the expected state. Playwright's
# default, 5 s, is also what some promises take (a revoked login ends its streams within one
# 5 s re-check), and a test machine under load runs late: a bound, not a speed target.
EXPECT_TIMEOUT_MS = 30_000


def launch(playwright):
    from playwright.sync_api import expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
