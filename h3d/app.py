"""``create_app(settings)``: the FastAPI application. Nothing is created at import time."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, TypedDict

import psutil
import swagger_ui_bundle
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from h3d import __version__, openapi
from h3d.api import add_routes
from h3d.api._routes import v1_checked_only_if_loaded
from h3d.api.routes.runs import is_local
from h3d.config import Settings
from h3d.dashboard import STATIC_TYPES, shipped_static, static_text
from h3d.datadir import CLEAN_STOP, make_private, remove_pid_file, write_pid_file
from h3d.errors import H3DError
from h3d.metrics import CarbonTotals
from h3d.metrics import render as render_metrics
from h3d.middleware import GuardMiddleware, error_payload
from h3d.power.base import PowerBackend
from h3d.power.early import EarlyReadings
from h3d.power.sampler import PowerSampler
from h3d.power.select import settings_backends
from h3d.reaper import NodeLease, Reaper
from h3d.security import MAX_NONCE_CHARS, bearer_matches, ensure_token, healthz_proof
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store

#: Seconds one rendering of /metrics serves (see the route).
METRICS_TTL_S = 1.0

logger = logging.getLogger(__name__)


class State(TypedDict):
    settings: Settings
    store: Store
    sampler: PowerSampler | None
    reaper: Reaper


def _write_daemon_file(settings: Settings) -> None:
    if settings.public_url is None:
        return
    info = {"url": settings.public_url, "version": __version__, "started_at": time.time()}
    write_pid_file(settings.daemon_file, info)


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """The methods every route on the request's path takes, from the app's routes (the
    OpenAPI leaves out the dashboard, /docs and /openapi.json). A literal path wins over a
    template (/v1/runs/resolve over /v1/runs/{run_id})."""
    literal: set[str] = set()
    templated: set[str] = set()
    for route in app.router.routes:
        if not isinstance(route, Route) or not route.methods:
            continue
        match, _scope = route.matches(request.scope)
        if match is not Match.NONE:  # PARTIAL: the path matches, the method does not
            (templated if route.param_convertors else literal).update(route.methods)
    return sorted(literal or templated)


def _take_up(sampler: PowerSampler, run_id: str, pid: int | None, rank: int | None) -> None:
    """Follow a run still running when the daemon started, unless its local process died
    meanwhile: that one takes no share, and is failed after the exit grace. Runs are taken
    up together, before sampling starts: the first share sample writes their split."""
    try:
        gone = pid is not None and not psutil.pid_exists(pid)
    except (OverflowError, ValueError):  # no such pid on this system
        gone = True
    if gone:
        sampler.run_gone(run_id, rank)
    else:
        sampler.run_started(run_id, pid, rank, split=False)


def node_lease(settings: Settings, store: Store) -> NodeLease:
    """This daemon's lease on its node name: renewed every reaper pass, lapsing after six
    missed ones (at least 30 s)."""
    return NodeLease(store, settings.node, lease_s=max(30.0, 6 * settings.run_reap_every_s))


def create_app(
    settings: Settings,
    *,
    backends: Sequence[PowerBackend] | None = None,
    store_checked: bool = False,
    lease: NodeLease | None = None,
    early: EarlyReadings | None = None,
) -> FastAPI:
    """The app; its lifespan opens the store (upgraded or verified, unless ``store_checked``:
    ``h3d serve`` has done it, under the data dir's lock, just before binding) and claims
    the node's lease (unless ``lease``: ``h3d serve`` claimed it then too, and the app
    takes over the lease's store, which it closes when it stops). ``early``: the
    backends ``h3d serve`` built first thing, and the readings it took of them while it
    started (:mod:`h3d.power.early`), which the sampler takes over."""
    with v1_checked_only_if_loaded():  # its routes are built here: see there
        return _app(
            settings, backends=backends, store_checked=store_checked, lease=lease, early=early
        )


def _app(
    settings: Settings,
    *,
    backends: Sequence[PowerBackend] | None,
    store_checked: bool,
    lease: NodeLease | None,
    early: EarlyReadings | None,
) -> FastAPI:
    make_private(settings.data_dir)
    token = ensure_token(settings.token_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        if lease is not None:  # claimed by `h3d serve`: its store is this app's, to close
            held, store = lease, lease.store
        else:
            store = Store(settings.database_url)
            if not store_checked and settings.auto_migrate:
                migrate.upgrade(store.engine)
            elif not store_checked:
                migrate.verify_schema(store.engine)
            # one live daemon per node name in the store: a lease renewed every reaper
            # pass, lapsing after several missed ones
            held = node_lease(settings, store)
            try:
                held.claim()
            except BaseException:
                store.close()
                raise
        devs = (
            list(backends)
            if backends is not None
            else early.backends
            if early is not None
            else settings_backends(settings)
        )
        sampler = PowerSampler(
            devs,
            store,
            interval_s=settings.sample_interval_s,
            flush_interval_s=settings.flush_interval_s,
            idle_min_s=settings.idle_min_s,
            full_resolution_s=settings.power_full_resolution_s,
            downsample_s=settings.power_downsample_s,
            node=settings.node,
        )
        store.overlay = sampler.unstored
        with store.read() as s:  # runs still running when the daemon stopped
            for run in repo.running_runs(s):
                if run.world_size is None and run.node == settings.node:
                    _take_up(sampler, run.id, run.pid if is_local(run.host) else None, None)
            for rr in repo.running_ranks(s, node=settings.node):
                _take_up(sampler, rr.run_id, rr.pid if is_local(rr.host) else None, rr.rank)
        if early is not None:  # its readings, from the daemon's first moments, are ours
            sampler.adopt(early.handover(), early.busy)
        sampler.start()
        reaper = Reaper(
            store,
            sampler,
            grace_s=settings.run_exit_grace_s,
            timeout_s=settings.run_timeout_s,
            every_s=settings.run_reap_every_s,
            lease=held,
        )
        reaper.start()
        _write_daemon_file(settings)
        logger.info("h3d %s ready (%d power devices)", __version__, len(devs))
        try:
            yield {"settings": settings, "store": store, "sampler": sampler, "reaper": reaper}
        finally:
            remove_pid_file(settings.daemon_file)
            if early is not None:
                early.stop()  # its sampling.json: serve's own `finally` never runs at SIGTERM
            reaper.stop()
            sampler.stop()
            try:
                held.release()
            except Exception:  # the store is gone: the lease lapses on its own
                logger.warning("could not release node %r's lease", settings.node)
            store.close()
            # the file as this stop leaves it: the next start need not read it all again
            migrate.record_clean_stop(store.engine, settings.data_dir / CLEAN_STOP)

    app = FastAPI(
        title="h3d",
        version=__version__,
        summary="H3 daemon: energy and bits-per-joule of training runs.",
        lifespan=lifespan,
        docs_url=None,  # served below from the package: GPU clusters are often offline
        redoc_url=None,
    )
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path))

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="h3d API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body_bytes=settings.max_body_bytes,
        allowed_hosts=settings.host_names,
    )
    add_routes(app, "/v1")
    openapi.install(app)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        # A static page: it asks for the token (or takes it from the URL fragment, which
        # browsers never send to the server) and reads /v1 with it like any client.
        return HTMLResponse(static_text("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        # separate files, no inline script or style: the page runs under a strict CSP. Any
        # name the package does not ship is a 404 without a file-system lookup: one longer
        # than a file name may be made is_file() raise (a 500, a traceback logged each time).
        kind = STATIC_TYPES.get(os.path.splitext(name)[1])
        if kind is None or name not in shipped_static():
            raise StarletteHTTPException(404, f"no static file {name[:100]!r}")
        return Response(static_text(name), media_type=kind, headers={"Cache-Control": "no-cache"})

    token_bytes = token.encode()

    # async: it does no I/O (an HMAC at most), so the event loop answers it at once, not a
    # threadpool thread that may be queued behind slow analysis requests
    @app.get("/healthz", tags=["system"])
    async def healthz(
        request: Request,
        nonce: Annotated[
            str | None,
            Query(
                max_length=MAX_NONCE_CHARS,
                description="A fresh nonce: the answer then holds its proof.",
            ),
        ] = None,
    ) -> dict[str, Any]:
        """Liveness. With ``?nonce=N`` (at most 128 characters), also ``proof``: the
        HMAC-SHA256, keyed with the token, of ``h3d-healthz <port> <N>`` (hex), ``port``
        being the one the request came in on. A client checks it before it sends the token:
        a program on the port that does not hold the token cannot answer it."""
        # open, like /docs; "authorized" tells a client whether this daemon takes the token
        # it sent (none sent: False), so that a client which found a daemon on the default
        # port, serving another data dir, starts its own instead of being refused every
        # request (/v1 answers 401 to the same token anyway: this reveals nothing more).
        # The proof reveals nothing of the token either, and a client needs no token to ask.
        sent = request.headers.get("authorization", "").encode()
        body: dict[str, Any] = {
            "status": "ok",
            "version": __version__,
            "authorized": bearer_matches(sent, token_bytes),
        }
        if nonce:
            server = request.scope.get("server")
            port = server[1] if server and isinstance(server[1], int) else 0
            body["proof"] = healthz_proof(token, port, nonce)
        return body

    carbon_totals = CarbonTotals()

    # One rendering serves every scrape within METRICS_TTL_S (a scraper every few seconds,
    # a dashboard, several Prometheus replicas): its cost, which grows with the running
    # runs, is then paid at most once a second however many clients read it.
    rendered: dict[str, Any] = {"t": -math.inf, "body": ""}
    render_lock = threading.Lock()

    @app.get("/metrics", tags=["system"], response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        st = request.state
        with render_lock:  # one rendering at a time; the others wait and share it
            if time.monotonic() - rendered["t"] >= METRICS_TTL_S:
                with st.store.read() as s:
                    rendered["body"] = render_metrics(
                        s,
                        st.sampler,
                        interval_s=settings.sample_interval_s,
                        settings=settings,
                        carbon_totals=carbon_totals,
                    )
                rendered["t"] = time.monotonic()
            body = rendered["body"]
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(H3DError)
    async def _h3d_error(_request: Request, exc: H3DError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(
            error_payload("validation_error", f"{where}: {first['msg']}", details),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        allowed = _allowed(app, request) if exc.status_code == 405 else []
        if allowed:
            # Starlette names the methods of the first route that matched the path; several
            # routes share a path here (GET and POST /v1/runs), so name them all. None: not
            # a route's (the mounted /docs/assets' files): Starlette's header is right.
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return JSONResponse(
            error_payload(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(
            error_payload("internal_error", f"{type(exc).__name__}: the daemon hit a bug"),
            status_code=500,
        )

    return app
