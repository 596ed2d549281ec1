"""The browser tests' one requirement check: Debian's Chromium and Playwright must be there. Missing
either FAILS the test that needs it, saying what to install; nothing skips (`make test` installs both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ui import browser


def require_browser():
    """Playwright's ``sync_api`` module, once Chromium (``browser.CHROMIUM``) and Playwright are present."""
    if not Path(browser.CHROMIUM).exists():
        pytest.fail(f"no Chromium at {browser.CHROMIUM} (nor `chromium` on PATH): `make test` installs Debian's "
                    "package (apt-get install chromium), or set CAMSCOPE_CHROMIUM", pytrace=False)
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[test]' (make test does)", pytrace=False)
    return sync_api
