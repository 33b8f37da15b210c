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
    env = os.environ.get("H3D_TOKEN")
    if env:
        return env
    try:
        return settings.token_path.read_text().strip()
    except FileNotFoundError:
        return None


def http_client(url: str, token: str | None, timeout_s: float) -> httpx.Client:
    """An ``httpx.Client`` for the daemon at ``url``, with an SSL context only if ``url`` is
    https: building one loads the CA bundle, 34-52 ms of CPU on an Intel test host, which
    every CLI command paid once or twice for a daemon on plain http."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(verify=url[:6].lower() == "https:")
    return httpx.Client(base_url=url, headers=headers, timeout=timeout_s, transport=transport)


def probe(url: str, token: str | None = None, timeout_s: float = 1.0) -> tuple[bool, bool | None]:
    """(healthy, authorized): an h3d's ``/healthz`` answered 200; whether it takes ``token``
    (None: it did not say, an h3d older than the field)."""
    import httpx

    try:
        with http_client(url, token, timeout_s) as c:
            r = c.get("/healthz")
    except httpx.HTTPError:
        return False, None
    try:
        body = r.json() if r.status_code == 200 else None
    except ValueError:
        body = None
    if not (isinstance(body, dict) and body.get("status") == "ok" and "version" in body):
        return False, None  # no answer, or another program's on this port: not an h3d
    authorized = body.get("authorized")
    return True, authorized if isinstance(authorized, bool) else None


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    return probe(url, timeout_s=timeout_s)[0]


def find_daemon(settings: Settings) -> tuple[str, str | None]:
    """The URL of this data dir's daemon, and None if it answers there; else why not.

    A daemon on the default port when the data dir records none (no ``daemon.json``, no
    ``H3D_URL``) and that refuses the data dir's token serves another data dir: every /v1
    request would answer 401, so it is not this data dir's daemon.
    """
    url = discover_url(settings)
    healthy, authorized = probe(url, read_token(settings))
    if not healthy:
        return url, f"no daemon answers at {url}"
    explicit = bool(os.environ.get("H3D_URL")) or settings.daemon_file.exists()
    if authorized is False and not explicit:
        return url, (
            f"no daemon serves {settings.data_dir}: the daemon at {url} serves another data "
            f"dir (it refuses this one's token); start one with `h3d serve --data-dir "
            f"{settings.data_dir} --port 0`, or name that daemon's data dir (--data-dir) or "
            "token (H3D_TOKEN)"
        )
    return url, None


class DaemonClient:
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.settings = settings
        self.url = url or discover_url(settings)
        self.http = http_client(self.url, read_token(settings), 30.0)

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
