"""A tiny client for the CLI's own commands (h3d never imports h3client).

httpx is imported when a command first talks to a daemon, not with this module: ``h3d serve``
imports the CLI and never needs it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from h3d.config import Settings


class DaemonDown(Exception):
    """The daemon cannot be reached or talked to: ``main`` prints ``h3d: <message>`` in one
    line and exits 1."""


def _not_a_data_dir(settings: Settings) -> SystemExit:
    """A file in the data dir's place (or in a parent's), in the words ``h3d serve`` uses."""
    from h3d.datadir import not_a_directory

    why = not_a_directory(settings.data_dir) or f"{settings.data_dir}: not a directory"
    return SystemExit(f"h3d: {why}")


def discover_url(settings: Settings) -> str:
    """``H3D_URL``, else the running daemon's ``daemon.json``, else host:port from settings."""
    env = os.environ.get("H3D_URL")
    if env:
        return env.rstrip("/")
    try:
        return str(json.loads(settings.daemon_file.read_text())["url"]).rstrip("/")
    except NotADirectoryError:
        raise _not_a_data_dir(settings) from None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
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
    except NotADirectoryError:
        raise _not_a_data_dir(settings) from None
    except UnsafeDataDir as exc:
        raise SystemExit(f"h3d: {exc}") from None


def _token_source(settings: Settings) -> str:
    """Where :func:`read_token` took the token from, for a message."""
    return "H3D_TOKEN" if os.environ.get("H3D_TOKEN") else str(settings.token_path)


def start_hint(settings: Settings) -> str:
    """The command that starts this data dir's daemon, runnable as printed: its
    ``--data-dir``, and ``--port 0`` (a free port, found through daemon.json) when the port
    ``h3d serve`` would bind is taken."""
    import socket

    cmd = f"h3d serve --data-dir {settings.data_dir}"
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as `serve` binds
            sock.bind((settings.host, settings.port))
    except OSError:  # taken (or not bindable here): a free port is the one that works
        cmd += " --port 0"
    return f"`{cmd}`"


def _starting(settings: Settings) -> str | None:
    """Why the data dir's daemon does not answer, if a process holds its lock (``h3d
    serve`` takes it first thing, before the imports that take most of its start)."""
    from h3d.datadir import lock_holder

    holder = lock_holder(settings.data_dir)
    if holder is None:
        return None
    return (
        f"the daemon of {settings.data_dir} (pid {holder}) does not answer: it is starting "
        "or stopping (try again in a moment), or stuck (its log: "
        f"{settings.data_dir / 'h3d.log'}, if it was autostarted)"
    )


def _no_daemon(settings: Settings, url: str, env_url: bool) -> str:
    """Nothing (no h3d) answers at ``url``: what to do about it."""
    if env_url:
        return f"no h3d daemon answers at {url} (the URL in H3D_URL)"
    return _starting(settings) or (
        f"no h3d daemon answers at {url} (start it: {start_hint(settings)})"
    )


def http_client(url: str, token: str | None, timeout_s: float | httpx.Timeout) -> httpx.Client:
    """An ``httpx.Client`` for the daemon at ``url``, with an SSL context only if ``url`` is
    https: building one loads the CA bundle, 34-52 ms of CPU on an Intel test host, which
    every CLI command paid once or twice for a daemon on plain http."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(verify=url[:6].lower() == "https:")
    return httpx.Client(base_url=url, headers=headers, timeout=timeout_s, transport=transport)


def probe(
    url: str, token: str | None = None, timeout_s: float = 1.0, answer_s: float = 10.0
) -> tuple[bool, bool | None]:
    """(healthy, authorized): an h3d's ``/healthz`` answered 200; whether it holds ``token``.

    ``timeout_s`` bounds the connection (nothing listens: refused at once on this host; a
    host that does not answer). What accepted it is given ``answer_s`` to answer: a daemon
    busy on a loaded host is slow, not absent, and was named "no daemon answers" after 1 s.

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
    timeout = httpx.Timeout(max(timeout_s, answer_s), connect=timeout_s)
    try:
        with http_client(url, None, timeout) as c:
            r = c.get("/healthz", params={"nonce": nonce})
    except (httpx.HTTPError, httpx.InvalidURL):
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


def _this_data_dirs_daemon(settings: Settings, url: str) -> int | None:
    """The pid of the daemon at ``url`` if it is this data dir's: the one ``daemon.json``
    names there, and the holder of the data dir's lock."""
    from h3d.datadir import lock_holder

    try:
        info = json.loads(settings.daemon_file.read_text())
        pid, recorded = int(info["pid"]), str(info["url"]).rstrip("/")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if recorded == url and lock_holder(settings.data_dir) == pid else None


def _not_this_data_dirs(
    settings: Settings, url: str, authorized: bool | None, token: str | None
) -> str:
    """Why the h3d that answers at ``url`` is not used: it refuses ``token`` (``authorized``
    False), or did not prove it holds it (None). The token named is the one there is: the
    data dir's, ``H3D_TOKEN``, or none (the data dir has none: no daemon of it has run)."""
    start = f"`h3d serve --data-dir {settings.data_dir} --port 0`"
    source = _token_source(settings)
    if authorized is None:
        return (
            f"what answers at {url} did not prove that it holds the token in "
            f"{source}, so the token was not sent to it (another user's program "
            f"on that port, or an h3d older than this one): start this data dir's daemon "
            f"with {start}, or name a daemon you trust with H3D_URL"
        )
    pid = _this_data_dirs_daemon(settings, url)
    if pid is not None:  # the right daemon; the token is not its own
        d = settings.data_dir
        restart = f"restart it (`h3d stop --data-dir {d}`, then `h3d serve --data-dir {d}`)"
        if token is None:
            return (
                f"the daemon of {d} (pid {pid}) at {url} cannot be used: there is no token "
                f"in {settings.token_path}; {restart} to write one, or give its token in "
                "H3D_TOKEN"
            )
        fix = (
            f"give its token, or unset H3D_TOKEN to use {settings.token_path}"
            if source == "H3D_TOKEN"
            else f"{source} changed since it started: {restart}"
        )
        return (
            f"the daemon of {settings.data_dir} (pid {pid}) at {url} refuses the token in "
            f"{source}; {fix}"
        )
    if source == "H3D_TOKEN":
        return (
            f"the daemon at {url} refuses the token in H3D_TOKEN; give that daemon's token, "
            f"or unset H3D_TOKEN to use the data dir's ({settings.data_dir}; start its daemon "
            f"with {start})"
        )
    why = (
        f"{settings.data_dir} has no token: no daemon of it has run"
        if token is None
        else "it refuses this one's token"
    )
    return (
        f"no daemon serves {settings.data_dir}: the daemon at {url} serves another data "
        f"dir ({why}); start one with {start}, or name that daemon's "
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
        if os.environ.get("H3D_URL"):
            return url, f"no daemon answers at {url} (the URL in H3D_URL)"
        return url, _starting(settings) or (
            f"no daemon answers at {url}; start one with {start_hint(settings)}"
        )
    if authorized or os.environ.get("H3D_URL"):  # proven, or named by the caller
        return url, None
    return url, _not_this_data_dirs(settings, url, authorized, token)


class _Answer(dict[str, Any]):
    """A JSON object of the daemon's answer: a key it lacks (another program's answer, in
    the shape of no h3d's) stops the command in one line, not with a ``KeyError``."""

    def __init__(self, obj: dict[str, Any], where: str) -> None:
        super().__init__(obj)
        self.where = where

    def __missing__(self, key: str) -> Any:
        raise DaemonDown(f"{self.where} is not an h3d daemon's: it has no {key!r}")


class DaemonClient:
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.settings = settings
        self.url = url or discover_url(settings)
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """The ``httpx.Client``, made at first use, and holding the token only for a daemon
        that proved it holds it (or one the caller named with ``H3D_URL``): else the
        command stops with one line, and the token was never sent. Without a token, what
        answers must still be an h3d: one of another data dir's answers 401, which
        :meth:`request` names as such."""
        if self._http is None:
            import httpx

            token = read_token(self.settings)
            if not os.environ.get("H3D_URL"):
                healthy, authorized = probe(self.url, token)
                if not healthy:
                    raise DaemonDown(_no_daemon(self.settings, self.url, env_url=False))
                if token is not None and not authorized:
                    why = _not_this_data_dirs(self.settings, self.url, authorized, token)
                    raise SystemExit(f"h3d: {why}")
            try:
                self._http = http_client(self.url, token, 30.0)
            except httpx.InvalidURL as exc:
                raise DaemonDown(f"{self.url} is not a URL h3d can use ({exc})") from None
        return self._http

    def transport_problem(self, exc: Exception, what: str) -> DaemonDown:
        """The one line for an ``httpx`` error met while doing ``what`` ("GET /v1/runs",
        "the export"): nothing answers, a URL no daemon can have, no answer in time, or the
        daemon went away midway (stopped, restarted, killed)."""
        import httpx

        detail = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            return DaemonDown(_no_daemon(self.settings, self.url, bool(os.environ.get("H3D_URL"))))
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
            return DaemonDown(
                f"{self.url} is not a URL h3d can use ({detail}); H3D_URL takes one like "
                "http://127.0.0.1:8421"
            )
        if isinstance(exc, httpx.TimeoutException):
            return DaemonDown(f"the daemon at {self.url} did not answer {what} in time ({detail})")
        return DaemonDown(f"the daemon at {self.url} went away during {what} ({detail})")

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise self.transport_problem(exc, f"{method} {path}") from None
        if r.status_code == 401:
            _, problem = find_daemon(self.settings)
            if problem:  # the daemon of another data dir: say so, not just "401"
                raise SystemExit(f"h3d: {problem}")
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                msg = f"{err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError):  # not h3d's error: not its text either
                kind = r.headers.get("content-type", "no content type").split(";")[0]
                raise DaemonDown(
                    f"{self.url} answered {method} {path} with {r.status_code} "
                    f"{r.reason_phrase} ({kind}), not as an h3d daemon does"
                ) from None
            raise SystemExit(f"h3d: {r.status_code} {msg}")
        return r

    def get(self, path: str, **kw: Any) -> Any:
        """The JSON object the daemon answers; an answer that is not one (another program's)
        stops the command in one line."""
        where = f"the answer of {self.url} to GET {path}"
        try:
            body = self.request("GET", path, **kw).json(object_hook=lambda o: _Answer(o, where))
        except ValueError:
            raise DaemonDown(f"{where} is not JSON: it is not an h3d daemon") from None
        if not isinstance(body, dict):
            raise DaemonDown(f"{where} is not a JSON object: it is not an h3d daemon")
        return body
