"""Finding a local daemon, and starting one when none answers (``autostart``).

The health probe uses the standard library's ``http.client``: a profiler's constructor runs
on the training thread, and httpx (~90 ms to import) is left to the sender thread.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from h3client._config import ClientConfig, read_daemon_file

logger = logging.getLogger(__name__)


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET {url}/healthz`` answers 200 within ``timeout_s``."""
    import http.client

    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def start_local_daemon(data_dir: Path, *, timeout_s: float = 20.0) -> str | None:
    """Start ``h3d serve`` detached (it outlives this process); return its URL once healthy.

    Returns None if it did not become healthy in time (its log is ``<data dir>/h3d.log``).
    The daemon is a separate program: h3client never imports it.
    """
    import subprocess

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
            if is_healthy(url):
                return url
        if proc.poll() is not None:
            return None
        time.sleep(0.02)  # a file read per poll: a 100 ms poll added ~50 ms to autostart
    return None


def ensure_daemon(config: ClientConfig, *, autostart: bool) -> str | None:
    """The URL of a healthy daemon for ``config``, starting one if allowed; else None."""
    if is_healthy(config.url):
        return config.url
    if not autostart or config.url_is_explicit:
        return None
    url = start_local_daemon(config.data_dir)
    if url:
        logger.info("started a local h3d daemon at %s (data dir %s)", url, config.data_dir)
    return url
