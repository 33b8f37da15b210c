"""``h3d``: serve the daemon and inspect what it stored.

h3d serve [--host H] [--port P] [--data-dir D] [--db-url U] [--node NAME] [--log-level L]
h3d status | runs | show RUN [--json | --html FILE] | report RUN (as show) | compare RUN...
    | export RUN [--samples] [-o FILE] | stop | import [FILES]                [--data-dir D]
h3d db upgrade | db current | db check                        [--data-dir D] [--db-url U]
h3d doctor                                                                    [--data-dir D]
h3d demo                      [--data-dir D] [--db-url U] [--node NAME] [--log-level L]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import re
import shlex
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from h3d import __version__
from h3d._http import DaemonClient, DaemonDown, find_daemon, read_token
from h3d.datadir import (
    CLEAN_STOP,
    LOCK_NAME,
    SAMPLING_NAME,
    DataDirLock,
    lock_holder,
    make_private,
)
from h3d.errors import H3DError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from h3d.config import Settings
    from h3d.power.early import EarlyReadings
    from h3d.reaper import NodeLease

logger = logging.getLogger(__name__)


class CommandError(Exception):
    """A command cannot go on: ``main`` prints ``h3d: <message>`` in one line, exits ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


#: The settings a command-line flag sets (the others come from H3D_* variables only).
_FLAGS = {
    "host": "--host",
    "port": "--port",
    "data_dir": "--data-dir",
    "db_url": "--db-url",
    "node": "--node",
    "log_level": "--log-level",
}


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    from h3d.config import ENV_PREFIX, Settings  # pydantic: inside serve's start-up GC pause

    kw: dict[str, Any] = {}
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    try:
        return Settings(**kw)
    except ValidationError as exc:  # one line naming each bad setting, flag or variable
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            env = ENV_PREFIX + field.upper()
            value = shlex.quote(str(err.get("input", "")))
            where = f"{_FLAGS[field]} {value} ({env})" if field in kw else f"{env}={value}"
            why = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {why}" if field else why)
        raise CommandError("invalid setting " + "; ".join(problems)) from None


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _engine(settings: Settings, args: argparse.Namespace) -> Any:
    """The store's engine, or a :class:`CommandError` when the URL names no usable database
    (not a URL; a dialect SQLAlchemy does not know; a driver not installed here)."""
    from sqlalchemy.exc import ArgumentError

    from h3d.storage.engine import make_engine

    try:
        url = settings.database_url
    except ValueError as exc:  # a data dir whose name no URL can hold
        raise CommandError(str(exc)) from None
    try:
        return make_engine(url)
    except (ArgumentError, ImportError, TypeError) as exc:
        shown = _hide_password(url) or "''"
        where = (
            f"--db-url {shown}"
            if getattr(args, "db_url", None) is not None
            else f"H3D_DB_URL={shown}"
            if settings.db_url
            else shown
        )
        reason = f"{exc}: its driver is not installed" if isinstance(exc, ImportError) else exc
        raise CommandError(
            f"{where} is not a usable database URL ({reason}); h3d supports "
            "sqlite:///PATH (the default: sqlite:///<data dir>/h3d.db) and "
            'postgresql+psycopg://USER@HOST/DB (pip install "h3[postgres]")'
        ) from None


def _data_dir_problem(data_dir: Path, exc: OSError) -> str:
    """Why the data dir cannot be made or used: a file in its place (or in a parent's) is
    named as such, not as "File exists"."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        there = next((p for p in (data_dir, *data_dir.parents) if p.exists()), data_dir)
        if not there.is_dir():
            return f"{there} is not a directory; name another data dir (--data-dir or H3D_DATA_DIR)"
    return f"{data_dir}: {exc.strerror or exc}"


def private_data_dir(settings: Settings) -> None:
    """The data dir 0700 and its files 0600, as ``serve`` keeps them, and a umask that keeps
    what this process creates there (the store, its WAL, lock files) private too."""
    os.umask(0o077)
    try:
        make_private(settings.data_dir)
    except OSError as exc:  # a read-only mount, another user's directory, a full disk
        raise CommandError(_data_dir_problem(settings.data_dir, exc)) from None


def _cannot_write(path: str, exc: OSError) -> CommandError:
    return CommandError(f"cannot write {path}: {exc.strerror or exc}", 1)


def _open_output(path: str) -> tuple[IO[str], str]:
    """``path`` opened for writing, and where it is written; or a :class:`CommandError`
    saying why it cannot be.

    A regular file (or a new one) is written as ``FILE.tmp-<pid>`` in its directory, and
    :func:`_close_output` renames it onto FILE once complete: an export that fails or is
    cut off (an error, Ctrl-C, SIGTERM: :func:`_sigterm_exits`) leaves FILE as it was. A
    name that is not a regular file (``/dev/stdout``, a FIFO, a device, a symbolic link) is
    written in place, as there is nothing to rename onto it.
    """
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a file where a parent directory should be, a denied lookup
        raise _cannot_write(path, exc) from None
    direct = st is not None and not stat.S_ISREG(st.st_mode)
    target = path if direct else f"{path}.tmp-{os.getpid()}"
    try:
        f = open(target, "w", newline="")  # noqa: SIM115  (the caller closes it)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    if st is not None and not direct:  # the new FILE keeps the old one's permissions
        with contextlib.suppress(OSError):
            os.chmod(target, stat.S_IMODE(st.st_mode))
    return f, target


def _close_output(f: IO[str], path: str, target: str) -> None:
    """Close ``f`` (written at ``target``) and put it in place at ``path``; or remove it and
    raise a :class:`CommandError` saying why it could not be written."""
    try:
        f.close()  # the last buffer, on a full disk
        if target != path:
            os.replace(target, path)
    except OSError as exc:
        _discard_output(f, path, target)
        raise _cannot_write(path, exc) from None


def _discard_output(f: IO[str], path: str, target: str) -> None:
    """Close ``f`` and remove the partial file: the temporary file, or what was written in
    place only if it is a regular file (never a symlink such as /dev/stdout, a FIFO or a
    device named as the output)."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a close that failed before
        f.close()
    with contextlib.suppress(OSError):
        if target != path or stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(target)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (``timeout``, a scheduler, ``kill``) raises ``SystemExit(143)`` meanwhile, so
    the clean-up of a partial output runs, as for Ctrl-C; the previous handler after."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no handler can be set
        installed = False
    else:
        installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path``, or raise a :class:`CommandError` saying why it could not be
    written (no partial file is left, and a previous ``path`` is kept)."""
    with _sigterm_exits():
        f, target = _open_output(path)
        try:
            f.write(text)
        except BaseException as exc:  # a full disk midway, a signal
            _discard_output(f, path, target)
            if isinstance(exc, OSError):
                raise _cannot_write(path, exc) from None
            raise
        _close_output(f, path, target)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# --- serve ------------------------------------------------------------------------------


class _StartupGcPause:
    """No cyclic garbage collection from the start of ``serve`` until the server is up.

    A start creates ~150 000 objects that live as long as the daemon (modules, classes,
    pydantic and SQLAlchemy structures) and almost no cyclic garbage (~800 objects). With
    the collector on, every few hundred allocations rescan the young ones and, as the heap
    grows, whole-heap collections rescan all of them: work that frees nothing. Once the
    server is up, ``gc.freeze()`` moves what the start built out of all later collections
    (which then scan only what the daemon allocates while serving) and collection resumes.
    """

    def __enter__(self) -> _StartupGcPause:
        self.was_enabled = gc.isenabled()
        gc.disable()
        return self

    def end(self) -> None:
        if self.was_enabled and not gc.isenabled():
            gc.freeze()
            gc.enable()

    def __exit__(self, *exc: object) -> None:
        self.end()  # a start that failed, or a server that stopped before it was up


def _import_fastapi_deferred() -> None:
    """Import FastAPI with pydantic's model builds deferred to first use (``defer_build``).

    FastAPI defines some hundred models for the OpenAPI document at import, which only
    ``/openapi.json`` and ``/docs`` ever use; building them at every start cost about 70 ms
    of a 0.8 s start on a slow host (benchmarks/results/startup.md). The default is restored
    before h3d's own models are defined, so they are built (and checked) at start as before.
    The document served is the same (tested).
    """
    from pydantic import BaseModel

    config = BaseModel.model_config
    had = "defer_build" in config
    config.setdefault("defer_build", True)
    try:
        import fastapi  # noqa: F401  (its OpenAPI models, through fastapi.params)
    finally:
        if not had:
            config.pop("defer_build", None)


def _full_disk(settings: Settings, exc: BaseException) -> Path | None:
    """The directory whose disk ``exc``, or an error it came from, says is full: SQLite's
    SQLITE_FULL (for the store's directory) or ENOSPC (for the file's); else None."""
    import sqlite3

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return Path(os.fsdecode(e.filename)).parent if e.filename else settings.data_dir
        code = getattr(e, "sqlite_errorcode", None)  # set only on errors SQLite returned
        if isinstance(e, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            from sqlalchemy.engine import make_url

            db = make_url(settings.database_url).database
            return Path(db).absolute().parent if db else settings.data_dir
        e = e.__cause__ or e.__context__
    return None


def _cannot_start(settings: Settings, exc: BaseException) -> CommandError:
    """``serve``'s one line (exit 2) for a start that the data dir or the store stopped,
    before binding or in the app's start-up (registering the devices, writing daemon.json).
    A full disk is named as such, whichever write found it."""
    from h3d.storage.migrate import full_disk_note

    full = _full_disk(settings, exc)
    if full is not None:
        why = full_disk_note(full)
    elif isinstance(exc, H3DError):
        why = exc.message
    elif isinstance(exc, OSError):
        where = Path(os.fsdecode(exc.filename)) if exc.filename else settings.data_dir
        why = _data_dir_problem(where, exc)
    else:  # SQLAlchemy's: a database down, a read-only store, ...
        from sqlalchemy.engine import make_url

        url = make_url(settings.database_url).render_as_string(hide_password=True)
        why = f"{url}: {_driver_error(exc)}"
    return CommandError(f"cannot start: {why}")


def _driver_error(exc: BaseException) -> str:
    """The database driver's message on one line: PostgreSQL's carries the statement and a
    ``^`` pointer on the lines after it (``LINE 2: CREATE TABLE ...``)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _StartupFailure:
    """The app, wrapped so that a start-up the store or the disk fails (``errors``) is kept
    in ``error`` for ``serve`` to say in one line, where uvicorn would log the lifespan's
    traceback. Any other failure is reported as before; requests pass through untouched."""

    def __init__(self, app: ASGIApp, errors: tuple[type[BaseException], ...]) -> None:
        self.app = app
        self.errors = errors
        self.error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def send_later(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # its text is the traceback: sent once the error is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, send_later)
        except self.errors as exc:
            if not held:  # not a start-up failure
                raise
            self.error = exc
            await send({"type": "lifespan.startup.failed", "message": ""})
        except BaseException:
            for message in held:
                await send(message)
            raise


def _claim_node(settings: Settings) -> NodeLease:
    """The node's lease, claimed through the store that the app then takes over (one store,
    whose connections and compiled statements serve the start-up's writes and reads)."""
    from h3d.app import node_lease
    from h3d.storage.engine import Store

    store = Store(settings.database_url)
    try:
        lease = node_lease(settings, store)
        lease.claim()
    except BaseException:
        store.close()
        raise
    return lease


def cmd_serve(args: argparse.Namespace) -> int:
    # The daemon's models are its own: no third-party pydantic plugin observes them, and
    # looking for one scanned every installed distribution's entry points at the first
    # model (about 7 ms of every start, before the data dir's lock). Unless set already.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    with _StartupGcPause() as gc_pause:
        settings = _settings(args)  # a bad setting is one line before anything is created
        _configure_logging(settings.log_level)
        data_dir = settings.data_dir
        made = [p for p in (data_dir, *data_dir.parents) if not os.path.lexists(p)]
        lock = _lock_data_dir(settings)
        try:
            early = _early_readings(settings)
            try:
                return _serve(args, settings, lock, made, gc_pause, early)
            finally:
                # a start that failed (on an `h3d stop`, uvicorn re-raises SIGTERM once it has
                # shut down, and the app's lifespan has stopped them)
                early.stop()
        finally:
            lock.release()


def _early_readings(settings: Settings) -> EarlyReadings:
    """The power backends, read from now on while the rest of the start goes on: an
    autostarting profiler waits for the first readings, not for /healthz
    (:mod:`h3d.power.early`)."""
    from h3d.power.early import EarlyReadings, held_logs
    from h3d.power.select import settings_backends

    # what it says of the devices is said once the daemon starts serving, as before: a
    # start that cannot go on (a bad store) stays one line
    with held_logs("h3d.power") as said:
        backends = settings_backends(settings)
    return EarlyReadings(backends, settings.data_dir, settings.sample_interval_s, said=said)


def _lock_data_dir(settings: Settings) -> DataDirLock:
    """The data dir made private and its lock taken: ``serve``'s first step, before the
    imports that take most of its start (SQLAlchemy, FastAPI, uvicorn, the app). A profiler
    that starts meanwhile finds the data dir held and waits for this daemon to write its
    ``daemon.json`` (h3client/_daemon.py) instead of starting a daemon of its own, which
    would take the data dir from this one."""
    lock = DataDirLock(settings.data_dir)
    try:
        private_data_dir(settings)  # the store, its WAL and journal: this user's only
        lock.acquire()
    except CommandError as exc:
        raise CommandError(f"cannot start: {exc.message}") from None
    except (H3DError, OSError) as exc:  # another daemon holds it, a full disk
        raise _cannot_start(settings, exc) from None
    return lock


def _made_for_nothing(
    settings: Settings, made: list[Path], lock: DataDirLock, early: EarlyReadings
) -> None:
    """Undo what the start made before it found that it cannot run: the lock file, the
    early readings' marker and the directories in ``made`` (the data dir first, then the
    parents made with it), if nothing else was put there meanwhile."""
    early.stop()
    if made:
        with contextlib.suppress(OSError):
            (settings.data_dir / LOCK_NAME).unlink()
            lock.release()
            for path in made:
                path.rmdir()


def _serve(
    args: argparse.Namespace,
    settings: Settings,
    lock: DataDirLock,
    made: list[Path],
    gc_pause: _StartupGcPause,
    early: EarlyReadings,
) -> int:
    try:
        engine = _engine(settings, args)
    except CommandError:  # a bad URL is one line, and leaves nothing behind
        _made_for_nothing(settings, made, lock, early)
        raise
    _import_fastapi_deferred()
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from h3d.app import create_app
    from h3d.storage import migrate

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            gc_pause.end()  # bound and serving: the start-up is over

    # What stops a start in one line (exit 2): a full disk, a read-only mount, a store that
    # is damaged, newer or unreachable.
    errors = (H3DError, SQLAlchemyError, OSError)
    try:
        # check the store before binding, so a bad database is one clear line
        migrate.check_integrity(engine, settings.data_dir / CLEAN_STOP)
        if settings.auto_migrate:
            migrate.upgrade(engine)
        else:
            migrate.verify_schema(engine)
        migrate.probe_write(engine)
    except errors as exc:
        raise _cannot_start(settings, exc) from None
    finally:
        engine.dispose()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this on Linux: without it, a response written as
    # headers then body waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        hint = (
            " (another program or another data dir's daemon has it: `--port 0` takes a free "
            "port, which clients find in the data dir's daemon.json)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        print(
            f"h3d: cannot listen on {settings.host}:{settings.port}: {exc}{hint}", file=sys.stderr
        )
        return 2
    try:  # bound, so a port in use left nothing held; not yet serving: one line if in use
        lease = _claim_node(settings)
    except errors as exc:
        sock.close()
        raise _cannot_start(settings, exc) from None
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    settings.public_url = f"http://{host}:{port}"
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other hosts (token required)", host)
    # The store passed the checks above, but the app's start-up writes too (the devices,
    # daemon.json): a disk that filled meanwhile, or had room only for the probe, stops it
    # there. uvicorn would log the traceback and "Application startup failed": say it in
    # one line instead.
    app = _StartupFailure(
        create_app(settings, store_checked=True, lease=lease, early=early), errors
    )
    logging.getLogger("uvicorn.error").addFilter(lambda _record: app.error is None)
    from h3d.security import serve_limits  # connections bounded, never held idle

    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
        **serve_limits(),
    )
    server = Server(config)
    logger.info("serving on %s (data dir %s)", settings.public_url, settings.data_dir)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit when the start-up failed
        if app.error is None:
            raise
    if app.error is not None:
        raise _cannot_start(settings, app.error)
    return 0 if server.started else 1


# --- client-side commands ------------------------------------------------------------------


#: Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts a sequence
#: that can clear the screen or retitle the window), line breaks, and the bidirectional
#: overrides that make a text read differently from what it holds.
_UNSHOWN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _shown(text: object) -> str:
    """``text`` safe to print: characters a terminal would act on are written as escapes
    (``\\x1b``, ``\\n``, ``\\u202e``). Run names, tags and phases are anyone's with a
    token (on a shared store, another user's), and a name must not clear the screen or
    break the runs table."""
    return _UNSHOWN.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))


def _fmt(v: Any, unit: str = "", digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    return f"{_shown(v)}{unit}"


def dashboard_link(settings: Settings, url: str, run: str | None = None) -> str:
    """The dashboard at ``url`` (on the page of run ``run``), with the token the commands
    send in its fragment, which browsers never send to a server: ``H3D_TOKEN``, else the
    data dir's (a daemon in a container holds the token given, not this data dir's). Each
    value is percent-encoded: a token written by hand may hold "&", "%" or "+"."""
    from urllib.parse import quote

    token = read_token(settings)
    fragment = "&".join(
        f"{key}={quote(value, safe='')}"
        for key, value in (("token", token), ("run", run))
        if value is not None
    )
    return f"{url}/#{fragment}" if fragment else f"{url}/"


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    url, problem = find_daemon(settings)
    if problem:
        print(f"h3d: {problem}", file=sys.stderr)
        return 1
    c = DaemonClient(settings, url)
    devs = c.get("/v1/devices")
    runs = c.get("/v1/runs", params={"limit": 1})
    running = c.get("/v1/runs", params={"status": "running", "limit": 1})
    print(f"h3d {c.get('/healthz')['version']} at {url}  (data dir {settings.data_dir})")
    print(f"runs: {runs['count']} stored, {running['count']} running")
    print(f"dashboard: {dashboard_link(settings, url)}")
    if not devs["devices"]:
        print("devices: none readable (source=none): energy is unknown; see `h3d doctor`")
    for d in devs["devices"]:
        if not d["active"]:
            continue
        label = " (ESTIMATE, not a measurement)" if d["source"] == "estimated" else ""
        print(
            f"  {_shown(d['name']):<24} {d['status']:<9} {d['source']:<18} "
            f"{_fmt(d['last_power_w'], ' W')}{label}  {_shown(d['model'])}"
        )
        if d["reason"] and d["status"] != "ok":
            print(f"      reason: {_shown(d['reason'])}")
    s = devs.get("sampler") or {}
    if s:
        print(
            f"sampler: every {s['interval_s']} s, achieved {_fmt(s['achieved_hz'], ' Hz')}, "
            f"jitter {_fmt(s['jitter_ms'], ' ms')}, "
            f"own cost {_fmt((s['cpu_fraction_of_core'] or 0) * 100, ' % of a core')}"
        )
    return 0


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive number")
    return n


def cmd_runs(args: argparse.Namespace) -> int:
    c = DaemonClient(_settings(args))
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    if args.tag:
        params["tag"] = args.tag
    # a page holds at most 1000 runs (the API's limit): follow the cursor to --limit
    rows: list[dict[str, Any]] = []
    while True:
        page = c.get("/v1/runs", params={**params, "limit": min(1000, args.limit - len(rows))})
        rows += page["data"]
        if len(rows) >= args.limit or not page.get("next_cursor"):
            break
        params["cursor"] = page["next_cursor"]
    print(f"{'id':<32}  {'name':<24} {'status':<9} {'batches':>8}  created")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        print(
            f"{r['id']:<32}  {_shown(r['name'])[:24]:<24} {r['status']:<9} {r['n_batches']:>8}  "
            f"{created}"
        )
    print(f"({len(rows)} of {page['count']})")
    return 0


def _resolved(c: DaemonClient, ref: str) -> Any:
    """The run (as ``GET /v1/runs/{id}`` gives it) that a run id, a run name (newest wins)
    or a unique id prefix names, resolved by the daemon.

    A blank ``RUN`` is refused here, in the command's words: the daemon's answer names its
    query parameter (``422 validation_error: query.ref: ...``), which the user never typed.
    """
    if not ref.strip():
        raise CommandError(
            f"no run given ({ref!r}): name one by its id, a unique id prefix or its name "
            "(`h3d runs` lists them)"
        )
    return c.get("/v1/runs/resolve", params={"ref": ref})


def _resolve(c: DaemonClient, ref: str) -> str:
    """The id of the run ``ref`` names (see :func:`_resolved`)."""
    return str(_resolved(c, ref)["id"])


def print_report(rep: dict[str, Any]) -> None:
    e, eta = rep["energy"], rep["eta"]
    print(f"run {rep['run']}  {_shown(rep['name'])}  [{rep['status']}]")
    print(f"  duration     {rep['duration_s']:.1f} s, {rep['n_batches']} batches")
    devices = e["by_device"]
    note = e.get("active_energy_note")
    if e["measured"]:
        tag = ""
    elif e["source"] == "none":  # the daemon's reason when it has devices that read none of it
        tag = f"  (unknown: {_shown(note)})" if note else "  (unknown: no device was readable)"
    else:
        tag = "  (ESTIMATED: not a measurement)"
    unread = rep["duration_s"] > 0  # a device that read none of a window: unknown, not 0 J
    if devices and unread and all(not d.get("covered_s") for d in devices):
        tag += "  (no readings while it ran: the daemon was not sampling)"
    print(f"  energy       {_fmt(e['energy_j'], ' J')}  source={e['source']}{tag}")
    multi_node = len(e.get("by_node", ())) > 1
    for d in devices:
        where = f"{d['node']}/" if multi_node else ""
        gaps = f", {d['gaps_s']:.1f} s unmeasured" if d.get("gaps_s") else ""
        energy = None if unread and not d.get("covered_s") else d["energy_j"]
        print(
            f"    {_shown(where + d['device']):<22} {_fmt(energy, ' J')}  {d['method']}, "
            f"{d['source']}{gaps}"
        )
    if e.get("active_energy_j") is not None:
        print(f"  above idle   {_fmt(e['active_energy_j'], ' J')}")
    else:
        print(
            f"  above idle   unknown ({_shown(e.get('active_energy_note') or 'no idle baseline')})"
        )
    if rep.get("world_size") or multi_node:
        print(f"  {rep.get('world_size') or 1} ranks, {rep.get('n_steps')} global steps")
        for n in e["by_node"]:
            ranks = ",".join(str(r) for r in n["ranks"]) or "-"
            print(f"    node {_shown(n['node']):<17} {_fmt(n['energy_j'], ' J')}  ranks {ranks}")
        for r in e.get("by_rank", ()):
            print(
                f"    rank {r['rank']:<4} {_shown(r['node']):<12} {_fmt(r['energy_j'], ' J')}  "
                f"{r['n_batches']} batches, {r['status']}"
            )
    if e.get("carbon_source", "none") != "none":
        print(f"  carbon       {_fmt(e.get('co2e_g'), ' gCO2e')}  source={e['carbon_source']}")
        print(f"               {_shown(e.get('carbon_detail', ''))}")
    elif "carbon_source" in e:
        # the daemon's reason: nothing configured, or a configured source failing and why
        why = e.get("carbon_detail") or "no carbon intensity configured"
        if why == "no carbon intensity configured":
            why += ": set H3D_CARBON_INTENSITY_G_PER_KWH, H3D_CARBON_REGION, ..."
        print(f"  carbon       unknown ({_shown(why)})")
    k = eta["smoothing_batches"]
    smoothed = "no batches" if not rep["n_batches"] else f"smoothed over {k} batch{'es' * (k != 1)}"
    print(f"  loss         {_fmt(eta['loss_start'])} -> {_fmt(eta['loss_now'])} nats ({smoothed})")
    print(f"  info gain    {_fmt(eta['info_gain_bits'], ' bits/sample')}")
    print(f"  eta          {_fmt(eta['eta_bits_per_j'], ' bits/J')}")
    span = (
        f"whole run, shorter than the {eta['window_s']:g} s window"
        if eta.get("window_is_whole_run")
        else f"last {eta['window_s']:g} s"
    )
    print(f"  marginal eta {_fmt(eta['marginal_eta_bits_per_j'], ' bits/J')} ({span})")
    if rep["epochs"]:
        print(
            f"  {'epoch':>5} {'phase':<14} {'loss':>10} {'acc':>7} {'energy J':>10} {'eta b/J':>10}"
        )
        for ep in rep["epochs"]:
            print(
                f"  {ep['epoch']:>5} {_shown(ep['phase'] or '-'):<14} {_fmt(ep['loss']):>10} "
                f"{_fmt(ep['accuracy']):>7} {_fmt(ep['energy_j']):>10} {_fmt(ep['eta_bits_per_j']):>10}"
            )
        if any((ep["eta_bits_per_j"] or 0.0) < 0 for ep in rep["epochs"]):
            print(
                "  (a negative eta: the smoothed training loss rose over that epoch, so the model"
                " lost information about its training data there)"
            )


def cmd_show(args: argparse.Namespace) -> int:
    c = DaemonClient(_settings(args))
    if args.html:
        from h3d.dashboard import render_report, run_bundle

        page = render_report(run_bundle(c.get, _resolve(c, args.run)))
        if args.html == _STDOUT:
            sys.stdout.write(page)
            return 0
        _write_file(args.html, page)
        print(f"h3d: wrote {args.html}")
        return 0
    rep = c.get(f"/v1/runs/{_resolve(c, args.run)}/report")
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep)
    return 0


#: How many runs ``GET /v1/compare`` takes at most.
_COMPARE_MAX = 20


def cmd_compare(args: argparse.Namespace) -> int:
    """Runs side by side, as ``GET /v1/compare`` sums them up (the dashboard's compare view)."""
    if len(args.runs) > _COMPARE_MAX:  # the API's limit, said before any request
        args.parser.error(f"at most {_COMPARE_MAX} runs ({len(args.runs)} given)")
    c = DaemonClient(_settings(args))
    ids = [_resolve(c, ref) for ref in args.runs]
    rows = c.get("/v1/compare", params={"runs": ",".join(ids)})["runs"]
    print(
        f"{'id':<32}  {'name':<24} {'status':<9} {'batches':>8} {'energy J':>10} {'source':<9} "
        f"{'ΔI bits/sample':>14} {'η bits/J':>10} {'acc':>7}"
    )
    for r in rows:
        print(
            f"{r['run_id']:<32}  {_shown(r['name'])[:24]:<24} {r['status']:<9} "
            f"{r['n_batches']:>8} {_fmt(r['energy_j']):>10} {r['source']:<9} "
            f"{_fmt(r['info_gain_bits']):>14} {_fmt(r['eta_bits_per_j']):>10} "
            f"{_fmt(r['final_accuracy']):>7}"
        )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete ended runs and everything stored of them, after asking (``--yes``: without).
    Every reference is resolved before anything is deleted: one unknown deletes none."""
    c = DaemonClient(_settings(args))
    runs = list({r["id"]: r for r in (_resolved(c, ref) for ref in args.runs)}.values())
    running = [f"{r['id']} ({_shown(r['name'])})" for r in runs if r["status"] == "running"]
    if running:  # refused before any is deleted, not halfway through the list
        raise CommandError(
            f"still running, so nothing was deleted: {', '.join(running)}; a run is deleted "
            "once it has ended",
            code=1,
        )
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError(
                "delete asks before it deletes, and stdin is no terminal: pass --yes to "
                "delete without asking"
            )
        listed = "".join(f"  {r['id']}  {_shown(r['name'])}  [{r['status']}]\n" for r in runs)
        print(
            f"delete {len(runs)} run(s) and all their data:\n{listed}[y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CommandError("nothing deleted", code=1)
    for r in runs:
        c.request("DELETE", f"/v1/runs/{r['id']}")
        print(f"deleted {r['id']} ({_shown(r['name'])})", flush=True)
    return 0


#: The output file name that means standard output (``-o -``), as in most Unix tools; a file
#: named ``-`` is still written as ``-o ./-``.
_STDOUT = "-"


def cmd_export(args: argparse.Namespace) -> int:
    import httpx

    if args.output == _STDOUT:
        args.output = None
    c = DaemonClient(_settings(args))
    rid = _resolve(c, args.run)
    if args.samples:  # one row per sample: how many is not known before the end
        path, what, total = f"/v1/runs/{rid}/samples.csv", "per-sample losses", ""
    else:
        path, what = f"/v1/runs/{rid}/export.csv", "batches"
        total = f"/{c.get(f'/v1/runs/{rid}')['n_batches']}"
    lines = 0
    out: IO[str] | None = None
    with _sigterm_exits():
        try:
            with c.http.stream("GET", path) as r:
                if r.status_code != 200:
                    r.read()
                    raise SystemExit(f"h3d: {r.status_code} {r.text[:200]}")
                # the file is opened only once the daemon answers with the export
                out, target = _open_output(args.output) if args.output else (sys.stdout, "")
                for chunk in r.iter_text():
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        if not args.output:
                            raise
                        raise _cannot_write(args.output, exc) from None
                    lines += chunk.count("\n")
                    if args.output and sys.stderr.isatty():
                        print(
                            f"\rexported {max(lines - 1, 0)}{total} {what}", end="", file=sys.stderr
                        )
                if args.output:
                    _close_output(out, args.output, target)  # removes it if that fails
                    out = None
        except BaseException as exc:
            if args.output and out is not None:  # cut off midway: FILE is left as it was
                _discard_output(out, args.output, target)
            if not isinstance(exc, httpx.TransportError):
                raise
            if out is None and not lines:  # before the export began
                raise c.transport_problem(exc, f"GET {path}") from None
            rows = max(lines - 1, 0)
            kept = (
                f"nothing was kept: {args.output} is as it was"
                if args.output
                else "stdout holds a partial CSV"
            )
            detail = " ".join(str(exc).split()) or type(exc).__name__
            how = (
                "stopped answering"
                if isinstance(exc, httpx.TimeoutException)
                else "went away"  # stopped, restarted, killed
            )
            raise DaemonDown(
                f"the daemon at {c.url} {how} during the export ({detail}) after {rows} "
                f"row(s) of {what}; {kept}"
            ) from None
    if args.output:
        print(f"\rexported {max(lines - 1, 0)} {what} to {args.output}", file=sys.stderr)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the daemon of this data dir: only a pid that holds the data dir's lock.

    daemon.json alone is not proof: after a SIGKILL it names a dead pid that the system may
    have given to any other process since.
    """
    settings = _settings(args)
    holder = lock_holder(settings.data_dir)
    try:
        info = json.loads(settings.daemon_file.read_text())
        recorded: int | None = int(info["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        recorded = None
    if holder is None:
        # what a killed daemon left when it was starting (h3d.power.early): no one reads it
        (settings.data_dir / SAMPLING_NAME).unlink(missing_ok=True)
        if recorded is not None:
            settings.daemon_file.unlink(missing_ok=True)
            print(
                f"h3d: no daemon holds {settings.data_dir}; removed a stale daemon.json "
                f"(pid {recorded} was not signalled)",
                file=sys.stderr,
            )
        else:
            print(f"h3d: no daemon is running from {settings.data_dir}", file=sys.stderr)
        return 1
    if recorded is not None and recorded != holder:
        print(
            f"h3d: daemon.json names pid {recorded} but pid {holder} holds the data dir; "
            f"signalling the holder",
            file=sys.stderr,
        )
    try:
        os.kill(holder, signal.SIGTERM)
    except ProcessLookupError:
        print(f"h3d: the daemon (pid {holder}) is gone", file=sys.stderr)
        return 1
    print(f"h3d: asked the daemon (pid {holder}) to stop")
    return 0


#: The spool's line format version and operations (h3client/_spool.py, h3client.client).
_SPOOL_VERSION = 1
_SPOOL_OPS = {
    "create": ("POST", "/v1/runs"),
    "batches": ("POST", "/v1/runs/{}/batches"),
    "epochs": ("POST", "/v1/runs/{}/epochs"),
    "update": ("PATCH", "/v1/runs/{}"),
}


def _spool_request(line: bytes) -> tuple[str, str, str, bytes]:
    """(op, method, URL path, JSON body) of one spool line, or ValueError saying why it cannot
    be sent. The same lines h3client's replay (``_spool.replay_file``) skips are skipped,
    and also those it could not send either: a line that is not an operation object (no
    ``op``, ``run_id`` or ``body``), and a body holding NaN or infinity (JSON has no form
    for them; h3client never writes one)."""
    from urllib.parse import quote

    try:
        op = json.loads(line)
    except ValueError as exc:  # a torn line after a crash, bytes that are not UTF-8
        raise ValueError(f"not readable JSON ({exc})") from None
    if not isinstance(op, dict):
        raise ValueError(f"not an operation object but a JSON {type(op).__name__}")
    kind, rid, body = op.get("op"), op.get("run_id"), op.get("body")
    if kind not in _SPOOL_OPS:
        raise ValueError(f"unknown operation {kind!r}")
    if op.get("v") != _SPOOL_VERSION:
        raise ValueError(f"spool version {op.get('v')!r}, not {_SPOOL_VERSION}")
    if not (isinstance(rid, str) and rid):
        raise ValueError(f"no run id (run_id {rid!r})")
    if not isinstance(body, dict):
        raise ValueError(f"the body is not a JSON object ({type(body).__name__})")
    try:
        text = json.dumps(body, allow_nan=False).encode()
    except ValueError:
        raise ValueError("the body holds NaN or infinity, which JSON has no form for") from None
    method, url = _SPOOL_OPS[kind]
    return kind, method, url.format(quote(rid, safe="")), text


def _split_batches(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A batches body as two, each with half of its batches in order (as h3client's
    ``_spool.split_batches``); None for one batch or fewer, or a column it does not know."""
    import base64
    from array import array

    columns = body.get("columns")
    if columns is None:
        rows = body.get("batches") or []
        h = len(rows) // 2
        return ({**body, "batches": rows[:h]}, {**body, "batches": rows[h:]}) if h else None
    lists = ("n", "epoch", "step", "phase")
    packed = {"seq_i64": "q", "t_f64": "d", "loss_f64": "d", "sizes_i64": "q"}
    vectors = (("losses_f32", 4), ("indices_i64", 8))
    if not isinstance(columns, dict) or set(columns) - {*lists, *packed, *dict(vectors)}:
        return None

    def values(name: str) -> array[Any]:
        a = array(packed[name])
        a.frombytes(base64.b64decode(columns[name]))
        return a

    h = len(values("seq_i64")) // 2
    if not h:
        return None
    halves: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for name in packed:
        if columns.get(name) is not None:
            a = values(name)
            for half, part in zip(halves, (a[:h], a[h:]), strict=True):
                half[name] = base64.b64encode(part.tobytes()).decode()
    if columns.get("sizes_i64") is not None:  # the first half's share of the per-sample values
        cut = sum(max(0, n) for n in values("sizes_i64")[:h])
        for name, width in vectors:
            if columns.get(name) is not None:
                raw = base64.b64decode(columns[name])
                cuts = (raw[: cut * width], raw[cut * width :])
                for half, piece in zip(halves, cuts, strict=True):
                    half[name] = base64.b64encode(piece).decode()
    for name in lists:
        if columns.get(name) is not None:
            halves[0][name], halves[1][name] = columns[name][:h], columns[name][h:]
    return {**body, "columns": halves[0]}, {**body, "columns": halves[1]}


def _replay(c: Any, kind: str, method: str, url: str, body: bytes) -> Any:
    """Send one spool operation as a replay (``H3-Replay``: the daemon then takes the rows of
    a run its reaper failed, never of one its client ended); a batches body over the
    daemon's body limit (413) in halves, recursively. The first answer that is not a
    success, else the last (a single batch over the limit: its 413)."""
    headers = {"Content-Type": "application/json", "H3-Replay": "1"}
    r = c.http.request(method, url, content=body, headers=headers)
    too_large = r.status_code == 413 and kind == "batches"
    for half in (_split_batches(json.loads(body)) if too_large else None) or ():
        r = _replay(c, kind, method, url, json.dumps(half).encode())
        if r.status_code >= 400:
            break
    return r


def _error_of(r: Any) -> dict[str, Any]:
    """The daemon's ``{"code", "message"}`` of an error answer ({} if it sent none)."""
    try:
        error = r.json().get("error") if r.content else None
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def cmd_import(args: argparse.Namespace) -> int:
    """Replay client spool files (``<data dir>/spool/*.jsonl``) through the running daemon.

    The format is h3client's (see h3client/_spool.py): one JSON operation per line, each
    idempotent at the daemon, so importing twice stores everything once. h3d does not import
    h3client, so the replay is done here, deciding as h3client's ``replay_file`` does: lines
    that cannot be sent are skipped and reported, and the rest is replayed; a file is
    deleted only when every line in it was imported (one with skipped lines is kept and the
    command exits 1). A file's import stops, keeping the file, at an operation the daemon
    refuses, and goes on with the next file; a listed spool file deleted meanwhile (its
    profiler replayed it) was stored, and is passed over. It exits 1 naming the kept files.
    Its requests say they are a replay, so a run the daemon's reaper failed (its process
    gone, its final status in this file) takes them; a batches line over the daemon's body
    limit goes in halves. The file's lock is held to read a line, not while it is sent: a
    profiler appending to it (its ``stop()``) waits for one read at most.
    """
    import fcntl

    import httpx

    settings = _settings(args)
    files = [Path(f) for f in args.files] or sorted((settings.data_dir / "spool").glob("*.jsonl"))
    if not files:
        print(f"h3d: nothing to import in {settings.data_dir / 'spool'}")
        return 0
    c = DaemonClient(settings)
    # Answers meaning "done already" (h3client._spool.already_done): a create refused because
    # the run exists, or a status update refused because the run exists or finished. A 409
    # run_finished on a create (a new rank joining a run that ended; a rank already in it is
    # answered 200), on batches or on epochs is not one of them: the daemon acknowledges a
    # replay of rows it holds, so that 409 means rows of this spool were never stored.
    already = {"create": {"run_exists"}, "update": {"run_exists", "run_finished"}}
    listed = not args.files  # found in the spool dir, not named by the user
    total = total_skipped = refused = unreadable = 0
    kept: list[str] = []  # not wholly imported: kept for a person, or a later import
    for path in files:
        ops = skipped = 0
        stopped = False
        try:
            f = open(path, "rb")  # noqa: SIM115  (closed below)
        except OSError as exc:
            if listed and isinstance(exc, FileNotFoundError):
                continue  # its profiler (or another import) replayed and deleted it meanwhile
            print(f"h3d: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            unreadable += 1
            kept.append(path.name)
            continue
        with f:
            fd, n = f.fileno(), 0
            while True:
                fcntl.flock(fd, fcntl.LOCK_EX)
                line = f.readline()
                if not line:  # the end, locked until the file closes: nothing appended since
                    with contextlib.suppress(FileNotFoundError):  # another import deleted it
                        if not skipped and os.stat(path).st_ino == os.fstat(fd).st_ino:
                            path.unlink()  # (and not a new file of that name)
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                n += 1
                if not line.strip():
                    continue
                try:
                    kind, method, url, body = _spool_request(line)
                except ValueError as exc:
                    print(f"h3d: {path.name} line {n} skipped: {exc}", file=sys.stderr)
                    skipped += 1
                    continue
                kept_too = f"{path.name} is kept, {ops} operation(s) of it were imported"
                try:
                    r = _replay(c, kind, method, url, body)
                except httpx.TransportError as exc:
                    down = c.transport_problem(exc, f"the import of {path.name}")
                    raise DaemonDown(f"{down}; {kept_too}") from None
                except DaemonDown as exc:  # what answers is no h3d
                    raise DaemonDown(f"{exc}; {kept_too}") from None
                except SystemExit as exc:  # another data dir's daemon, said in one line
                    if not isinstance(exc.code, str):
                        raise
                    raise CommandError(f"{exc.code.removeprefix('h3d: ')}; {kept_too}", 1) from None
                if r.status_code == 401:
                    _, problem = find_daemon(settings)
                    if problem:  # another data dir's daemon: say so, not just "401"
                        raise CommandError(f"{problem}; {path.name} is kept", 1)
                if r.status_code >= 400:
                    error = _error_of(r)
                    code = error.get("code")
                    if code not in already.get(kind, ()):
                        if code == "run_finished":
                            why = (
                                f"{_shown(error.get('message'))} "
                                "(a run its client ended takes no more data)"
                            )
                        elif error:
                            message = _shown(error.get("message")).rstrip(".")
                            why = f"{r.status_code} {_shown(code)}: {message}"
                        else:
                            why = f"{r.status_code} {_shown(' '.join(r.text[:200].split()))}"
                        print(
                            f"h3d: {path.name} line {n}: not imported: {why}. The file is "
                            f"kept; {ops} operation(s) before this line were imported.",
                            file=sys.stderr,
                        )
                        stopped = True
                        break  # this file's next operations may need this one: the next file
                ops += 1
                if sys.stderr.isatty():
                    print(f"\r{path.name}: {ops} operations", end="", file=sys.stderr)
        total += ops
        if skipped or stopped:
            total_skipped += skipped
            refused += stopped
            kept.append(path.name)
        else:
            print(f"imported {path.name}: {ops} operations")
    if kept:
        if len(files) > 1 or total_skipped:  # (one file's one problem is said above)
            problems = [
                f"{k} {what} (above)"
                for k, what in (
                    (total_skipped, "line(s) skipped, not imported"),
                    (refused, "file(s) stopped at an operation the daemon refused"),
                    (unreadable, "file(s) could not be read"),
                )
                if k
            ]
            print(
                f"h3d: {'; '.join(problems)}; kept {', '.join(kept)}; {total} operation(s) imported",
                file=sys.stderr,
            )
        return 1
    print(f"h3d: imported {len(files)} spool file(s), {total} operations")
    return 0


def _missing_store(settings: Settings, engine: Any) -> Path | None:
    """The SQLite file of ``engine`` when there is none yet (opening it would create it), or
    None: a file is there, or the URL names no file (memory, a PostgreSQL server), or one in
    a directory that is missing or not a directory, which opening it names as such. The
    default store's data dir may be missing too: a data dir not made yet has no store."""
    from h3d.storage.migrate import sqlite_file

    path = sqlite_file(engine)
    if path is None or engine.url.query.get("uri"):  # a file: URI with its own modes: SQLite's
        return None
    if os.path.lexists(path):
        return None
    parent = path.parent
    if parent.is_dir() or (not settings.db_url and not os.path.lexists(parent)):
        return path
    return None


def _store_in_data_dir(settings: Settings, engine: Any) -> bool:
    """Whether the store of ``engine`` is a SQLite file inside the data dir (the default)."""
    if not settings.db_url:
        return True
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return False
    if engine.url.query.get("uri"):  # a file: URI: its path is SQLite's to read
        return False
    return Path(os.path.abspath(database)).is_relative_to(os.path.abspath(settings.data_dir))


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from h3d.storage import migrate

    settings = _settings(args)
    engine = _engine(settings, args)  # a bad URL is one line before anything is created
    url = engine.url.render_as_string(hide_password=True)
    asking = args.db_command in ("current", "check")
    missing = _missing_store(settings, engine) if asking else None
    if missing is not None:  # a question: it creates nothing (a typo'd path made a store)
        engine.dispose()
        raise CommandError(
            f"{url}: no store there (nothing was created); `h3d db upgrade` or `h3d serve` "
            "creates it",
            1,
        )
    # As `serve` keeps the data dir: 0700, the store 0600. It is made only for a store that
    # lives in it (`db upgrade` of the default store); an existing one is tightened; a
    # question about a store elsewhere (`--db-url`) creates no data dir.
    os.umask(0o077)
    in_data_dir = args.db_command == "upgrade" and _store_in_data_dir(settings, engine)
    if in_data_dir or os.path.lexists(settings.data_dir):
        try:
            private_data_dir(settings)
        except CommandError:
            engine.dispose()
            raise
    try:
        if args.db_command == "upgrade":
            before, after = migrate.upgrade(engine)
            if before == after:
                print(f"{url}: already at {after}")
            else:
                print(f"{url}: upgraded {before or '(empty)'} -> {after}")
        elif args.db_command == "check":  # what a start skips after a clean stop
            migrate.check_integrity(engine)
            if engine.dialect.name == "sqlite":
                print(f"{url}: quick_check ok")
            else:
                print(f"{url}: nothing to check here (the server checks its own pages)")
        else:
            rev = migrate.current_revision(engine)
            print(f"{url}: at {rev or '(empty)'}; this h3d's head is {migrate.head_revision()}")
    except H3DError as exc:
        print(f"h3d: {exc.message}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, OSError) as exc:  # a database down, a path that cannot be opened
        print(f"h3d: {url}: {_driver_error(exc)}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from h3d.power import doctor

    return doctor.main(_settings(args))


def cmd_setup_rapl(args: argparse.Namespace) -> int:
    from h3d.power import setup_rapl

    return setup_rapl.main(
        group=args.group, user=args.user, do_apply=args.apply, root=Path(args.root)
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from h3d import demo

    settings = _settings(args)
    if settings.db_url:  # passed on to the daemon it starts: a bad one is one line here
        _engine(settings, args).dispose()
    return demo.main(settings, epochs=args.epochs, keep=not args.stop)


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Each command takes the flags it uses, no others: the commands that talk to the data
    # dir's daemon took --db-url and ignored it, listing the runs of another store.
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", dest="data_dir", help="data dir (env H3D_DATA_DIR)")
    store = argparse.ArgumentParser(add_help=False, parents=[data])  # db: the store itself
    store.add_argument("--db-url", dest="db_url", help="SQLAlchemy URL (env H3D_DB_URL)")
    daemon = argparse.ArgumentParser(add_help=False, parents=[store])  # serve, demo
    daemon.add_argument(
        "--node",
        help="this daemon's node name in a shared store (env H3D_NODE; default: host name)",
    )
    daemon.add_argument(
        "--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ... (env H3D_LOG_LEVEL)"
    )
    p = argparse.ArgumentParser(prog="h3d", description="The H3 energy daemon.")
    p.add_argument("--version", action="version", version=f"h3d {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[daemon], help="run the daemon")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8421; 0 picks a free one)")
    s.set_defaults(func=cmd_serve)
    sub.add_parser("status", parents=[data], help="is a daemon up; devices").set_defaults(
        func=cmd_status
    )
    r = sub.add_parser("runs", parents=[data], help="list runs")
    r.add_argument("--status", choices=["running", "finished", "failed"])
    r.add_argument("--tag")
    r.add_argument("--limit", type=_at_least_one, default=20, help="how many (newest first)")
    r.set_defaults(func=cmd_runs)
    for name, what in (("show", "a run's report"), ("report", "a run's report (as show)")):
        sh = sub.add_parser(name, parents=[data], help=what)
        sh.add_argument("run", help="run id, unique id prefix, or name")
        form = sh.add_mutually_exclusive_group()  # one report form: neither is dropped
        form.add_argument("--json", action="store_true")
        form.add_argument(
            "--html", metavar="FILE", help="write a self-contained HTML report (-: to stdout)"
        )
        sh.set_defaults(func=cmd_show)
    cp = sub.add_parser("compare", parents=[data], help="runs side by side")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="run ids, unique id prefixes or names")
    cp.set_defaults(func=cmd_compare)
    ex = sub.add_parser("export", parents=[data], help="a run's batches as CSV")
    ex.add_argument("run", help="run id, unique id prefix, or name")
    ex.add_argument(
        "--samples",
        action="store_true",
        help="the per-sample losses instead, one row per sample (seq, epoch, index, loss)",
    )
    ex.add_argument("-o", "--output", help="file (default, or -: stdout)")
    ex.set_defaults(func=cmd_export)
    de = sub.add_parser(
        "delete", parents=[data], help="delete ended runs and all their data (asks first)"
    )
    de.add_argument("runs", nargs="+", metavar="run", help="run id, unique id prefix, or name")
    de.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    de.set_defaults(func=cmd_delete)
    sub.add_parser("stop", parents=[data], help="stop the running daemon").set_defaults(
        func=cmd_stop
    )
    im = sub.add_parser("import", parents=[data], help="replay client spool files")
    im.add_argument("files", nargs="*", help="spool files (default: <data dir>/spool/*.jsonl)")
    im.set_defaults(func=cmd_import)
    db = sub.add_parser("db", parents=[store], help="database schema")
    db.add_argument(
        "db_command",
        choices=["upgrade", "current", "check"],
        help="upgrade the schema; show its revision; check a SQLite file (PRAGMA quick_check)",
    )
    db.set_defaults(func=cmd_db)
    sub.add_parser(
        "doctor", parents=[data], help="which power backends work, and why not"
    ).set_defaults(func=cmd_doctor)
    sr = sub.add_parser(
        "setup-rapl", help="RAPL without root: a udev rule and a systemd unit (prints them)"
    )
    sr.add_argument("--group", default="h3d-rapl", help="the group that may read the counters")
    sr.add_argument("--user", default=None, help="the daemon's user (default: $SUDO_USER)")
    sr.add_argument("--apply", action="store_true", help="install them (as root)")
    sr.add_argument("--root", default="/", help=argparse.SUPPRESS)  # tests: install under here
    sr.set_defaults(func=cmd_setup_rapl)
    d = sub.add_parser("demo", parents=[daemon], help="profile a real small training run")
    d.add_argument("--epochs", type=_at_least_one, default=20)
    d.add_argument("--stop", action="store_true", help="stop the daemon it started afterwards")
    d.set_defaults(func=cmd_demo)
    for command in sub.choices.values():  # a flag it does not take: its own usage says which
        command.set_defaults(parser=command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # A stdout whose encoding cannot hold a character printed (a redirected stdout on
    # Windows is the ANSI code page: compare's "η bits/J", a run's name) shows it as "?",
    # rather than ending the command with a UnicodeEncodeError.
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"h3d: {exc.message}", file=sys.stderr)
        return exc.code
    except DaemonDown as exc:
        print(f"h3d: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # the daemon's answer in one line: it may quote a run's name
        if not isinstance(exc.code, str):
            raise
        print(_shown(exc.code), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `h3d show RUN | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
