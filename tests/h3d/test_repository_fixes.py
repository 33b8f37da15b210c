"""Store fixes: a rank joining an ended run, a one-process run's rank, ambiguous-run candidates,
the run list's name filter on every store, heartbeats of several daemons.

Each test runs on a SQLite file and on the real PostgreSQL server (a database of its own).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from h3d.errors import AmbiguousRun, InvalidInput, RunFinished
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import make_engine, make_sessionmaker, session_scope
from h3d.storage.models import Run
from tests.conftest import Daemon
from tests.h3d.conftest import ADMIN_URL

RUN = "cd" * 16


@pytest.fixture
def store(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    migrate.upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def join(s: Session, rank: int, *, now: float, world_size: int = 2) -> repo.Run:
    return repo.create_run(
        s,
        name="ddp",
        config={},
        tags=[],
        pid=1000 + rank,
        host="h",
        n_train=None,
        now=now,
        run_id=RUN,
        node="a",
        rank=rank,
        world_size=world_size,
    )


def single(s: Session, *, run_id: str | None = None, name: str = "one", now: float = 50.0) -> Run:
    return repo.create_run(
        s,
        name=name,
        config={},
        tags=[],
        pid=1,
        host="h",
        n_train=None,
        now=now,
        run_id=run_id,
    )


# --- a rank joining a run that ended (api.md #1, dist.md #3) ---------------------------


@pytest.mark.parametrize("ended", ["finished", "failed"])
def test_a_new_rank_cannot_join_a_run_that_ended(store: sessionmaker[Session], ended: str) -> None:
    with session_scope(store) as s:
        join(s, 0, now=100.0)
    with session_scope(store) as s:
        repo.update_run(s, run_id=RUN, status=ended, name=None, tags=None, now=110.0)
    with session_scope(store) as s, pytest.raises(RunFinished, match="rank 1 cannot join"):
        join(s, 1, now=10.0)  # earlier: it would have moved the run's start back
    with session_scope(store) as s:
        run = repo.get_run(s, run_id=RUN)
        assert (run.status, run.created_at, run.finished_at) == (ended, 100.0, 110.0)
        assert [(r.rank, r.status) for r in repo.run_ranks(s, run_id=RUN)] == [(0, ended)]


def test_a_replayed_join_of_a_rank_of_an_ended_run_answers_with_the_run(
    store: sessionmaker[Session],
) -> None:
    with session_scope(store) as s:
        join(s, 0, now=100.0)
        join(s, 1, now=101.0)
    for rank in (0, 1):
        with session_scope(store) as s:
            repo.update_run(
                s, run_id=RUN, status="finished", name=None, tags=None, now=110.0, rank=rank
            )
    with session_scope(store) as s:
        run = join(s, 1, now=90.0)  # a rank's spool replayed after the job ended
        assert (run.id, run.status) == (RUN, "finished")
    with session_scope(store) as s:
        run = repo.get_run(s, run_id=RUN)
        assert (run.created_at, run.finished_at) == (100.0, 110.0)  # its window as it was
        assert [r.status for r in repo.run_ranks(s, run_id=RUN)] == ["finished", "finished"]


def test_ranks_still_join_a_running_run(store: sessionmaker[Session]) -> None:
    with session_scope(store) as s:
        join(s, 1, now=100.0)
    with session_scope(store) as s:
        join(s, 0, now=99.0)  # the run starts when its first rank does, as before
        join(s, 0, now=99.0)
    with session_scope(store) as s:
        assert repo.get_run(s, run_id=RUN).created_at == 99.0
        assert [r.rank for r in repo.run_ranks(s, run_id=RUN)] == [0, 1]


# --- a rank in a PATCH of a one-process run (api.md #12) -------------------------------


def test_a_one_process_run_is_not_finished_by_a_rank_it_does_not_have(
    store: sessionmaker[Session],
) -> None:
    with session_scope(store) as s:
        rid = single(s).id
    with session_scope(store) as s, pytest.raises(InvalidInput, match="rank 7 is not a rank"):
        repo.update_run(s, run_id=rid, status="finished", name=None, tags=None, now=60.0, rank=7)
    with session_scope(store) as s:
        assert repo.get_run(s, run_id=rid).status == "running"
    with session_scope(store) as s:  # its one process is rank 0
        repo.update_run(s, run_id=rid, status="finished", name=None, tags=None, now=60.0, rank=0)
    with session_scope(store) as s:
        assert repo.get_run(s, run_id=rid).status == "finished"


# --- ambiguous-run candidates (cli.md #8) -----------------------------------------------


def test_ambiguous_candidates_are_shown_to_where_they_differ(store: sessionmaker[Session]) -> None:
    ids = ["abcd" + "0" * 27 + "1", "abcd" + "0" * 27 + "2", "abcd" + "0" * 10 + "9" * 18]
    with session_scope(store) as s:
        for k, rid in enumerate(ids):
            single(s, run_id=rid, name="amb", now=50.0 + k)
    with session_scope(store) as s, pytest.raises(AmbiguousRun) as info:
        repo.resolve_run(s, ref="abcd")
    listing = info.value.message.split(": ", 1)[1].split(";")[0].split(", ")
    assert sorted(listing) == sorted(f"{rid} (amb)" for rid in ids)  # they differ at the end


def test_ids_that_differ_early_are_still_shown_by_12_characters() -> None:
    assert repo._distinct_width(["a" * 32, "b" * 32]) == 12
    assert repo._distinct_width(["x" * 12, "x" * 12 + "y"]) == 13  # one a prefix of another
    assert repo._distinct_width(["x" * 20 + "1", "x" * 20 + "2"]) == 21


# --- the run list's name filter (pg.md #1) ----------------------------------------------

NAMES = ["Straße run", "ÉCOLE run", "ΣΊΣΥΦΟΣ run", "plain run"]
QUERIES = {
    "strasse": ["Straße run"],
    "STRASSE": ["Straße run"],
    "straße": ["Straße run"],
    "école": ["ÉCOLE run"],
    "σίσυφος": ["ΣΊΣΥΦΟΣ run"],
    "ΣΊΣΥΦΟΣ": ["ΣΊΣΥΦΟΣ run"],
    "RUN": sorted(NAMES),
    "50%": [],
    "nothing": [],
}


@pytest.fixture
def pg_c_url() -> Iterator[str]:
    """A fresh PostgreSQL database whose LC_CTYPE is C (lower() folds ASCII only there)."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        conn = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL server answers at {ADMIN_URL}: {exc.orig}")
    name = f"h3test_c_{uuid.uuid4().hex[:12]}"
    conn.execute(
        text(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
            "LC_CTYPE 'C' LC_COLLATE 'C'"
        )
    )
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-C"])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    fixture = "pg_url" if request.param == "postgresql" else "pg_c_url"
    url: str = request.getfixturevalue(fixture)
    return url


def test_the_name_filter_folds_alike_on_every_store(any_store_url: str) -> None:
    engine = make_engine(any_store_url)
    migrate.upgrade(engine)
    store = make_sessionmaker(engine)
    try:
        with session_scope(store) as s:
            for k, name in enumerate(NAMES):
                single(s, name=name, now=50.0 + k)
            repo.update_run(
                s,
                run_id=repo.resolve_run(s, ref="plain run").id,
                status="finished",
                name=None,
                tags=None,
                now=60.0,
            )
        with session_scope(store) as s:
            for query, expected in QUERIES.items():
                runs, count, _ = repo.list_runs(s, name=query)
                assert (sorted(r.name for r in runs), count) == (expected, len(expected)), query
            runs, count, _ = repo.list_runs(s, name="run", status="running")
            assert count == 3 and "plain run" not in {r.name for r in runs}
            page, count, cursor = repo.list_runs(s, name="RUN", limit=2)
            rest, _, end = repo.list_runs(s, name="RUN", limit=2, cursor=cursor)
            assert count == 4 and end is None
            assert [r.name for r in page + rest] == NAMES[::-1]  # newest first
    finally:
        engine.dispose()


# --- heartbeats of several daemons (pg.md #4) -------------------------------------------


def test_heartbeats_of_two_daemons_do_not_deadlock(pg_url: str) -> None:
    """Another daemon's transaction holds run A's row, this one's heartbeats name B then A
    (the order it served them), then the other updates B. Written in that order, this one
    held B while waiting for A: a deadlock, one of the two aborted."""
    a, b = "a" * 32, "b" * 32
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    store = make_sessionmaker(engine)
    try:
        with session_scope(store) as s:
            for rid in (a, b):
                single(s, run_id=rid)
        runs = Run.__table__
        errors: list[BaseException] = []
        with engine.connect() as other, engine.connect() as watch:
            other.execute(text("SET deadlock_timeout = '100ms'"))
            other.execute(update(runs).where(runs.c.id == a).values(seen_at=1.0))  # holds A

            def heartbeats() -> None:
                try:
                    with session_scope(store) as s:
                        s.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
                        repo.write_heartbeats(s, {b: 5.0, a: 5.0})
                except BaseException as exc:  # noqa: BLE001 (reported by the test)
                    errors.append(exc)

            writer = threading.Thread(target=heartbeats)
            writer.start()
            try:
                waiting = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                deadline = time.monotonic() + 30
                while not watch.execute(text(waiting)).scalar():  # until it waits for A
                    assert time.monotonic() < deadline, "the heartbeats never waited for A"
                    watch.rollback()
                    time.sleep(0.01)
                other.execute(update(runs).where(runs.c.id == b).values(seen_at=1.0))
                other.commit()
            finally:
                writer.join(timeout=30)
        assert errors == []
        with session_scope(store) as s:
            assert set(s.scalars(select(Run.seen_at))) == {5.0}
    finally:
        engine.dispose()


def test_heartbeats_are_written_in_the_order_of_the_run_ids(
    store: sessionmaker[Session],
) -> None:
    ids = ["f" * 32, "0" * 32, "7" * 32]
    with session_scope(store) as s:
        for rid in ids:
            single(s, run_id=rid)
    seen: list[str] = []
    engine = store.kw["bind"]

    def record(
        conn: object, cursor: object, stmt: str, params: object, ctx: Any, *a: object
    ) -> None:
        if stmt.lstrip().upper().startswith("UPDATE RUNS"):
            seen.extend(p["rid"] for p in ctx.compiled_parameters)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with session_scope(store) as s:
            repo.write_heartbeats(s, dict.fromkeys(ids, 9.0))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert seen == sorted(ids)


# --- through the API ----------------------------------------------------------------------


def test_the_api_refuses_a_late_rank_and_a_foreign_rank(
    daemon_factory: Callable[..., Daemon], store_url: str
) -> None:
    d = daemon_factory(H3D_DB_URL=store_url) if "postgresql" in store_url else daemon_factory()
    run = uuid.uuid4().hex
    with d.client() as c:
        body = {"id": run, "rank": 0, "world_size": 2, "name": "dist"}
        assert c.post("/v1/runs", json=body).status_code == 201
        assert c.patch(f"/v1/runs/{run}", json={"status": "finished"}).status_code == 200
        before = c.get(f"/v1/runs/{run}").json()
        late = c.post("/v1/runs", json={**body, "rank": 1, "created_at": time.time() - 3600})
        assert late.status_code == 409, late.text
        assert late.json()["error"]["code"] == "run_finished"
        assert c.get(f"/v1/runs/{run}").json() == before
        assert c.post("/v1/runs", json=body).status_code == 201  # rank 0's replayed join

        one = c.post("/v1/runs", json={"name": "Straße single"}).json()["id"]
        r = c.patch(f"/v1/runs/{one}", json={"status": "finished", "rank": 7})
        assert r.status_code == 422, r.text
        assert c.get(f"/v1/runs/{one}").json()["status"] == "running"
        listed = c.get("/v1/runs", params={"name": "STRASSE"}).json()
        assert [x["id"] for x in listed["data"]] == [one]
