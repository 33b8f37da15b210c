"""Finding a local daemon, and starting one when none answers (``autostart``).

The health probe uses the standard library's ``http.client``: a profiler's constructor runs
on the training thread, and httpx (~90 ms to import) is left to the sender thread.
"""

from __future__ import annotations

import contextlib
import json
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
    UnsafeDir,
    private_dir,
    private_file,
    read_daemon_file,
    read_json_file,
    read_token_file,
)
from h3client.client import _is_loopback

logger = logging.getLogger(__name__)


def probe(url: str, token: str | None = None, timeout_s: float = 1.0) -> tuple[bool, bool | None]:
    """``GET {url}/healthz?nonce=N``: (healthy, authorized). The token is never sent.

    ``healthy``: an h3d answered 200 within ``timeout_s`` (another program's 200 is not
    one). ``authorized``: True if the answer's ``proof`` shows that the server holds
    ``token`` (:func:`proof`), False if it proves another token (another data dir's daemon)
    or no token is given, None if it proves nothing (an h3d older than the proof, or another
    program that answers like one) or did not answer. Only a daemon that proved it holds
    the token is sent it: anyone may listen on the port a client probes.
    """
    parts = urlsplit(url)
    if _is_loopback(url) and not _listens(parts.hostname or "127.0.0.1", parts.port, timeout_s):
        return False, None  # nothing listens: no need of http.client (20 ms to import)
    import http.client

    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    nonce = os.urandom(16).hex()
    try:
        conn.request("GET", parts.path.rstrip("/") + f"/healthz?nonce={nonce}")
        resp = conn.getresponse()
        if resp.status != 200:
            return False, None
        try:
            body = json.loads(resp.read())
        except ValueError:
            body = None
        if not (isinstance(body, dict) and body.get("status") == "ok" and "version" in body):
            return False, None  # another program's health check on this port, not an h3d
        if token is None:
            return True, False
        sent = body.get("proof")
        if not isinstance(sent, str):
            return True, None
        import hmac

        port = parts.port or (443 if parts.scheme == "https" else 80)
        return True, hmac.compare_digest(sent.encode(), proof(token, port, nonce).encode())
    except (OSError, http.client.HTTPException):
        return False, None
    finally:
        conn.close()


def _listens(host: str, port: int | None, timeout_s: float) -> bool:
    """Whether a loopback ``host`` takes a connection on ``port`` (refused at once when
    nothing listens: the usual answer when a profiler starts before any daemon)."""
    import socket

    try:
        socket.create_connection((host, port or 80), timeout=timeout_s).close()
    except ConnectionRefusedError:
        return False
    except OSError:  # (a timeout, an address this host lacks): the request says
        return True
    return True


def proof(token: str, port: int, nonce: str) -> str:
    """What a daemon holding ``token`` answers at ``/healthz?nonce=<nonce>`` on ``port``:
    HMAC-SHA256, keyed with the token, of ``h3d-healthz <port> <nonce>``, in hex (the
    daemon's ``h3d.security.healthz_proof``; h3client never imports h3d). The port binds
    the proof to the connection: one relayed from the daemon's own port does not pass."""
    import hashlib
    import hmac

    message = f"h3d-healthz {port} {nonce}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET {url}/healthz`` answers 200 within ``timeout_s``."""
    return probe(url, timeout_s=timeout_s)[0]


#: Daemons this process started: held, so that a ``Popen`` is not collected (with a
#: ResourceWarning) while its daemon serves on.
_started: list[Any] = []  # subprocess.Popen (imported when one is started)


#: The lock ``h3d serve`` holds on its data dir (``h3d.datadir.LOCK_NAME``).
_DAEMON_LOCK = "h3d.lock"


def _daemon_holds(data_dir: Path) -> bool:
    """True if a process holds the data dir's ``h3d.lock``: an ``h3d serve`` takes it first
    thing, so a daemon is starting there (``daemon.json`` comes once it serves) or serves
    there. False where there is no ``flock`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(data_dir / _DAEMON_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases a shared lock taken
    return False


#: What a starting ``h3d serve`` writes once it has read its power devices, before it
#: serves (``h3d.power.early``): ``{"pid": ..., "t": ...}``.
SAMPLING_NAME = "sampling.json"


def _sampling_pid(data_dir: Path) -> int | None:
    """The pid in the data dir's ``sampling.json``, if any."""
    pid = (read_json_file(data_dir / SAMPLING_NAME) or {}).get("pid")
    return pid if isinstance(pid, int) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or this system cannot say
    return True


class DaemonStart:
    """A local daemon starting for ``data_dir``: ``h3d serve`` spawned detached (it
    outlives this process), or, if a daemon holds the data dir already (one started by hand
    a moment ago, still starting), that one. :meth:`wait` returns its URL once it serves.

    A daemon that takes the data dir before the one spawned here could (which then exits)
    is waited for instead: the data dir is that daemon's, with the store it was started on.
    One is spawned here if that daemon exits without serving. The daemon is a separate
    program: h3client never imports it.
    """

    def __init__(self, data_dir: Path, *, timeout_s: float = 20.0) -> None:
        private_dir(data_dir, in_data_dir=False)
        self.data_dir = data_dir
        self.deadline = time.monotonic() + timeout_s
        self._before = read_daemon_file(data_dir)
        self._proc: Any = None
        self._since = 0
        self.failed = False
        if _daemon_holds(data_dir):
            logger.info("h3: a daemon is starting in %s; waiting for it", data_dir)
        else:
            self._proc, self._since = _spawn(data_dir)

    def _samples(self) -> bool:
        """Whether the awaited daemon reads power: the one spawned here, else a live one
        (the data dir's holder; a killed daemon's file names a dead pid)."""
        pid = _sampling_pid(self.data_dir)
        if pid is None:
            return False
        return pid == self._proc.pid if self._proc is not None else _alive(pid)

    def wait(self, *, sampling: bool = False) -> str | bool | None:
        """The daemon's URL once it serves (it proved that it holds the data dir's token);
        None if none did by the deadline (the log of one started here is
        ``<data dir>/h3d.log``). ``sampling``: True as soon as it reads power (its
        ``sampling.json``), which comes before it serves (if it serves first: its URL)."""
        data_dir = self.data_dir
        while not self.failed and time.monotonic() < self.deadline:
            info = read_daemon_file(data_dir)
            # the daemon started here, once it wrote its daemon.json; else the holder's, whose
            # proof of the data dir's token tells it from a file a killed daemon left
            awaited = self._proc is None or (
                info != self._before and info is not None and info.get("pid") == self._proc.pid
            )
            if info and awaited and _serves(str(info["url"]), data_dir):
                return str(info["url"])
            if sampling and self._samples():
                return True
            if self._proc is None:
                if not _daemon_holds(data_dir):  # it exited (or stopped) without serving
                    self._proc, self._since = _spawn(data_dir)
            elif self._proc.poll() is not None:
                if _daemon_holds(data_dir):  # another daemon took the data dir first
                    logger.info("h3: another daemon took %s first; waiting for it", data_dir)
                    self._proc = None
                    continue
                why = last_error_line(data_dir / "h3d.log", self._since)
                if why:  # its one line (a node in use, a bad store): said here, not only there
                    logger.warning("h3: the daemon it started exited: %s", why)
                self.failed = True
                break
            time.sleep(0.005)  # two file reads per poll: a 100 ms poll added ~50 ms to autostart
        return None


def _spawn(data_dir: Path) -> tuple[Any, int]:
    """``h3d serve --port 0`` on ``data_dir``, detached, logging to ``<data dir>/h3d.log``:
    its ``Popen`` and the log's offset where what it writes begins."""
    import subprocess

    with open(data_dir / "h3d.log", "ab", opener=private_file) as log:
        since = log.seek(0, os.SEEK_END)
        proc = subprocess.Popen(
            [sys.executable, "-m", "h3d", "serve", "--data-dir", str(data_dir), "--port", "0"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not killed with the training process's group
        )
    _started.append(proc)  # it outlives this process, which need not wait for it
    return proc, since


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
    """A daemon answers at ``url`` and proves it holds ``data_dir``'s token: it serves that
    data dir."""
    healthy, authorized = probe(url, read_token_file(data_dir))
    return healthy and authorized is True


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
    """The URL of a healthy daemon for ``config``, starting one if allowed (and waiting
    until it serves); else None. See :func:`find_daemon`."""
    found = find_daemon(config, autostart=autostart, serving=True)
    assert not isinstance(found, DaemonStart)
    return found


def find_daemon(
    config: ClientConfig, *, autostart: bool, serving: bool = False
) -> str | DaemonStart | None:
    """The URL of a healthy daemon for ``config``; else, if allowed, one started: its
    :class:`DaemonStart` once it reads power (before it serves: the caller's sender waits
    for the rest, :meth:`DaemonStart.wait`), or its URL once it serves (``serving``);
    else None.

    A daemon found through the data dir's ``daemon.json`` or on the default port is used
    only if it proves that it holds the token (:func:`probe`), which is sent to no other
    server: anyone may listen on a port (another local user, waiting for tokens and runs),
    and a daemon that refuses the token serves another data dir (say a demo's, with this
    one in ``H3D_DATA_DIR``), whose every request would answer 401. This data dir then gets
    a daemon of its own, on a free port, as when none answers. An explicit URL (argument or
    ``H3D_URL``) is the caller's choice. Processes that start together start one daemon
    between them, and none while a daemon that holds the data dir is starting
    (:class:`DaemonStart`). None also when the data dir is another user's or writable
    by one (a token given, none read there: :func:`h3client._config.private_dir`); the
    found URL then still has to prove itself before it is sent the token
    (``Client.proven``).
    """
    # (no token yet: one its daemon wrote since the config was resolved)
    token = config.token if config.token is not None else read_token_file(config.data_dir)
    healthy, authorized = probe(config.url, token)
    if healthy and (authorized or config.url_is_explicit):
        return config.url  # proven to hold the token, or named by the caller
    starting = "; starting one for this data dir" if autostart else ""
    if healthy and authorized is False:
        logger.warning(
            "h3: the daemon at %s refuses this data dir's token (%s): it serves another data dir%s",
            config.url,
            config.data_dir,
            starting,
        )
    elif healthy:
        logger.warning(
            "h3: what answers at %s did not prove that it holds this data dir's token (%s), "
            "so the token is not sent to it (another user's program on that port, or an h3d "
            "older than this client)%s",
            config.url,
            config.data_dir,
            starting,
        )
    if not autostart or config.url_is_explicit:
        return None
    try:
        private_dir(config.data_dir, in_data_dir=False)
    except UnsafeDir as exc:  # (a token given, none read there): no daemon for it either
        logger.warning("h3: not starting a daemon: %s", exc)
        return None
    with _one_starter(config.data_dir, timeout_s=30.0):
        info = read_daemon_file(config.data_dir)
        if info and _serves(str(info["url"]), config.data_dir):
            return str(info["url"])  # another process started it while this one waited
        start = DaemonStart(config.data_dir)
        # until it reads power, under the lock: a process that starts meanwhile finds the
        # data dir held, and waits for this daemon rather than start one
        found = start.wait(sampling=not serving)
    if found is True:
        return start
    if found:
        logger.info("started a local h3d daemon at %s (data dir %s)", found, config.data_dir)
    return found or None
