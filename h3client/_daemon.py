"""Finding a local daemon, and starting one when none answers (``autostart``).

The health probe uses the standard library's ``http.client``: a profiler's constructor runs
on the training thread, and httpx (~90 ms to import) is left to the sender thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from h3client._config import (
    ClientConfig,
    private_dir,
    private_file,
    read_daemon_file,
    read_token_file,
)

logger = logging.getLogger(__name__)


def probe(url: str, token: str | None = None, timeout_s: float = 1.0) -> tuple[bool, bool | None]:
    """``GET {url}/healthz`` with ``token``: (healthy, authorized).

    ``healthy``: an h3d answered 200 within ``timeout_s`` (another program's 200 is not
    one). ``authorized``: whether that daemon
    takes ``token`` (False when none is given), or None when it does not say (an h3d older
    than the field) or did not answer.
    """
    import http.client
    import json

    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", parts.path.rstrip("/") + "/healthz", headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return False, None
        try:
            body = json.loads(resp.read())
        except ValueError:
            body = None
        if not (isinstance(body, dict) and body.get("status") == "ok" and "version" in body):
            return False, None  # another program's health check on this port, not an h3d
        authorized = body.get("authorized")
        return True, authorized if isinstance(authorized, bool) else None
    except (OSError, http.client.HTTPException):
        return False, None
    finally:
        conn.close()


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET {url}/healthz`` answers 200 within ``timeout_s``."""
    return probe(url, timeout_s=timeout_s)[0]


#: Daemons this process started: held, so that a ``Popen`` is not collected (with a
#: ResourceWarning) while its daemon serves on.
_started: list[Any] = []  # subprocess.Popen (imported when one is started)


def start_local_daemon(data_dir: Path, *, timeout_s: float = 20.0) -> str | None:
    """Start ``h3d serve`` detached (it outlives this process); return its URL once healthy.

    Returns None if it did not become healthy in time (its log is ``<data dir>/h3d.log``).
    The daemon is a separate program: h3client never imports it.
    """
    import subprocess

    private_dir(data_dir)
    before = read_daemon_file(data_dir)
    with open(data_dir / "h3d.log", "ab", opener=private_file) as log:
        since = log.seek(0, os.SEEK_END)  # what this start writes comes after
        proc = subprocess.Popen(
            [sys.executable, "-m", "h3d", "serve", "--data-dir", str(data_dir), "--port", "0"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not killed with the training process's group
        )
    _started.append(proc)  # it outlives this process, which need not wait for it
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = read_daemon_file(data_dir)
        if info and info != before and info.get("pid") == proc.pid:
            url = str(info["url"])
            if is_healthy(url):
                return url
        if proc.poll() is not None:
            why = last_error_line(data_dir / "h3d.log", since)
            if why:  # its one line (a node in use, a bad store): said here, not only there
                logger.warning("h3: the daemon it started exited: %s", why)
            return None
        time.sleep(0.02)  # a file read per poll: a 100 ms poll added ~50 ms to autostart
    return None


def last_error_line(log: Path, since: int) -> str | None:
    """The last ``h3d: ...`` line a daemon wrote to its log after offset ``since`` (its
    one-line reason to exit), or None. (h3d's demo reads its daemon's log the same way.)"""
    try:
        with open(log, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line for line in reversed(tail) if line.startswith("h3d: ")), None)


def _serves(url: str, data_dir: Path) -> bool:
    """A daemon answers at ``url`` and takes ``data_dir``'s token: it serves that data dir."""
    healthy, authorized = probe(url, read_token_file(data_dir))
    return healthy and authorized is not False


@contextlib.contextmanager
def _one_starter(data_dir: Path, timeout_s: float) -> Iterator[None]:
    """One autostart at a time per data dir, across processes: ``torchrun``'s ranks, or
    scripts started together, would otherwise each start a daemon, and all but one of those
    exit at the data dir's lock while their profilers go offline. Waits up to ``timeout_s``
    (then goes on unlocked); no wait where there is no ``flock`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(data_dir / "autostart.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the flock


def ensure_daemon(config: ClientConfig, *, autostart: bool) -> str | None:
    """The URL of a healthy daemon for ``config``, starting one if allowed; else None.

    A daemon found on the default port when the data dir records none (no ``daemon.json``)
    is used only if it takes the token: one that refuses it serves another data dir (say a
    demo's, with this one in ``H3D_DATA_DIR``), whose every request would answer 401, so
    this data dir gets a daemon of its own, on a free port, as when none answers. Processes
    that start together start one daemon between them.
    """
    healthy, authorized = probe(config.url, config.token)
    if healthy and (
        authorized is not False or config.url_is_explicit or read_daemon_file(config.data_dir)
    ):
        return config.url  # an explicit URL or this data dir's daemon: the caller's choice
    if healthy:
        logger.warning(
            "h3: the daemon at %s refuses this data dir's token (%s): it serves another data dir%s",
            config.url,
            config.data_dir,
            "; starting one for this data dir" if autostart else "",
        )
    if not autostart or config.url_is_explicit:
        return None
    private_dir(config.data_dir)
    with _one_starter(config.data_dir, timeout_s=30.0):
        info = read_daemon_file(config.data_dir)
        if info and _serves(str(info["url"]), config.data_dir):
            return str(info["url"])  # another process started it while this one waited
        url = start_local_daemon(config.data_dir)
    if url:
        logger.info("started a local h3d daemon at %s (data dir %s)", url, config.data_dir)
    return url
