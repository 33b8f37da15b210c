"""A tiny client for the CLI's own commands (h3d never imports h3client).

httpx is imported when a command first talks to a daemon, not with this module: ``h3d serve``
imports the CLI and never needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from h3d.config import Settings


class DaemonDown(Exception):
    pass


def discover_url(settings: Settings) -> str:
    """``H3D_URL``, else the running daemon's ``daemon.json``, else host:port from settings."""
    env = os.environ.get("H3D_URL")
    if env:
        return env.rstrip("/")
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        return str(json.loads(settings.daemon_file.read_text())["url"]).rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def read_token(settings: Settings) -> str | None:
    """``H3D_TOKEN``, else the data dir's token; one that another user owns or may write
    (or in such a data dir) is refused in one line, never used."""
    env = os.environ.get("H3D_TOKEN")
    if env:
        return env
    from h3d.datadir import UnsafeDataDir, check_data_dir

    try:
        check_data_dir(settings.data_dir)
        return settings.token_path.read_text().strip()
    except FileNotFoundError:
        return None
    except UnsafeDataDir as exc:
        raise SystemExit(f"h3d: {exc}") from None


def http_client(url: str, token: str | None, timeout_s: float) -> httpx.Client:
    """An ``httpx.Client`` for the daemon at ``url``, with an SSL context only if ``url`` is
    https: building one loads the CA bundle, 34-52 ms of CPU on an Intel test host, which
    every CLI command paid once or twice for a daemon on plain http."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(verify=url[:6].lower() == "https:")
    return httpx.Client(base_url=url, headers=headers, timeout=timeout_s, transport=transport)


def probe(url: str, token: str | None = None, timeout_s: float = 1.0) -> tuple[bool, bool | None]:
    """(healthy, authorized): an h3d's ``/healthz`` answered 200; whether it holds ``token``.

    The token is never sent: ``/healthz`` gets a fresh nonce, and a daemon that holds the
    token answers its proof (:func:`h3d.security.healthz_proof`). ``authorized`` is True for
    a right proof; False for a wrong one (another data dir's daemon) or when there is no
    token to check; None when the answer has no proof (an h3d older than the proof, or
    another program that answers like one): nothing shows that it holds the token.
    """
    import hmac
    from urllib.parse import urlsplit

    import httpx

    from h3d.security import healthz_proof

    nonce = os.urandom(16).hex()
    try:
        with http_client(url, None, timeout_s) as c:
            r = c.get("/healthz", params={"nonce": nonce})
    except httpx.HTTPError:
        return False, None
    try:
        body = r.json() if r.status_code == 200 else None
    except ValueError:
        body = None
    if not (isinstance(body, dict) and body.get("status") == "ok" and "version" in body):
        return False, None  # no answer, or another program's on this port: not an h3d
    if token is None:
        return True, False
    proof = body.get("proof")
    if not isinstance(proof, str):
        return True, None
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return True, hmac.compare_digest(proof.encode(), healthz_proof(token, port, nonce).encode())


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    return probe(url, timeout_s=timeout_s)[0]


def _not_this_data_dirs(settings: Settings, url: str, authorized: bool | None) -> str:
    """Why the h3d that answers at ``url`` is not used: it refuses the data dir's token
    (``authorized`` False), or did not prove it holds it (None)."""
    start = f"`h3d serve --data-dir {settings.data_dir} --port 0`"
    if authorized is None:
        return (
            f"what answers at {url} did not prove that it holds the token in "
            f"{settings.token_path}, so the token was not sent to it (another user's program "
            f"on that port, or an h3d older than this one): start this data dir's daemon "
            f"with {start}, or name a daemon you trust with H3D_URL"
        )
    return (
        f"no daemon serves {settings.data_dir}: the daemon at {url} serves another data "
        f"dir (it refuses this one's token); start one with {start}, or name that daemon's "
        "data dir (--data-dir) or token (H3D_TOKEN)"
    )


def find_daemon(settings: Settings) -> tuple[str, str | None]:
    """The URL of this data dir's daemon, and None if it answers there; else why not.

    A daemon found through ``daemon.json`` or on the default port (no ``H3D_URL``) is this
    data dir's only if it proves that it holds the token (:func:`probe`): one that refuses
    it serves another data dir (every /v1 request would answer 401), and a program that
    cannot prove it is not sent the token at all (another user may listen on the port).
    """
    url = discover_url(settings)
    token = read_token(settings)
    healthy, authorized = probe(url, token)
    if not healthy:
        return url, f"no daemon answers at {url}"
    if authorized or os.environ.get("H3D_URL"):  # proven, or named by the caller
        return url, None
    return url, _not_this_data_dirs(settings, url, authorized)


class DaemonClient:
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.settings = settings
        self.url = url or discover_url(settings)
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """The ``httpx.Client``, made at first use, and holding the token only for a daemon
        that proved it holds it (or one the caller named with ``H3D_URL``): else the
        command stops with one line, and the token was never sent."""
        if self._http is None:
            token = read_token(self.settings)
            if token is not None and not os.environ.get("H3D_URL"):
                healthy, authorized = probe(self.url, token, timeout_s=10.0)
                if not healthy:
                    raise DaemonDown(f"no h3d daemon answers at {self.url} (start it: h3d serve)")
                if not authorized:
                    raise SystemExit(
                        f"h3d: {_not_this_data_dirs(self.settings, self.url, authorized)}"
                    )
            self._http = http_client(self.url, token, 30.0)
        return self._http

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            raise DaemonDown(f"no h3d daemon answers at {self.url} (start it: h3d serve)") from exc
        if r.status_code == 401:
            _, problem = find_daemon(self.settings)
            if problem:  # the daemon of another data dir: say so, not just "401"
                raise SystemExit(f"h3d: {problem}")
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                msg = f"{err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise SystemExit(f"h3d: {r.status_code} {msg}")
        return r

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()
