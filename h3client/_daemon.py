"""Finding a local daemon, and starting one when none answers (``autostart``)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from h3client._config import ClientConfig, read_daemon_file
from h3client.client import Client

logger = logging.getLogger(__name__)


def start_local_daemon(data_dir: Path, *, timeout_s: float = 20.0) -> str | None:
    """Start ``h3d serve`` detached (it outlives this process); return its URL once healthy.

    Returns None if it did not become healthy in time (its log is ``<data dir>/h3d.log``).
    The daemon is a separate program: h3client never imports it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    before = read_daemon_file(data_dir)
    with open(data_dir / "h3d.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "h3d", "serve", "--data-dir", str(data_dir), "--port", "0"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not killed with the training process's group
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = read_daemon_file(data_dir)
        if info and info != before and info.get("pid") == proc.pid:
            url = str(info["url"])
            with Client(url, data_dir=data_dir) as c:
                if c.health():
                    return url
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def ensure_daemon(config: ClientConfig, *, autostart: bool) -> str | None:
    """The URL of a healthy daemon for ``config``, starting one if allowed; else None."""
    with Client(config.url, config.token, data_dir=config.data_dir) as c:
        if c.health():
            return config.url
    if not autostart or config.url_is_explicit:
        return None
    url = start_local_daemon(config.data_dir)
    if url:
        logger.info("started a local h3d daemon at %s (data dir %s)", url, config.data_dir)
    return url
