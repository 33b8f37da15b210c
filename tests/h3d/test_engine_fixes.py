"""The store's engines on PostgreSQL (dropped connections, a server that does not answer,
a store migrated under a running daemon) and the reaper's exit rule for a local rank."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from h3d.errors import StorageUnavailable
from h3d.power.sampler import PowerSampler
from h3d.reaper import Reaper
from h3d.storage import engine as engine_mod
from h3d.storage import migrate
from h3d.storage.engine import Store, make_engine
from tests.conftest import Daemon
from tests.h3d.conftest import ADMIN_URL


def _in_thread(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()``'s result or exception; fails the test if it has not returned in ``timeout_s``
    (the bug: it never does)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still waiting after {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    s = Store(pg_url)
    migrate.upgrade(s.engine)
    yield s
    s.close()


def _terminate_backends(url: str) -> int:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": url.rsplit("/", 1)[1]},
                ).scalar_one()
            )
    finally:
        admin.dispose()


def test_a_request_after_postgresql_dropped_the_connections_succeeds(store: Store) -> None:
    """A server restart (or pg_terminate_backend) closed every pooled connection: the next
    read and the next write run on fresh ones, not a 503 each."""
    with store.read() as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
    assert store.write(lambda s: s.execute(text("SELECT 2")).scalar()) == 2
    assert _terminate_backends(store.url) >= 2  # the reader's and the writer's
    with store.read() as s:
        assert s.execute(text("SELECT count(*) FROM runs")).scalar() == 0
    assert store.write(lambda s: s.execute(text("SELECT 3")).scalar()) == 3


def test_the_reaper_names_a_store_that_is_down_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = Store(f"postgresql+psycopg://postgres@127.0.0.1:{port}/h3d")
    sampler = PowerSampler([], down)
    reaper = Reaper(down, sampler, every_s=0.01)
    reaper.seen(uuid.uuid4().hex)  # a heartbeat to write: the write fails too
    caplog.set_level(logging.WARNING, logger="h3d.reaper")
    reaper.start()
    try:
        deadline = time.monotonic() + 20
        while not [r for r in caplog.records if r.name == "h3d.reaper"]:
            assert time.monotonic() < deadline, "the reaper never said the store is down"
            time.sleep(0.01)
    finally:
        reaper.stop()
        down.close()
    records = [r for r in caplog.records if r.name == "h3d.reaper"]
    for r in records:
        assert r.levelno == logging.WARNING and r.exc_info is None, r.getMessage()
        assert r.getMessage().startswith("reaping stale runs failed: the store is unavailable")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP listener that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


def test_a_server_that_never_answers_is_an_error_within_the_connect_timeout(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_mod, "PG_CONNECT_TIMEOUT_S", 1, raising=False)
    eng = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/h3d")

    def connect() -> None:
        with eng.connect():
            pass

    try:
        with pytest.raises(Exception, match="timeout"):
            _in_thread(connect, 8.0)
    finally:
        eng.dispose()


def _db_current(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``h3d db current`` against the store at ``url``, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "h3d", "db", "current", "--data-dir", str(data_dir)],
        env={"H3D_DB_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=40,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_h3d_db_current_on_a_server_that_never_answers_says_so_and_exits(
    silent_server: int, tmp_path: Path
) -> None:
    """The CLI's engine has the same bound: one line, exit 2 (libpq's default: forever)."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/h3d"
    try:
        done = _db_current(url, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("h3d db current still waits for a server that never answers")
    assert done.returncode == 2, done.stderr
    assert "cannot reach the database" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def reader_role(pg_url: str) -> Iterator[str]:
    """A login role on the server without the privilege to read h3d's tables; dropped after."""
    role = f"h3test_role_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    try:
        yield role
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_a_server_refusing_to_read_the_tables_is_named_not_called_a_damaged_file(
    pg_url: str, reader_role: str, tmp_path: Path
) -> None:
    """A PostgreSQL role without SELECT on h3d's tables: the server's refusal, said as such,
    not the SQLite advice ("not a readable database ... move it aside") nor a full disk
    looked for under a path made of the database's name. Exit 2, the store untouched."""
    owner = create_engine(pg_url)
    migrate.upgrade(owner)
    url = pg_url.replace("postgres@", f"{reader_role}@", 1)
    other = create_engine(url)
    try:
        with pytest.raises(StorageUnavailable, match="permission denied") as got:
            migrate.current_revision(other)
        assert "grant this role access" in str(got.value)
        assert "readable database" not in str(got.value) and "disk" not in str(got.value)
        done = _db_current(url, tmp_path)
        assert done.returncode == 2, done.stderr
        assert "refused to read h3d's tables" in done.stderr and "Traceback" not in done.stderr
        assert migrate.current_revision(owner) == migrate.head_revision()  # nothing changed
    finally:
        other.dispose()
        owner.dispose()


def test_a_statement_stuck_behind_a_lock_is_a_503_within_the_lock_timeout(pg_url: str) -> None:
    store = Store(pg_url, busy_timeout_s=0.5)
    migrate.upgrade(store.engine)
    other = create_engine(pg_url)
    try:
        with store.read() as s:
            settings = s.execute(text("SHOW statement_timeout")).scalar()
            assert settings not in ("0", None)  # bounded (engine.PG_STATEMENT_TIMEOUT_S)
        with other.begin() as conn:
            conn.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))

            def read() -> None:
                with store.read() as s:
                    s.execute(text("SELECT count(*) FROM runs")).scalar()

            with pytest.raises(StorageUnavailable, match="lock timeout"):
                _in_thread(read, 8.0)
            with pytest.raises(StorageUnavailable, match="lock timeout"):
                _in_thread(lambda: store.write(lambda s: s.execute(text("DELETE FROM runs"))), 8.0)
    finally:
        other.dispose()
        store.close()


def test_a_migration_is_not_bounded_by_the_statement_timeout(store: Store) -> None:
    with migrate.migration_lock(store.engine) as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"
    with store.read() as s:  # the pooled connection keeps its bounds afterwards
        assert s.execute(text("SHOW statement_timeout")).scalar() != "0"


def test_the_timeouts_keep_the_urls_own_options(pg_url: str) -> None:
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE SCHEMA h3"))
    admin.dispose()
    store = Store(f"{pg_url}?options=-csearch_path%3Dh3")
    try:
        migrate.upgrade(store.engine)
        with store.read() as s:
            assert s.execute(text("SHOW search_path")).scalar() == "h3"
            assert s.execute(text("SELECT to_regclass('h3.runs')")).scalar() is not None
    finally:
        store.close()


def test_a_daemon_whose_store_another_h3d_migrated_says_so_once(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One node of a cluster was upgraded first: the others' daemons, still running the
    older h3d, name the store's new revision in one line instead of failing requests as a
    bug."""
    store = Store(store_url)
    migrate.upgrade(store.engine)
    reaper = Reaper(store, PowerSampler([], store))
    caplog.set_level(logging.WARNING, logger="h3d.reaper")
    try:
        reaper.reap()
        assert not caplog.records
        store.write(lambda s: s.execute(text("UPDATE alembic_version SET version_num = '0099_x'")))
        reaper.reap()
        reaper.reap()
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(lines) == 1, lines
        assert "now at revision 0099_x" in lines[0] and migrate.HEAD_REVISION in lines[0]
        assert "Stop this daemon" in lines[0]
    finally:
        store.close()


def _process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_rank_whose_process_exited_fails_and_the_run_with_it(
    daemon_factory: Callable[..., Daemon], sig: int
) -> None:
    """torchrun SIGTERMs the surviving ranks after one failed: the survivor never sends its
    "failed". The daemon followed its pid: the rank fails after the exit grace, and the run
    with it, not an hour later (H3D_RUN_TIMEOUT_S)."""
    d = daemon_factory(
        "ranks",
        H3D_RUN_EXIT_GRACE_S="0.3",
        H3D_RUN_REAP_EVERY_S="0.05",
        H3D_RUN_TIMEOUT_S="3600",
    )
    rid, host = uuid.uuid4().hex, socket.gethostname()
    procs = [_process(), _process()]
    try:
        with d.client() as c:
            for rank, p in enumerate(procs):
                body = {"id": rid, "name": "ddp", "pid": p.pid, "host": host}
                r = c.post("/v1/runs", json=body | {"rank": rank, "world_size": 2})
                assert r.status_code in (200, 201), r.text
            r = c.patch(f"/v1/runs/{rid}", json={"status": "failed", "rank": 1})
            assert r.status_code == 200, r.text
            procs[1].kill()
            assert c.get(f"/v1/runs/{rid}").json()["status"] == "running"  # rank 0 runs
            procs[0].send_signal(sig)
            procs[0].wait()
            deadline = time.monotonic() + 20
            while (run := c.get(f"/v1/runs/{rid}").json())["status"] == "running":
                assert time.monotonic() < deadline, "the run of the exited rank still runs"
                time.sleep(0.05)
            assert run["status"] == "failed"
        db = create_engine(f"sqlite:///{d.data_dir / 'h3d.db'}")
        with db.connect() as conn:
            q = text("SELECT rank, status FROM run_ranks WHERE run_id = :rid")
            assert dict(conn.execute(q, {"rid": rid}).all()) == {0: "failed", 1: "failed"}
        db.dispose()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "rank 0 of run" in d.log.read_text()


def test_a_rank_whose_process_runs_is_not_failed(daemon_factory: Callable[..., Daemon]) -> None:
    """The rule is about exited processes only: a live rank stays running past the grace."""
    d = daemon_factory("live", H3D_RUN_EXIT_GRACE_S="0.1", H3D_RUN_REAP_EVERY_S="0.05")
    rid, host = uuid.uuid4().hex, socket.gethostname()
    p = _process()
    try:
        with d.client() as c:
            body = {"id": rid, "name": "ddp", "pid": p.pid, "host": host}
            r = c.post("/v1/runs", json=body | {"rank": 0, "world_size": 1})
            assert r.status_code == 201, r.text
            # a request after many reaper passes: the run took it (a failed run is a 409)
            time.sleep(0.5)
            got = c.post(
                f"/v1/runs/{rid}/batches",
                json={"batches": [{"seq": 0, "t": time.time(), "loss": 1.0, "rank": 0}]},
            )
            assert got.status_code == 200, got.text
            assert c.get(f"/v1/runs/{rid}").json()["status"] == "running"
    finally:
        p.kill()
        p.wait()
