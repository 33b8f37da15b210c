"""Engines and the store: one writer thread that batches commits, readers on their own connections.

Why one writer: SQLite has one write lock. When request threads wrote through a shared pool,
a request holding the lock could wait for a threadpool thread (FastAPI commits a yield
dependency after the route returns, in another thread) while every thread waited for the
lock or a pooled connection: ~30 s stalls at 40 concurrent requests. Now request threads
never touch a write connection. They hand a function to the writer thread and wait for its
result; the writer runs whatever is queued in one transaction (group commit) and answers
each caller only after the commit, so a 200 still means "stored". Reads open a session on
their own pooled connection inside the route body and close it before the route returns:
in WAL mode readers never wait for the writer, and no connection is held across a thread
hop. Nothing here depends on the dialect: a PostgreSQL URL gets the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from h3d.errors import StorageUnavailable
from h3d.storage.migrate import REVISIONS

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _fold(text: str | None) -> str | None:
    """SQL ``h3_fold(x)`` on SQLite: ``x`` case-folded as Python folds it (any script)."""
    return None if text is None else text.casefold()


def _may_switch_to_wal(cur: Any) -> bool:
    """Whether a connection may set WAL mode: the file is not in it yet (the mode is
    persistent: set once, every later connection opens in it), and it is h3d's to change,
    empty or at a revision this h3d knows.

    The mode is written into the file's header: set on every connection, it changed a
    database h3d then refused (foreign tables, a newer revision) and promised to leave
    untouched, which then needed ``-wal``/``-shm`` files beside it, on any file system.
    migrate.py refuses such a store; it is read in the file's own mode meanwhile."""
    if cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return False
    tables = {r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    revs: set[str] = set()
    if "alembic_version" in tables:
        revs = {r[0] for r in cur.execute("SELECT version_num FROM alembic_version")}
    if not revs:  # empty (h3d creates it), or foreign
        return not tables - {"alembic_version"}
    return len(revs) == 1 and revs <= set(REVISIONS)


#: PostgreSQL: how long to wait for the server to answer a new connection (libpq's
#: ``connect_timeout``), and for one statement to finish (``statement_timeout``). A server
#: that accepts and never answers, or a statement stuck behind a lock, is then one error
#: (a 503, one line at start) within a bounded time, not a request, a start or an
#: ``h3d db`` command that hangs for good. Migrations lift the statement bound
#: (``migrate.migration_lock``): an ALTER of a large table may take longer.
PG_CONNECT_TIMEOUT_S = 10
PG_STATEMENT_TIMEOUT_S = 120.0
#: PostgreSQL's TCP keepalives and unacknowledged-data bound: a connection whose server
#: vanished (a lost host, a partition) fails within about a minute instead of the kernel's
#: retransmission limit (15 min and more).
_PG_TCP = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms
}


def _pg_connect_args(url: str) -> dict[str, Any]:
    """libpq's timeouts for a PostgreSQL URL whose driver is libpq's (psycopg, psycopg2);
    none for another driver, which takes other keywords. A value the URL sets wins."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql" or u.get_driver_name() not in ("psycopg", "psycopg2"):
        return {}
    args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **_PG_TCP}
    return {k: v for k, v in args.items() if k not in u.query}


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    busy_timeout_s: float = 30.0,
    immediate: bool = False,
) -> Engine:
    """An engine for ``url``; on SQLite: WAL, foreign keys, a busy timeout.

    ``immediate``: SQLite transactions start with BEGIN IMMEDIATE (the writer's engine), so
    what a transaction reads before it writes cannot change under it, even if another
    process writes to the same file.

    On another server (PostgreSQL): a pooled connection is tested before it is used
    (``pool_pre_ping``), so a server that dropped its connections (a restart, a failover,
    ``pg_terminate_backend``, an idle timeout) and is back costs no failed request; and the
    timeouts above bound a server that does not answer: ``busy_timeout_s`` is its lock
    timeout, as SQLite's busy timeout is its wait for the write lock.
    """
    is_sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": max_overflow}
    pg_args = {} if is_sqlite else _pg_connect_args(url)
    if not is_sqlite:
        kwargs["pool_pre_ping"] = True
    if pg_args:
        kwargs["connect_args"] = pg_args
    if is_sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
        if immediate:  # SQLAlchemy's recipe: the driver leaves BEGIN to us
            kwargs["connect_args"]["isolation_level"] = None
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs = {"connect_args": {"check_same_thread": False}}
    engine = create_engine(url, **kwargs)
    if pg_args:
        # SET, not the ``options`` connect argument: that would replace the URL's own
        # (``?options=-csearch_path%3Dh3``)
        statement_ms, lock_ms = int(PG_STATEMENT_TIMEOUT_S * 1000), int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _timeouts(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"SET statement_timeout = {statement_ms}")
            cur.execute(f"SET lock_timeout = {lock_ms}")
            cur.close()
            dbapi_conn.commit()

    if is_sqlite:
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # the run list's case-blind name filter (SQLite's lower() folds ASCII only)
            dbapi_conn.create_function("h3_fold", 1, _fold, deterministic=True)
            cur = dbapi_conn.cursor()
            if _may_switch_to_wal(cur):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        if immediate:

            @event.listens_for(engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Commit on success, roll back on any error; a database that is down is a 503."""
    session = factory()
    try:
        yield session
        session.commit()
    except OperationalError as exc:
        session.rollback()
        raise StorageUnavailable(f"the store is unavailable: {exc.orig}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@dataclass
class _Job:
    fn: Callable[[Session], Any]
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


class Store:
    """The daemon's database: ``read()`` sessions and ``write(fn)`` through one writer thread.

    ``write(fn)`` runs ``fn(session)`` in the writer thread and returns its result after the
    transaction commits (or raises what ``fn`` raised; nothing of it is stored). Jobs that
    arrive while a transaction runs are committed together in the next one; if one of a group
    fails, the group is rolled back and each job is re-run in its own transaction, so one bad
    request never takes another's data with it. ``fn`` must therefore be a pure function of
    the session (it may run twice) and must build any ORM-derived result inside.
    """

    def __init__(
        self,
        url: str,
        *,
        read_pool_size: int = 8,
        read_max_overflow: int = 24,
        busy_timeout_s: float = 30.0,
        max_group: int = 64,
    ) -> None:
        self.url = url
        self.engine = make_engine(
            url,
            pool_size=read_pool_size,
            max_overflow=read_max_overflow,
            busy_timeout_s=busy_timeout_s,
        )
        # The writer's own engine: its connection is never lent to a reader.
        self._write_engine = make_engine(
            url, pool_size=1, max_overflow=0, busy_timeout_s=busy_timeout_s, immediate=True
        )
        self.sessions = make_sessionmaker(self.engine)
        self._write_sessions = make_sessionmaker(self._write_engine)
        self.max_group = max_group
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Called when a read session opens: adds what is known but not stored yet (the
        # sampler's pending readings) to ``session.info`` so queries see up to now.
        self.overlay: Callable[[], dict[str, Any]] | None = None

    # --- reads ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session on a reader connection, released when the block ends (never commits)."""
        session = self.sessions()
        if self.overlay is not None:
            session.info.update(self.overlay())
        try:
            yield session
        except OperationalError as exc:
            raise StorageUnavailable(f"the store is unavailable: {exc.orig}") from exc
        finally:
            session.close()

    # --- writes --------------------------------------------------------------------------

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        """Queue ``fn`` for the writer; the future resolves after its transaction commits."""
        job = _Job(fn)
        with self._lock:
            if self._closed:
                raise StorageUnavailable("the daemon is shutting down; the store is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="h3d-writer", daemon=True)
                self._thread.start()
            self._queue.put(job)
        return job.future

    def write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in the writer's transaction and return its result once committed."""
        return self.submit(fn).result()

    async def write_async(self, fn: Callable[[Session], T]) -> T:
        """``write`` for the event loop: awaits the commit without holding a thread.

        Ingest routes use it, so a request costs no threadpool hops (two per sync route:
        the endpoint and FastAPI's response validation), and 64 concurrent writers are 64
        awaiting futures, not 40 blocked threads contending for the GIL.
        """
        return await asyncio.wrap_future(self.submit(fn))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs: list[_Job] = [first]
            stop = False
            while len(jobs) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if len(jobs) > 1:
            try:
                with session_scope(self._write_sessions) as s:
                    results = [j.fn(s) for j in jobs]
            except BaseException:  # noqa: BLE001 - re-run one by one to find whose it was
                pass
            else:
                for j, r in zip(jobs, results, strict=True):
                    j.future.set_result(r)
                return
        for j in jobs:
            try:
                with session_scope(self._write_sessions) as s:
                    r = j.fn(s)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                j.future.set_exception(exc)
            else:
                j.future.set_result(r)

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Finish the queued writes, stop the writer and close every connection."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join()
        self.engine.dispose()  # readers first: a checkpoint cannot pass an open reader
        if self._write_engine.dialect.name == "sqlite":
            # Fold the WAL into the database file now, so a clean stop leaves no WAL to
            # replay (nor one that could be lost separately from the file).
            try:  # on the driver connection: outside any transaction (BEGIN IMMEDIATE)
                raw = self._write_engine.raw_connection()
                try:
                    cur = raw.cursor()
                    cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    cur.close()
                finally:
                    raw.close()
            except Exception as exc:  # a full disk: the WAL stays; SQLite replays it later
                logger.warning("could not checkpoint the WAL at stop: %s", exc)
        self._write_engine.dispose()
