"""What docs/dashboard.md promises, checked against a real daemon and Debian's Chromium
(driven by Playwright, with test_dashboard.py's fixture and page wrapper).

"Opening it": `h3d demo` and `h3d status` print a link with the token in its fragment, and
the page takes the token from there. A token written by hand into ``<data dir>/token``
(``openssl rand -base64 24``) holds "+" and "/": the page read the fragment as a form, so
"+" came out as a space and the daemon refused the token of its own link.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from h3d.cli import dashboard_link
from h3d.config import Settings
from tests.conftest import Daemon, daemon_env
from tests.h3d import test_dashboard as _dash

browser = _dash.browser  # the same Chromium fixture
needs_browser = _dash.needs_browser

# the shape of `openssl rand -base64 24`: letters, digits, "+" and "/"
BASE64_TOKEN = "q7+Vb0/3Zk+f1xW2mN8+pL4sT6uY9cE/"


@needs_browser
@pytest.mark.parametrize("secret", [BASE64_TOKEN, "a&run=x%41b+c/d=e"])
def test_the_printed_link_opens_the_dashboard_with_a_hand_written_token(
    secret: str, browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second token breaks a link that is not percent-encoded: its "&run=" would be
    another parameter, and "%41" would decode to "A"."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    token = data_dir / "token"
    token.write_text(secret + "\n")
    os.chmod(token, 0o600)
    d = Daemon(
        data_dir,
        daemon_env(
            data_dir,
            H3D_POWER_BACKENDS="constant:50",
            H3D_SAMPLE_INTERVAL_S="0.05",
            H3D_LOG_LEVEL="WARNING",
        ),
    ).start()
    try:
        assert d.token == secret  # the daemon keeps the token it was given
        with d.client() as c:
            rid = c.post("/v1/runs", json={"name": "base64-token"}).json()["id"]
            c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
        monkeypatch.delenv("H3D_TOKEN", raising=False)
        link = dashboard_link(Settings(data_dir=data_dir), d.url, rid)  # as `h3d demo` prints
        assert link.split("#", 1)[1].count("&") == 1  # token and run, nothing else
        with _dash.opened(browser, d.url) as t:
            t.page.goto(link)
            t.page.wait_for_selector("#run-head h2", timeout=15_000)
            assert "base64-token" in t.page.inner_text("#run-head h2")
            assert t.page.locator("#login-note").count() == 0
            assert t.page.url.endswith(f"#/run/{rid}")  # the token left the address bar
            # the list, through the header link: the token kept in the tab works there too
            t.page.click("header nav a")
            t.page.wait_for_selector("table.runs-table tbody tr")
            assert t.names() == ["base64-token"]
    finally:
        d.stop()
