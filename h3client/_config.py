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
    """The daemon's rule (``h3d.config.default_data_dir``): a relative ``XDG_DATA_HOME`` is
    ignored, as the XDG Base Directory spec says."""
    env = os.environ.get("H3D_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = Path(os.environ.get("XDG_DATA_HOME", "")).expanduser()
    base = xdg if xdg.is_absolute() else Path.home() / ".local" / "share"
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


class UnsafeDir(PermissionError):
    """A directory another user owns or could write to: no spool goes there."""


def unsafe(st: os.stat_result) -> str:
    """Why a directory or token with status ``st`` is not this user's alone ("" if it
    is): owned by another user, or writable by its group or other users (the daemon's
    rule, ``h3d.datadir.check_private``). Nothing to check on Windows."""
    if not hasattr(os, "getuid"):
        return ""
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o022:
        return f"is writable by users other than you (mode {st.st_mode & 0o777:o})"
    return ""


def private_dir(path: Path, *, in_data_dir: bool = True) -> Path:
    """``path`` (and a missing parent) created 0700, as the daemon keeps its data dir:
    the spool holds the run's config and losses, the token sits beside it.

    Raises UnsafeDir (an OSError, as a full disk's) if ``path``, or its parent when
    ``in_data_dir`` (the spool dir's: the data dir), is another user's or writable by
    another user, who could then read what is written there (or swap the directory).
    """
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if in_data_dir:  # before anything is made in it
        _check_private(path, path.parent, "the data dir")
    path.mkdir(mode=0o700, exist_ok=True)
    _check_private(path, path, "it" if in_data_dir else "the data dir")
    return path


def _check_private(path: Path, where: Path, what: str) -> None:
    bad = unsafe(os.stat(where))
    if bad:
        raise UnsafeDir(
            f"not writing to {path}: {what} {bad}, so another user could read the runs "
            "kept there; use a data dir only you own and can write (under $HOME or "
            "$XDG_RUNTIME_DIR, or from `mktemp -d`)"
        )


def private_file(path: str, flags: int) -> int:
    """An ``opener`` for ``open``: a file it creates is 0600."""
    return os.open(path, flags, 0o600)


def read_token_file(data_dir: Path) -> str | None:
    """The bearer token the data dir's daemon wrote (``<data dir>/token``), if any.

    Raises H3ClientError if the data dir or the token is another user's, or writable by
    another user: whoever could put a token there would read the runs sent with it.
    """
    for path, what in ((data_dir, "the data dir"), (data_dir / "token", "its token")):
        try:
            st = os.stat(path)
        except OSError:
            return None  # no data dir or no token (yet): nothing to read
        bad = unsafe(st)
        if bad:
            from h3client.errors import H3ClientError

            raise H3ClientError(
                f"not using {data_dir}: {what} {bad}, so another user could have put a "
                "token there and read your runs; use a data dir only you own and can write "
                "(under $HOME or $XDG_RUNTIME_DIR, or from `mktemp -d`), or pass the URL and "
                "token of a daemon you trust (H3D_URL, H3D_TOKEN)"
            )
    with contextlib.suppress(OSError):
        return (data_dir / "token").read_text().strip() or None
    return None


def read_json_file(path: Path) -> dict[str, object] | None:
    """The JSON object in ``path``; None if there is none, or it is not one."""
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        info = json.loads(path.read_text())
        if isinstance(info, dict):
            return info
    return None


def read_daemon_file(data_dir: Path) -> dict[str, object] | None:
    info = read_json_file(data_dir / "daemon.json")
    return info if info is not None and "url" in info else None


class ClientConfig(NamedTuple):
    """Resolved connection settings (see :func:`resolve`); immutable.

    A NamedTuple rather than a frozen dataclass: ``dataclasses`` imports ``inspect``, which
    alone costs more than the rest of ``import h3client``.
    """

    url: str
    token: str | None
    data_dir: Path
    url_is_explicit: bool  # given by the caller or H3D_URL, not discovered
    # given by the caller or H3D_TOKEN; else read from <data dir>/token, and read again when
    # the daemon refuses it (a daemon started after the client writes its token then)
    token_is_explicit: bool = False

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
    tok = token or os.environ.get("H3D_TOKEN") or None
    token_is_explicit = tok is not None
    if tok is None:
        tok = read_token_file(ddir)
    return ClientConfig(
        url=final_url.rstrip("/"),
        token=tok,
        data_dir=ddir,
        url_is_explicit=bool(explicit),
        token_is_explicit=token_is_explicit,
    )
