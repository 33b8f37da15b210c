"""``Client``: one keep-alive HTTP connection to the daemon, explicit calls that raise.

httpx is imported when the first request is made, not with this module: ``import h3client``
stays cheap, and a profiler's sender thread pays for the HTTP stack, not the training script.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3client._config import ClientConfig, read_daemon_file, read_token_file, resolve
from h3client.errors import H3ClientError, H3ConnectionError, H3HTTPStatusError, H3RunNotFound

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

_GZIP_MIN_BYTES = 4096

#: How long an idle kept-alive connection is reused: below the daemon's keep-alive (5 s,
#: h3d.security.KEEP_ALIVE_S), whose timer starts when it sends a response, earlier than
#: this one's, so that a request is never written into a connection the daemon is closing.
KEEPALIVE_S = 2.0

# The HTTP stack's first load, and fork. A profiler's sender thread imports httpx (and, as it
# builds its transport, httpcore, h11, anyio, trio: about 180 modules) right after the
# profiler starts. A fork meanwhile (a multiprocessing child, started the next line) copied
# a module lock that thread held, or a module half initialised: the child's own profiler
# then waited on that import for ever (its sender sent nothing; stop() took its 30 s). Fork
# waits for the first load to end instead (once a process, about 0.1 s), and loads after
# the first take no lock.
_LOADING = threading.Lock()
_loaded = False
_held_for_fork = False


def load_http_stack() -> None:
    """Import what a request needs, once a process, under the lock that fork waits for."""
    global _loaded
    if _loaded:
        return
    with _LOADING:
        if _loaded:
            return
        import gzip  # noqa: F401
        import hashlib  # noqa: F401
        import hmac  # noqa: F401
        import http.client  # noqa: F401
        import socket  # noqa: F401

        import httpx

        httpx.Client(transport=httpx.HTTPTransport(verify=False)).close()  # what it loads
        _loaded = True


def _before_fork() -> None:
    global _held_for_fork
    # bounded: a fork from inside the first load (no import forks; one could) goes on
    _held_for_fork = _LOADING.acquire(timeout=5.0)


def _after_fork() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _LOADING.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork
    )


# Bodies to a daemon on this machine travel as they are: gzip would cost the sender about
# 30 ms of CPU for each MB it saves on a loopback link (most of the sender's CPU time).
def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit  # imported by pathlib already

    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _is_https(url: str) -> bool:
    """Whether ``url`` is reached over TLS (and so needs a verifying SSL context)."""
    return url[:6].lower() == "https:"


#: Headers of a spool's replay (by a profiler or ``h3d import``): the daemon may then take
#: the rows of a run its reaper failed (docs/daemon.md, "Runs whose process is gone").
REPLAY_HEADERS = {"H3-Replay": "1"}
#: Headers of a resumed profiler's create: the daemon then follows the new process.
RESUME_HEADERS = {"H3-Resume": "1"}

#: The daemon's binary form of a batches body (h3d.api.schemas.binary_columns): a one-line
#: JSON header in which each packed column is its length in bytes, a newline, then the
#: columns' bytes back to back in ``PACKED_COLUMNS`` order. The sender posts this form: no
#: base64 on either side.
COLUMNS_MEDIA_TYPE = "application/vnd.h3.columns"
PACKED_COLUMNS = ("seq_i64", "t_f64", "loss_f64", "sizes_i64", "losses_f32", "indices_i64")


def columns_as_json(body: bytes) -> bytes:
    """A binary batches body (:data:`COLUMNS_MEDIA_TYPE`) in the JSON form: each packed
    column's base64 text in the header where its length was. For the spool (JSON lines,
    which ``h3d import`` replays) and for a daemon that reads JSON only."""
    import binascii

    end = body.index(b"\n")
    obj = json.loads(body[:end])
    cols, at = obj["columns"], end + 1
    for name in PACKED_COLUMNS:
        if name in cols:
            size = cols[name]
            cols[name] = binascii.b2a_base64(body[at : at + size], newline=False).decode()
            at += size
    return json.dumps(obj, separators=(",", ":")).encode()


#: The operations a profiler sends (and spools): name -> (method, path template).
OPERATIONS = {
    "create": ("POST", "/v1/runs"),
    "batches": ("POST", "/v1/runs/{run_id}/batches"),
    "epochs": ("POST", "/v1/runs/{run_id}/epochs"),
    "update": ("PATCH", "/v1/runs/{run_id}"),
}


class Client:
    """A thin, typed-by-convention wrapper over the daemon's REST API.

    Args:
        url: Daemon URL; default from ``H3D_URL`` or the data dir's ``daemon.json``.
        token: Bearer token; default from ``H3D_TOKEN`` or ``<data dir>/token``.
        data_dir: The daemon's data dir (default: the daemon's default).
        http: An ``httpx.Client`` to borrow (tests pass a ``MockTransport`` or a
            Starlette ``TestClient``); otherwise one is created and owned.
        timeout_s: Per-request timeout.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        data_dir: str | Path | None = None,
        http: httpx.Client | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.config: ClientConfig = resolve(url, token, data_dir)
        self._owns_http = http is None
        self._http = http
        self._timeout_s = timeout_s
        self._closed = False
        self._headers = (
            {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        )
        self._gzip = not _is_loopback(self.config.url)
        # the token that what answers at a discovered URL proved it holds (see ``proven``)
        self._proven_token: str | None = None

    def reload_token(self) -> bool:
        """Read ``<data dir>/token`` again, unless the token was given (argument or
        ``H3D_TOKEN``); True if it changed. For a refused request: a daemon that started
        after this client (its data dir's first start) wrote its token since."""
        if self.config.token_is_explicit:
            return False
        try:
            token = read_token_file(self.config.data_dir)
        except H3ClientError:  # a data dir no token should be read from: keep this one
            return False
        if token == self.config.token:
            return False
        self.config = self.config._replace(token=token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        return True

    @property
    def must_prove(self) -> bool:
        """Whether what answers at the URL must prove it holds the token before it is
        sent: a URL found (the data dir's ``daemon.json``, the default port), not given
        (argument or ``H3D_URL``), reached by this client's own connection (not a borrowed
        ``http``), since anyone may listen on a local port."""
        return not self.config.url_is_explicit and self._owns_http

    def proven(self) -> bool:
        """True if the token may be sent: the URL was given, or what answers there proved
        (``/healthz?nonce=``, :func:`h3client._daemon.probe`) that it holds the token (the
        data dir's, read again if none was read yet). Asks once per token; False with no
        token to prove, or no answer."""
        if not self.must_prove:
            return True
        if self.config.token is None:
            self.reload_token()  # a daemon that started since wrote it
        token = self.config.token
        if token is None:
            return False
        if self._proven_token != token:
            load_http_stack()
            from h3client._daemon import probe

            if probe(self.url, token, timeout_s=min(2.0, self._timeout_s)) != (True, True):
                return False
            self._proven_token = token
        return True

    def forget_proof(self) -> None:
        """Ask for the proof again before the next request (what answers at the URL may
        have changed: a daemon that stopped, another program on its port since)."""
        self._proven_token = None

    def rediscover(self) -> bool:
        """Follow the data dir's daemon to the URL its ``daemon.json`` names now, if the URL
        was found there (not given) and it changed: a daemon started again since, on
        another port (an autostarted one listens on a free port). True if it moved; what
        answers at the new URL proves that it holds the token before it is sent anything."""
        if self.config.url_is_explicit or not self._owns_http:
            return False
        info = read_daemon_file(self.config.data_dir)
        if info is None:
            return False
        url = str(info["url"]).rstrip("/")
        if url == self.config.url:
            return False
        old, self._http = self._http, None  # the next request connects to the new URL
        if old is not None:
            old.close()
        self.config = self.config._replace(url=url)
        self._gzip = not _is_loopback(url)
        self._proven_token = None
        logger.info("h3: the daemon of %s now answers at %s", self.config.data_dir, url)
        return True

    def _check_proven(self) -> None:
        if self._headers and not self.proven():
            if self.config.token_is_explicit:
                raise H3ClientError(
                    f"not sending the token to {self.url}: what answers there could not "
                    "prove that it holds the token given (H3D_TOKEN): a daemon with another "
                    "token, or another program on its port; give the token of the daemon "
                    "there, or the URL of the daemon that holds this one (H3D_URL)"
                )
            raise H3ClientError(
                f"not sending the token to {self.url}: what answers there could not prove "
                f"that it serves the data dir {self.config.data_dir} (no h3d of that data "
                "dir, or another program on its port); start its daemon (`h3d serve`), or "
                "give the URL of one you trust (H3D_URL)"
            )

    @property
    def http(self) -> httpx.Client:
        """The ``httpx.Client`` (created, and httpx imported, on first use)."""
        if self._http is None:
            load_http_stack()
            import socket

            import httpx

            if self._closed:
                raise H3ConnectionError("this Client was closed")
            # TCP_NODELAY: a request written as headers then body must not wait for the
            # peer's delayed ACK (~40 ms per request on Linux loopback otherwise). An SSL
            # context only for an https daemon: building one loads the CA bundle, 34-52 ms of
            # the sender thread's CPU on an Intel test host, for a context plain http never uses.
            transport = httpx.HTTPTransport(
                verify=_is_https(self.config.url),
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S),
            )
            self._http = httpx.Client(
                base_url=self.config.url,
                timeout=httpx.Timeout(self._timeout_s, connect=min(2.0, self._timeout_s)),
                transport=transport,
            )
        return self._http

    @property
    def url(self) -> str:
        return self.config.url

    # --- plumbing -----------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        json_text: str | bytes | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        repeatable: bool = False,
        **kw: Any,
    ) -> httpx.Response:
        """Send a request; ``json_body`` is encoded here, ``json_text`` was already (or is a
        body of ``content_type``: the binary form of batches).

        Bodies of 4 KiB or more travel gzipped (one compression per request), except to a
        daemon on a loopback address. ``headers`` go with it, besides the token's. A GET,
        or a request the daemon stores once whatever the repeats (``repeatable``: the
        sender's operations, keyed by run id, sequence and epoch numbers), whose connection
        was closed under it (a kept-alive one that the daemon or a proxy closed as it was
        reused) is sent once more, on a new connection.
        """
        load_http_stack()
        import gzip

        import httpx

        self._check_proven()
        headers = {**self._headers, **(headers or {})}
        content = None
        if json_body is not None:
            json_text = json.dumps(json_body, allow_nan=False)
        if json_text is not None:
            raw = json_text.encode() if isinstance(json_text, str) else json_text
            headers["Content-Type"] = content_type
            if self._gzip and len(raw) >= _GZIP_MIN_BYTES:
                raw = gzip.compress(raw, compresslevel=1)  # releases the GIL while it works
                headers["Content-Encoding"] = "gzip"
            content = raw
        for retry in (repeatable or method == "GET", False):
            try:
                r = self.http.request(method, path, content=content, headers=headers, **kw)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if not retry:
                    raise H3ConnectionError(f"no h3d daemon answers at {self.url}: {exc}") from exc
                logger.debug("h3: %s %s: %s; sending it again", method, path, exc)
            except (httpx.TransportError, RuntimeError) as exc:
                # RuntimeError: httpx's "the client has been closed" (a profiler stopping)
                raise H3ConnectionError(f"no h3d daemon answers at {self.url}: {exc}") from exc
        _raise_for_status(r)
        return r

    def health(self, timeout_s: float = 1.0) -> bool:
        import httpx

        try:
            return self.http.get("/healthz", timeout=timeout_s).status_code == 200
        except (httpx.HTTPError, H3ConnectionError):
            return False

    # --- runs ---------------------------------------------------------------------------

    def create_run(self, **fields: Any) -> dict[str, Any]:
        """POST /v1/runs (fields: id, created_at, name, config, tags, pid, host, n_train)."""
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", "/v1/runs", json_body=body).json())

    def resolve_run(self, ref: str) -> dict[str, Any]:
        """The run a person means by ``ref``: a full id, a run name (the newest of that name)
        or a unique id prefix. An ambiguous prefix raises ``H3HTTPStatusError`` (409
        ``ambiguous_run``) whose message lists the candidates; no match raises
        ``H3RunNotFound``."""
        return dict(self.request("GET", "/v1/runs/resolve", params={"ref": ref}).json())

    def get_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}").json())

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("PATCH", f"/v1/runs/{run_id}", json_body=body).json())

    def delete_run(self, run_id: str) -> None:
        """Delete an ended run and everything stored of it; cannot be undone. A running run
        raises ``H3HTTPStatusError`` (409 ``run_running``), an unknown one ``H3RunNotFound``."""
        self.request("DELETE", f"/v1/runs/{run_id}")

    def list_runs(self, **params: Any) -> dict[str, Any]:
        p = {k: v for k, v in params.items() if v is not None}
        return dict(self.request("GET", "/v1/runs", params=p).json())

    # --- ingest -------------------------------------------------------------------------

    def post_batches(
        self, run_id: str, batches: list[dict[str, Any]], *, nonfinite_as_null: bool = True
    ) -> dict[str, int]:
        body = {"batches": batches, "nonfinite_as_null": nonfinite_as_null}
        return dict(self.request("POST", f"/v1/runs/{run_id}/batches", json_body=body).json())

    def post_json(
        self,
        run_id: str,
        op: str,
        text: str | bytes,
        *,
        headers: dict[str, str] | None = None,
        binary: bool = False,
    ) -> dict[str, Any]:
        """Send one spool-style operation whose body is JSON text already (the sender's path),
        or with ``binary`` a batches body in the binary form (:data:`COLUMNS_MEDIA_TYPE`).

        ``op``: "create", "batches", "epochs" or "update"; ``headers``: say a replay
        (``REPLAY_HEADERS``) or a resumed run's create (``RESUME_HEADERS``).
        """
        method, path = OPERATIONS[op]
        url = path.format(run_id=run_id)
        kind = COLUMNS_MEDIA_TYPE if binary else "application/json"
        r = self.request(
            method, url, json_text=text, headers=headers, content_type=kind, repeatable=True
        )
        return dict(r.json())

    def post_epochs(self, run_id: str, epochs: list[dict[str, Any]]) -> dict[str, int]:
        body = {"epochs": epochs}
        return dict(self.request("POST", f"/v1/runs/{run_id}/epochs", json_body=body).json())

    # --- queries ------------------------------------------------------------------------

    def eta(self, run_id: str, window_s: float = 60.0) -> dict[str, Any]:
        return dict(
            self.request("GET", f"/v1/runs/{run_id}/eta", params={"window": window_s}).json()
        )

    def energy(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}/energy").json())

    def report(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}/report").json())

    def series(self, run_id: str, metric: str = "loss", points: int = 500) -> list[list[float]]:
        r = self.request(
            "GET", f"/v1/runs/{run_id}/series", params={"metric": metric, "points": points}
        )
        return list(r.json()["points"])

    def export_csv(self, run_id: str, path: str | Path) -> Path:
        """The run's batches as CSV (seq, t, epoch, step, rank, phase, n, loss; one row a
        batch)."""
        return self._download(f"/v1/runs/{run_id}/export.csv", path)

    def export_samples_csv(self, run_id: str, path: str | Path) -> Path:
        """The run's per-sample losses as CSV (seq, epoch, index, loss; one row a sample)."""
        return self._download(f"/v1/runs/{run_id}/samples.csv", path)

    def _download(self, url_path: str, path: str | Path) -> Path:
        """Stream a GET's body to ``path`` (a large export is never held in memory)."""
        import httpx

        self._check_proven()
        out = Path(path)
        writing = False
        try:
            with self.http.stream("GET", url_path, headers=self._headers) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_status(r)
                with out.open("wb") as f:
                    writing = True
                    for chunk in r.iter_bytes():
                        f.write(chunk)
        except (httpx.TransportError, RuntimeError) as exc:
            if writing:  # cut off midway: no partial file is left
                out.unlink(missing_ok=True)
            raise H3ConnectionError(f"no h3d daemon answers at {self.url}: {exc}") from exc
        return out

    def compare(self, run_ids: list[str]) -> dict[str, Any]:
        r = self.request("GET", "/v1/compare", params={"runs": ",".join(run_ids)})
        return dict(r.json())

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        if self._owns_http and self._http is not None:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for_status(r: httpx.Response) -> None:
    """The daemon's error answer as an exception: ``H3RunNotFound`` for an unknown run,
    ``H3HTTPStatusError`` (its code, message and details) for any other."""
    if r.status_code < 400:
        return
    code, message, details = "http_error", r.text[:300], None
    try:
        err = r.json()["error"]
        code, message, details = err["code"], err["message"], err.get("details")
    except (ValueError, KeyError, TypeError):
        pass
    cls = H3RunNotFound if code == "run_not_found" else H3HTTPStatusError
    raise cls(
        f"{r.status_code} {code}: {message}", request=r.request, response=r, code=code,
        details=details,
    )  # fmt: skip
