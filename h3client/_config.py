"""Where the daemon is, and how to talk to it: arguments > environment > data dir > defaults.

The data-dir rules are the daemon's own (``H3D_DATA_DIR``, else ``$XDG_DATA_HOME/h3d``, else
``~/.local/share/h3d``); a serving daemon records its URL in ``daemon.json`` there and its
bearer token in ``token``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import NamedTuple

DEFAULT_PORT = 8421


def default_data_dir() -> Path:
    env = os.environ.get("H3D_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "h3d"


def default_url() -> str:
    """Where a daemon listens when its data dir records none: ``H3D_HOST``:``H3D_PORT``, as
    ``h3d serve`` reads them (a wildcard bind address is reached on loopback), else
    127.0.0.1:8421."""
    host = os.environ.get("H3D_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('H3D_PORT') or DEFAULT_PORT}"


def private_dir(path: Path) -> Path:
    """``path`` (and a missing parent) created 0700, as the daemon keeps its data dir:
    the spool holds the run's config and losses, the token sits beside it."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def private_file(path: str, flags: int) -> int:
    """An ``opener`` for ``open``: a file it creates is 0600."""
    return os.open(path, flags, 0o600)


def read_token_file(data_dir: Path) -> str | None:
    """The bearer token the data dir's daemon wrote (``<data dir>/token``), if any."""
    with contextlib.suppress(OSError):
        return (data_dir / "token").read_text().strip() or None
    return None


def read_daemon_file(data_dir: Path) -> dict[str, object] | None:
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        info = json.loads((data_dir / "daemon.json").read_text())
        if isinstance(info, dict) and "url" in info:
            return info
    return None


class ClientConfig(NamedTuple):
    """Resolved connection settings (see :func:`resolve`); immutable.

    A NamedTuple rather than a frozen dataclass: ``dataclasses`` imports ``inspect``, which
    alone costs more than the rest of ``import h3client``.
    """

    url: str
    token: str | None
    data_dir: Path
    url_is_explicit: bool  # given by the caller or H3D_URL, not discovered

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


def resolve(
    url: str | None = None, token: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> ClientConfig:
    ddir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    explicit = url or os.environ.get("H3D_URL")
    if explicit:
        final_url = explicit
    else:
        info = read_daemon_file(ddir)
        final_url = str(info["url"]) if info else default_url()
    tok = token or os.environ.get("H3D_TOKEN")
    if tok is None:
        tok = read_token_file(ddir)
    return ClientConfig(
        url=final_url.rstrip("/"), token=tok, data_dir=ddir, url_is_explicit=bool(explicit)
    )
