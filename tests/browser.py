"""Headless Chromium for the tests of the HTML pages (`tljax.report`, `tljax.sweep`): the page's DOM after its
scripts ran.

`.ci/run` installs Chromium where it runs as root with apt and sets TLJAX_REQUIRE_BROWSER: there a missing browser
fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def dump_dom(page: Path) -> subprocess.CompletedProcess:
    """Opens `page` in headless Chromium, offline, and returns the process, whose stdout is the DOM once the
    page's scripts ran (skips the test, or fails it under CI, without a browser)."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        if os.environ.get("TLJAX_REQUIRE_BROWSER"):
            pytest.fail("TLJAX_REQUIRE_BROWSER is set (.ci/run found or installed Chromium), but no browser is on PATH")
        pytest.skip("no Chromium installed (.ci/run installs it where it runs as root with apt)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *flags, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                               "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
