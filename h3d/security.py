"""What keeps another local user out: the bearer token, its proof, and ``serve``'s limits.

- The token is created once in the data dir (mode 0600) and read by clients from there; one
  that another user owns or may write is refused (:func:`h3d.datadir.check_private`).
- ``GET /healthz?nonce=N`` answers :func:`healthz_proof`: a client checks it before it sends
  the token, so a program another user started on the port a client probes learns nothing.
- :func:`serve_limits`: idle or trickling connections cannot use up the daemon's file
  descriptors, and what a client can make the server log at will is rate-limited.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3d.datadir import check_private

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger(__name__)

#: A connection must send a whole request head within this long of connecting (or of its
#: previous response), and then its whole body within :data:`REQUEST_BODY_TIMEOUT_S`.
REQUEST_HEAD_TIMEOUT_S = 10.0
REQUEST_BODY_TIMEOUT_S = 60.0
#: uvicorn's: a kept-alive connection with no new request is closed after this long.
KEEP_ALIVE_S = 5
#: The longest nonce /healthz proves (a client sends 32 hex digits).
MAX_NONCE_CHARS = 128


def bearer_matches(header: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` in the Bearer scheme.

    The scheme is case-blind (RFC 9110 §11.1: ``bearer`` is ``Bearer``; some proxies and
    clients send it so), the token exact and compared in constant time."""
    scheme, _, sent = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(sent.lstrip(b" "), token)


def ensure_token(path: Path) -> str:
    """Return the token at ``path``, creating it (0600, never overwritten) on first start.

    An existing token that another user owns, or may write, is refused
    (:class:`h3d.datadir.UnsafeDataDir`): whoever wrote it could read every run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            check_private(path, os.fstat(f.fileno()), "the token")
            token = f.read().decode(errors="replace").strip()
        if not token:
            raise RuntimeError(
                f"{path} is empty: delete it and restart h3d to create a new token"
            ) from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def healthz_proof(token: str, port: int, nonce: str) -> str:
    """HMAC-SHA256, keyed with the token, of ``h3d-healthz <port> <nonce>`` (hex): what
    ``/healthz?nonce=<nonce>`` answers as ``proof`` on ``port``.

    A client that sent a fresh nonce and gets the proof it computes itself knows that the
    server holds its token, without having sent it. The port is the one the connection came
    in on, so a program on another port that relays the nonce to the real daemon gets a
    proof for the daemon's port, not for its own. h3client computes the same (it never
    imports h3d): this is wire format.
    """
    message = f"h3d-healthz {port} {nonce}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


# --- serve's limits ---------------------------------------------------------------------------


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (commonly 1024 of 500 000 or
    more): each connection holds a descriptor. Returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # no rlimits (Windows)
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    for target in (wanted, min(wanted, 10240)):  # macOS refuses more than OPEN_MAX (10240)
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))  # the hard one kept
        except (ValueError, OSError):
            continue
        return target
    return soft


def connection_limit(open_files: int) -> int:
    """How many connections the daemon serves at once with ``open_files`` descriptors:
    half of what is left after the store, the logs and the threads (~128), 32 to 4096."""
    return max(32, min(4096, (open_files - 128) // 2))


class RateLimit(logging.Filter):
    """At most ``burst`` records of one kind (logger and first line of the message) every
    ``window_s``; the first one after a quiet window says how many were left out.

    For what a client can make the server log at will (one warning per bad request, one
    traceback per failed ``accept``): without it, a local user filled the disk with the log.
    """

    def __init__(
        self, burst: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._kinds: dict[tuple[str, str], list[float]] = {}  # [window start, count, left out]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = self.clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) > 1000:  # many kinds: start over rather than grow
                    self._kinds.clear()
                kind = self._kinds[key] = [now, 0, 0]
            if now - kind[0] >= self.window_s:
                left_out = int(kind[2])
                kind[:] = [now, 0, 0]
                if left_out:
                    record.msg = (
                        f"{record.msg} [{left_out} more like this were not logged in "
                        f"{self.window_s:g} s]"
                    )
            kind[1] += 1
            if kind[1] > self.burst:
                kind[2] += 1
                return False
        return True


#: The loggers of what a client provokes: asyncio's ``socket.accept() out of system
#: resource`` (a traceback per attempt, up to a backlog's worth per loop pass), uvicorn's
#: warning per invalid request or per 503, and this module's closed connections.
# and the daemon's own loops, which log a failed step and go on: a failure that persists
# (descriptors used up, a device gone bad) logged a traceback every 100 ms for as long
RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn.error", __name__, "h3d.power.sampler", "h3d.reaper")


def install_log_limits() -> RateLimit:
    limit = RateLimit()
    for name in RATE_LIMITED_LOGGERS:
        logging.getLogger(name).addFilter(limit)
    return limit


def guarded_protocol(limit: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the deadlines uvicorn lacks, and room kept for clients.

    uvicorn's keep-alive timeout starts after a response only: a connection that never sends
    a request, or sends its head a byte at a time, is held for ever, and a thousand of them
    used up the daemon's descriptors (every client then timed out). Here a connection must
    send its request head within :data:`REQUEST_HEAD_TIMEOUT_S` of connecting (or of its
    last response) and its body within :data:`REQUEST_BODY_TIMEOUT_S` of its head; when
    ``limit`` connections are open, a new one closes the one that has waited longest for a
    request head, so idle connections cannot lock clients out. With every connection busy,
    a request is answered 503 ``overloaded`` (uvicorn's ``limit_concurrency`` check, but with
    the JSON error body every other error has, not uvicorn's plain text), and past a margin
    a new connection is closed at once: descriptors are never exhausted.
    """
    if TYPE_CHECKING:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base
    else:  # httptools where installed, else h11: what uvicorn's "auto" picks
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as Base

    waiting: dict[GuardedProtocol, None] = {}  # awaiting a request head, oldest first
    hard_limit = limit + max(8, limit // 8)

    class GuardedProtocol(Base):
        _deadline: asyncio.TimerHandle | None = None
        _awaited: object = None  # the request cycle a new request head replaces

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's own check (limit_concurrency, not set) would answer in plain text
            self.app = _limited(self.app, self.connections, self.tasks, limit)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) >= limit:
                oldest = next(iter(waiting), None)
                if oldest is not None:
                    logger.warning(
                        "%d connections open: closed the one that waited longest without "
                        "sending a request",
                        len(self.connections),
                    )
                    oldest._close()
                elif len(self.connections) > hard_limit:
                    logger.warning(
                        "%d connections open, all busy: refused a new one", len(self.connections)
                    )
                    self._close()
                    return
            self._await_request()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self in waiting and self.cycle is not self._awaited:  # a request head came
                del waiting[self]
                self._cancel()
                self._deadline = self.loop.call_later(
                    REQUEST_BODY_TIMEOUT_S, self._body_late, self.cycle
                )

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (
                self.cycle is None or self.cycle.response_complete
            ):  # (not when a pipelined request started)
                self._await_request()

        def connection_lost(self, exc: Exception | None) -> None:
            waiting.pop(self, None)
            self._cancel()
            super().connection_lost(exc)

        def _await_request(self) -> None:
            self._cancel()
            waiting[self] = None
            self._awaited = self.cycle
            self._deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_late)

        def _head_late(self) -> None:
            self._deadline = None
            if self in waiting:
                logger.warning(
                    "closed a connection that sent no request head within %g s",
                    REQUEST_HEAD_TIMEOUT_S,
                )
                self._close()

        def _body_late(self, cycle: Any) -> None:
            self._deadline = None
            if self.cycle is cycle and cycle.more_body:
                logger.warning(
                    "closed a connection that sent no whole request body within %g s",
                    REQUEST_BODY_TIMEOUT_S,
                )
                self._close()

        def _cancel(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _close(self) -> None:
            waiting.pop(self, None)
            self._cancel()
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


#: The body of the 503 a request gets with every connection busy (an ``ErrorPublic``).
OVERLOADED_BODY = json.dumps(
    {
        "error": {
            "code": "overloaded",
            "message": "the daemon is serving as many connections as it can; retry shortly",
        }
    }
).encode()


def _limited(app: Any, connections: Sized, tasks: Sized, limit: int) -> Any:
    """``app``, but a request that comes while more than ``limit`` connections are open, or
    more than ``limit`` requests are being served, this one included, gets 503 ``overloaded``
    (JSON, ``Retry-After: 1``) and its connection is closed: uvicorn's ``limit_concurrency``
    check, with the daemon's error body. ``connections`` and ``tasks`` are uvicorn's (the
    server's), which hold this connection and this request's task when the app is called."""

    async def limited(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (len(connections) > limit or len(tasks) > limit):
            logger.warning("%d connections open, all busy: answered 503", len(connections))
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(OVERLOADED_BODY)).encode()),
                        (b"retry-after", b"1"),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": OVERLOADED_BODY})
            return
        await app(scope, receive, send)

    return limited


def serve_limits() -> dict[str, Any]:
    """The ``uvicorn.Config`` options ``h3d serve`` runs with, once it has raised its open
    files limit and rate-limited the log records a client can provoke (see the functions
    above): connections are bounded and never left idle."""
    limit = connection_limit(raise_open_files_limit())
    install_log_limits()
    return {
        "http": guarded_protocol(limit),  # which limits concurrency too, answering in JSON
        "timeout_keep_alive": KEEP_ALIVE_S,
    }
