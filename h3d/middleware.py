"""Pure ASGI middleware: bearer auth on /v1, body-size limit and gzip request bodies.

Pure ASGI (not BaseHTTPMiddleware) so that the body is read once, bounded while it is read,
and decompressed with a cap: a small gzip bomb is refused before it is inflated in full, a
body of many gzip members is refused past a count, and a large body is inflated in a worker
thread, so that other requests are served meanwhile.
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from h3d.security import bearer_matches

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
# Pages: data only from this origin, never inside another site's frame (clickjacking). The
# dashboard has no inline script or style, so it gets the strict policy; Swagger UI and ReDoc
# (/docs, /redoc) start from an inline script, so they need 'unsafe-inline'.
_OTHER_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_CSP = (
    b"default-src 'self'; script-src 'self'%s; style-src 'self'%s; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DASHBOARD_HEADERS = [(b"content-security-policy", _CSP % (b"", b"")), *_OTHER_HEADERS]
PAGE_HEADERS = [
    (b"content-security-policy", _CSP % (b" 'unsafe-inline'", b" 'unsafe-inline'")),
    *_OTHER_HEADERS,
]
PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")


def host_allowed(host_header: bytes, allowed: frozenset[str]) -> bool:
    """DNS rebinding defence: a page on attacker.example that re-resolves its name to
    127.0.0.1 sends ``Host: attacker.example``. IP literals, localhost and the configured
    names pass; ``*`` in ``allowed`` turns the check off."""
    if "*" in allowed:
        return True
    try:
        host = host_header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if host.startswith("["):  # [::1]:8421
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not name:
        return False
    if name in LOOPBACK_NAMES or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_protected(path: str) -> bool:
    """/v1 and /metrics (run ids and names, energy) need the token; /healthz, /docs and the
    dashboard page (which asks for the token itself) do not."""
    return path.startswith("/v1") or path == "/metrics"


#: The most gzip members a body may hold: ``cat a.gz b.gz`` makes a few; a body of 200 000
#: empty members (4 MB) is no client's, and each member costs a decompressor.
MAX_GZIP_MEMBERS = 1000
#: A gzip body larger than this is inflated in a worker thread, not in the event loop.
INFLATE_IN_THREAD_BYTES = 256 * 1024


class TooManyMembers(ValueError):
    pass


def _gunzip(data: bytes, limit: int, max_members: int = MAX_GZIP_MEMBERS) -> bytes | None:
    """Every member of a gzip stream (RFC 1952 allows several, and ``cat a.gz b.gz`` makes
    them), inflated to at most ``limit`` bytes; None if it would inflate beyond that.

    Linear in the body: the input is fed from a ``memoryview`` in windows that double from
    512 bytes, so what zlib copies back as a member's ``unused_data`` is at most the last
    window, not the rest of the body (which made 200 000 empty members quadratic: 24 s for
    4 MB). Raises :class:`TooManyMembers` past ``max_members``, ``zlib.error`` if corrupt.
    """
    view = memoryview(data)
    end = len(view)
    out: list[bytes] = []
    size = pos = members = 0
    while True:
        members += 1
        if members > max_members:
            raise TooManyMembers(f"the gzip body has more than {max_members} members")
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        window = 512
        while not d.eof:
            if pos >= end:
                raise zlib.error("the stream ends inside a member")
            chunk = d.decompress(view[pos : pos + window], limit - size + 1)
            pos = min(end, pos + window)
            size += len(chunk)
            if size > limit or d.unconsumed_tail:
                return None
            out.append(chunk)
            window = min(window * 2, 1 << 20)
        pos -= len(d.unused_data)  # what the member's last window held beyond its end
        # trailing zero padding is allowed after the last member (a member starts 1f 8b)
        if pos >= end or (view[pos] == 0 and not view[pos:].tobytes().strip(b"\0")):
            return b"".join(out)


#: Content-Encoding values that name a coding the daemon reads by another name.
_CODINGS = {b"": b"identity", b"x-gzip": b"gzip"}


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        max_body_bytes: int,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body_bytes
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = dict(scope["headers"])
        if not host_allowed(headers.get(b"host", b""), self.allowed_hosts):
            await _send_error(
                send,
                400,
                "bad_host",
                "the Host header names no address of this daemon (a DNS-rebinding guard); "
                "add the name to H3D_ALLOWED_HOSTS if it is yours",
            )
            return
        if scope["path"] == "/":
            send = _with_headers(send, DASHBOARD_HEADERS)
        elif scope["path"] in PAGES:
            send = _with_headers(send, PAGE_HEADERS)
        if is_protected(scope["path"]) and not bearer_matches(
            headers.get(b"authorization", b""), self.token
        ):
            await _send_error(
                send, 401, "unauthorized", "missing or wrong bearer token (see <data dir>/token)"
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, 413, "payload_too_large", self._too_large())
            return
        # RFC 9110 §8.4: an empty list of codings is none, and x-gzip is gzip
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        encoding = _CODINGS.get(encoding, encoding)
        if encoding not in (b"identity", b"gzip"):
            await _send_error(
                send,
                415,
                "unsupported_encoding",
                "only gzip bodies are accepted (Content-Encoding: gzip, or none)",
            )
            return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_error(send, 413, "payload_too_large", self._too_large())
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if encoding == b"gzip":
            try:
                if len(body) > INFLATE_IN_THREAD_BYTES:  # the other requests go on meanwhile
                    import anyio.to_thread

                    inflated = await anyio.to_thread.run_sync(_gunzip, body, self.max_body)
                else:
                    inflated = _gunzip(body, self.max_body)
            except zlib.error as exc:
                await _send_error(send, 400, "bad_encoding", f"the gzip body is corrupt: {exc}")
                return
            except TooManyMembers as exc:
                await _send_error(send, 400, "bad_encoding", str(exc))
                return
            if inflated is None:
                await _send_error(send, 413, "payload_too_large", self._too_large())
                return
            body = inflated
            new_headers = [
                (k, v)
                for k, v in scope["headers"]
                if k not in (b"content-encoding", b"content-length")
            ]
            new_headers.append((b"content-length", str(len(body)).encode()))
            scope = {**scope, "headers": new_headers}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is over the {self.max_body} byte limit (after decompression)"


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def error_payload(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}
