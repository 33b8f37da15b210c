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
    return f"http://{host}:{settings.port}"


def read_token(settings: Settings) -> str | None:
    env = os.environ.get("H3D_TOKEN")
    if env:
        return env
    try:
        return settings.token_path.read_text().strip()
    except FileNotFoundError:
        return None


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class DaemonClient:
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        import httpx

        self.url = url or discover_url(settings)
        token = read_token(settings)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            raise DaemonDown(f"no h3d daemon answers at {self.url} (start it: h3d serve)") from exc
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
