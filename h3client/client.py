"""``Client``: one keep-alive HTTP connection to the daemon, explicit calls that raise."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path
from typing import Any

import httpx

from h3client._config import ClientConfig, resolve
from h3client.errors import H3ConnectionError, H3HTTPStatusError, H3RunNotFound

_GZIP_MIN_BYTES = 4096


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
        if http is None:
            # TCP_NODELAY: a request written as headers then body must not wait for the
            # peer's delayed ACK (~40 ms per request on Linux loopback otherwise).
            transport = httpx.HTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            )
            http = httpx.Client(
                base_url=self.config.url,
                timeout=httpx.Timeout(timeout_s, connect=min(2.0, timeout_s)),
                transport=transport,
            )
        self.http = http
        self._headers = (
            {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        )

    @property
    def url(self) -> str:
        return self.config.url

    # --- plumbing -----------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, json_body: Any = None, **kw: Any
    ) -> httpx.Response:
        headers = dict(self._headers)
        content = None
        if json_body is not None:
            raw = json.dumps(json_body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
            if len(raw) >= _GZIP_MIN_BYTES:
                raw = gzip.compress(raw, compresslevel=1)
                headers["Content-Encoding"] = "gzip"
            content = raw
        try:
            r = self.http.request(method, path, content=content, headers=headers, **kw)
        except httpx.TransportError as exc:
            raise H3ConnectionError(f"no h3d daemon answers at {self.url}: {exc}") from exc
        if r.status_code >= 400:
            code, message, details = "http_error", r.text[:300], None
            try:
                err = r.json()["error"]
                code, message, details = err["code"], err["message"], err.get("details")
            except (ValueError, KeyError, TypeError):
                pass
            cls = H3RunNotFound if code == "run_not_found" else H3HTTPStatusError
            raise cls(
                f"{r.status_code} {code}: {message}",
                request=r.request,
                response=r,
                code=code,
                details=details,
            )
        return r

    def health(self, timeout_s: float = 1.0) -> bool:
        try:
            return self.http.get("/healthz", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    # --- runs ---------------------------------------------------------------------------

    def create_run(self, **fields: Any) -> dict[str, Any]:
        """POST /v1/runs (fields: id, created_at, name, config, tags, pid, host, n_train)."""
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", "/v1/runs", json_body=body).json())

    def resolve_run(self, ref: str) -> dict[str, Any]:
        """The run a person means by ``ref``: a full id, a run name (the newest of that name)
        or a unique id prefix. An ambiguous prefix raises ``H3HTTPStatusError`` (409) whose
        message lists the candidates; no match raises ``H3NotFound``."""
        return dict(self.request("GET", "/v1/runs/resolve", params={"ref": ref}).json())

    def get_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}").json())

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("PATCH", f"/v1/runs/{run_id}", json_body=body).json())

    def list_runs(self, **params: Any) -> dict[str, Any]:
        p = {k: v for k, v in params.items() if v is not None}
        return dict(self.request("GET", "/v1/runs", params=p).json())

    # --- ingest -------------------------------------------------------------------------

    def post_batches(
        self, run_id: str, batches: list[dict[str, Any]], *, nonfinite_as_null: bool = True
    ) -> dict[str, int]:
        body = {"batches": batches, "nonfinite_as_null": nonfinite_as_null}
        return dict(self.request("POST", f"/v1/runs/{run_id}/batches", json_body=body).json())

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
        out = Path(path)
        r = self.request("GET", f"/v1/runs/{run_id}/export.csv")
        out.write_bytes(r.content)
        return out

    def compare(self, run_ids: list[str]) -> dict[str, Any]:
        r = self.request("GET", "/v1/compare", params={"runs": ",".join(run_ids)})
        return dict(r.json())

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
