"""Migrations and the store's refusal to touch a database it does not understand."""

from __future__ import annotations

import functools
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session

from h3d.errors import RunFinished, SchemaMismatch, StorageUnavailable
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, make_engine, make_sessionmaker, session_scope
from h3d.storage.models import Base
from tests.conftest import REPO, daemon_env
from tests.h3d.conftest import damaged_in_the_middle, filled_store


def migrate_with_alembic(engine: Engine) -> None:
    """Every migration script from an empty database (h3d itself creates an empty store at
    head from the ORM, and runs the scripts only on a store an older h3d wrote)."""
    with engine.begin() as conn:
        cfg = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def test_revision_constants_match_the_migration_scripts() -> None:
    # A new migration adds its id to migrate.REVISIONS: a start compares the store's revision
    # with HEAD_REVISION without reading the scripts.
    assert list(migrate.REVISIONS) == migrate.script_revisions(), (
        "HOW TO FIX: append the new revision's id to REVISIONS in h3d/storage/migrate.py"
    )
    assert migrate.head_revision() == migrate.HEAD_REVISION == migrate.script_revisions()[-1]


def test_migrated_schema_matches_the_orm(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate_with_alembic(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], (
        "The ORM models and the migrations differ. HOW TO FIX: add a revision with\n"
        "  alembic -c <cfg> revision --autogenerate -m '...'  (see h3d/storage/migrate.py)\n"
        f"review it, and append its id to migrate.REVISIONS. Differences: {diff}"
    )
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    head = migrate.head_revision()
    assert migrate.upgrade(engine) == (head, head)  # idempotent
    engine.dispose()


def schema(engine: Engine) -> dict[str, Any]:
    """Everything the database says about its tables (column order aside: a batch migration
    on SQLite appends the columns it adds)."""
    ins = inspect(engine)
    out: dict[str, Any] = {}
    for t in sorted(ins.get_table_names()):

        def key(d: dict[str, Any]) -> str:
            return repr(sorted(d.items()))

        cols = {
            c["name"]: (str(c["type"]), c["nullable"], c.get("default"), c.get("autoincrement"))
            for c in ins.get_columns(t)
        }
        out[t] = {
            "columns": cols,
            "pk": ins.get_pk_constraint(t),
            "fks": sorted(ins.get_foreign_keys(t), key=key),
            "indexes": sorted(ins.get_indexes(t), key=key),
            "unique": sorted(ins.get_unique_constraints(t), key=key),
            "checks": sorted(ins.get_check_constraints(t), key=key),
        }
    return out


def assert_created_equals_migrated(created: Engine, migrated: Engine) -> None:
    migrate_with_alembic(migrated)
    assert migrate.upgrade(created) == (None, migrate.head_revision())
    assert migrate.current_revision(created) == migrate.current_revision(migrated)
    a, b = schema(created), schema(migrated)
    assert a.keys() == b.keys()
    for table in a:
        assert a[table] == b[table], table


def test_an_empty_store_is_created_at_head_as_the_migrations_would_make_it(
    tmp_path: Path,
) -> None:
    created = make_engine(f"sqlite:///{tmp_path / 'created.db'}")
    migrated = make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    assert_created_equals_migrated(created, migrated)
    assert set(schema(created)) == {"alembic_version", *Base.metadata.tables}
    created.dispose()
    migrated.dispose()


def test_an_empty_postgresql_store_is_created_as_the_migrations_would_make_it(
    pg_url: str,
) -> None:
    from sqlalchemy import create_engine

    created = make_engine(pg_url)
    with created.begin() as conn:
        conn.execute(text("CREATE SCHEMA migrated"))
    migrated = create_engine(pg_url, connect_args={"options": "-csearch_path=migrated"})
    assert_created_equals_migrated(created, migrated)
    created.dispose()
    migrated.dispose()


def test_a_start_on_a_store_at_head_or_an_empty_one_never_imports_alembic(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from h3d.storage import migrate\n"
        "from h3d.storage.engine import make_engine\n"
        f"e = make_engine('sqlite:///{tmp_path / 'h.db'}')\n"
        "for _ in range(2):  # created, then found at head\n"
        "    migrate.check_integrity(e); migrate.upgrade(e); migrate.verify_schema(e)\n"
        "    migrate.probe_write(e)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "[]", r.stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def test_a_store_recording_two_revisions_is_refused(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO alembic_version VALUES ('0003')"))
    with pytest.raises(SchemaMismatch, match="several revisions"):
        migrate.upgrade(engine)
    engine.dispose()


def test_downgrade_then_upgrade_round_trips(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    command.downgrade(migrate.alembic_config(url), "base")
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def _one_row_in_every_table(url: str) -> dict[str, int]:
    """One row in each table of the store at ``url`` (its schema read from the store, so the
    same code fills a store at any revision); the row counts."""
    from sqlalchemy import JSON, Float, Integer, LargeBinary, MetaData, create_engine

    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    ids = {"runs": "r" * 32, "devices": 1}
    with engine.begin() as conn:
        for table in meta.sorted_tables:  # referenced tables first
            if table.name == "alembic_version":
                continue
            row: dict[str, Any] = {}
            for col in table.columns:
                fk = next(iter(col.foreign_keys), None)
                if fk is not None:
                    row[col.name] = ids[fk.column.table.name]
                elif table.name in ids and col.primary_key:
                    row[col.name] = ids[table.name]
                elif isinstance(col.type, Integer):
                    row[col.name] = 1
                elif isinstance(col.type, Float):
                    row[col.name] = 1.5
                elif isinstance(col.type, JSON):
                    row[col.name] = {}
                elif isinstance(col.type, LargeBinary):
                    row[col.name] = b"\x00\x00\x80?"
                else:
                    row[col.name] = "x"
            conn.execute(table.insert().values(**row))
        counts = {
            t.name: conn.execute(text(f"SELECT count(*) FROM {t.name}")).scalar_one()
            for t in meta.sorted_tables
        }
    engine.dispose()
    return counts


@pytest.mark.parametrize("old", migrate.REVISIONS[:-1])
def test_an_upgrade_keeps_every_row_of_every_table(store_url: str, old: str) -> None:
    """A store an older h3d wrote, with a row in every table, upgraded as ``h3d serve`` does
    it, on SQLite and PostgreSQL. SQLite alters a table by copying and dropping it, and with
    foreign keys on the drop of ``devices`` (0004) cascaded into ``power_samples``: every
    stored power sample, and so every old run's energy, was lost. On PostgreSQL, 0007 widens
    the integers in place."""
    command.upgrade(migrate.alembic_config(store_url), old)
    before = _one_row_in_every_table(store_url)
    assert set(before) >= {"runs", "batches", "devices", "power_samples", "sample_losses"}
    engine = make_engine(store_url)
    assert migrate.upgrade(engine) == (old, migrate.head_revision())
    with engine.connect() as conn:
        after = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in before}
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1  # on again
        else:
            seq = inspect(conn).get_columns("batches")
            assert {c["name"]: str(c["type"]) for c in seq}["seq"] == "BIGINT"
    engine.dispose()
    assert after == before


def test_an_upgrade_repairs_the_lone_surrogates_an_older_daemon_stored(
    tmp_path: Path, daemon_factory: Callable[..., Any]
) -> None:
    """Before the API refused them, a SQLite store took a config (and a metric name) holding
    a lone surrogate, and from then on every run list was a 500. 0008 replaces each with
    U+FFFD; the rest of the row, and a valid pair (an emoji), are kept."""
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'h3d.db'}"
    command.upgrade(migrate.alembic_config(url), "0007_bigint_counts")
    rid = "a" * 32
    with sqlite3.connect(data_dir / "h3d.db") as c:
        # as SQLAlchemy's JSON wrote it: json.dumps text, with ASCII escapes
        config = '{"lr": 0.1, "note": "bad\\ud800 x", "k\\udc00": ["\\ud83d\\ude00"]}'
        c.execute(
            "INSERT INTO runs (id, name, status, created_at, finished_at, config, n_batches,"
            " n_epochs, n_nonfinite) VALUES (?, 'old run', 'finished', ?, ?, ?, 0, 1, 0)",
            (rid, time.time() - 60, time.time() - 30, config),
        )
        c.execute(
            "INSERT INTO epochs (run_id, epoch, t, metrics) VALUES (?, 0, ?, ?)",
            (rid, time.time() - 40, '{"acc\\udfff": 0.5}'),
        )
    daemon = daemon_factory("old")  # upgrades the store at start, as `h3d serve` does
    with daemon.client() as api:
        listed = api.get("/v1/runs")
        assert listed.status_code == 200, listed.text
        got = api.get(f"/v1/runs/{rid}").json()
        assert got["config"] == {"lr": 0.1, "note": "bad\ufffd x", "k\ufffd": ["\U0001f600"]}
        for path in ("report",):  # the answer that holds the epoch
            r = api.get(f"/v1/runs/{rid}/{path}")
            assert r.status_code == 200, (path, r.text)
            assert "acc\ufffd" in r.text or "acc\\ufffd" in r.text, (path, r.text)
    assert migrate.current_revision(make_engine(url)) == migrate.head_revision()


def test_newer_revision_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    with pytest.raises(SchemaMismatch, match="newer h3d"):
        migrate.upgrade(engine)
    with pytest.raises(SchemaMismatch, match="newer h3d"):
        migrate.verify_schema(engine)
    assert migrate.current_revision(engine) == "f00dcafe"
    engine.dispose()


def test_old_database_needs_upgrade_when_auto_migrate_is_off(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    with pytest.raises(SchemaMismatch, match="h3d db upgrade"):
        migrate.verify_schema(engine)
    engine.dispose()


def test_foreign_and_corrupt_databases_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE precious (x)")
        c.execute("INSERT INTO precious VALUES (42)")
    engine = make_engine(f"sqlite:///{foreign}")
    with pytest.raises(SchemaMismatch, match="no h3d revision"):
        migrate.upgrade(engine)
    engine.dispose()
    with sqlite3.connect(foreign) as c:
        assert c.execute("SELECT x FROM precious").fetchall() == [(42,)]
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not sqlite" * 100)
    engine = make_engine(f"sqlite:///{corrupt}")
    with pytest.raises(SchemaMismatch, match="not a readable database"):
        migrate.upgrade(engine)
    engine.dispose()
    assert corrupt.read_bytes() == b"this is not sqlite" * 100


def serve_once(data: Path) -> subprocess.CompletedProcess[str]:
    """``h3d serve`` on ``data`` as a user would start it (these stores make it exit)."""
    return subprocess.run(
        [sys.executable, "-m", "h3d", "serve", "--port", "0"],
        env=daemon_env(data),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_postgresql_server_that_does_not_answer_is_not_called_an_unreadable_database() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    with pytest.raises(StorageUnavailable, match="cannot reach the database") as got:
        migrate.upgrade(engine)
    engine.dispose()
    assert "\n" not in str(got.value) and "Move it aside" not in str(got.value)


def test_serve_refuses_a_corrupt_database_with_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "h3d.db").write_bytes(b"garbage" * 1000)
    r = serve_once(data)
    assert r.returncode == 2
    assert "not a readable database" in r.stderr and "untouched" in r.stderr
    assert (data / "h3d.db").read_bytes() == b"garbage" * 1000


def test_serve_leaves_a_foreign_or_newer_database_byte_for_byte_untouched(tmp_path: Path) -> None:
    """Every connection switched the file to WAL before the check refused it: the header
    of a database h3d "will not write into" changed, and it needed -wal/-shm files."""
    foreign = tmp_path / "foreign" / "h3d.db"
    foreign.parent.mkdir()
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE customers (id)")
        c.execute("INSERT INTO customers VALUES (1)")
    newer = tmp_path / "newer" / "h3d.db"
    newer.parent.mkdir()
    engine = make_engine(f"sqlite:///{newer}")
    migrate.upgrade(engine)
    engine.dispose()
    c = sqlite3.connect(newer)
    with c:
        c.execute("UPDATE alembic_version SET version_num = 'f00dcafe'")
    # as a newer h3d might leave it, or another program
    assert c.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    c.close()
    for db, why in ((foreign, "no h3d revision"), (newer, "newer h3d")):
        before = db.read_bytes()
        r = serve_once(db.parent)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert db.read_bytes() == before, db
        assert not [p.name for p in db.parent.glob("h3d.db-*")]  # no -wal, -shm, -journal
    fresh = tmp_path / "fresh.db"  # h3d's own store is still put in WAL mode
    engine = make_engine(f"sqlite:///{fresh}")
    migrate.upgrade(engine)
    engine.dispose()
    with sqlite3.connect(fresh) as c:
        assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_per_sample_losses_are_compact_blobs(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    factory = make_sessionmaker(engine)
    with session_scope(factory) as s:
        run = repo.create_run(
            s, name=None, config={}, tags=[], pid=None, host=None, n_train=None, now=time.time()
        )
        rows = [
            repo.BatchRow(
                seq=0,
                t=1.0,
                loss=0.5,
                n=3,
                epoch=0,
                step=0,
                phase=None,
                losses=[0.25, None, 1.5],
                indices=[7, 8, 2**40],
            )
        ]
        run_id = run.id
        assert repo.add_batches(s, run_id=run_id, batches=rows) == (1, 0)
    with session_scope(factory) as s:
        losses, idx = repo.sample_losses(s, run_id=run_id, seq=0)
        raw = s.execute(text("SELECT length(losses), length(indices) FROM sample_losses")).one()
    assert losses[0] == 0.25 and losses[2] == 1.5 and losses[1] != losses[1]  # NaN = missing
    assert idx == [7, 8, 2**40]
    assert tuple(raw) == (12, 24)  # 3 float32 + 3 int64: no row per sample
    engine.dispose()


def test_a_damaged_store_is_refused_in_one_line_and_left_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "h3d.db"
    filled_store(db)
    assert db.stat().st_size > 256 * 1024
    damaged = damaged_in_the_middle(db)
    r = serve_once(data)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is damaged" in lines[0] and ".recover" in lines[0], r.stderr
    assert db.read_bytes() == damaged


def _new_run(s: Session, *, now: float) -> str:
    kw: dict[str, Any] = {"config": {}, "tags": [], "pid": None, "host": None}
    return repo.create_run(s, name=None, n_train=None, now=now, **kw).id


def _batches(
    run_id: str, seqs: list[int], nonfinite: int | None = None, *, now: float
) -> Callable[[Session], tuple[int, int]]:
    rows = [
        repo.BatchRow(
            seq=q,
            t=now + q,
            loss=None if q == nonfinite else 1.0 / (q + 1),
            n=2,
            epoch=0,
            step=q,
            phase="warmup",
            # packed (from the wire) for even seqs, lists for odd ones
            losses=array("f", [q, -q]).tobytes() if q % 2 == 0 else [float(q), None],
            indices=array("q", [q, 2**40]).tobytes() if q % 2 == 0 else [q, 2**40],
        )
        for q in seqs
    ]
    return lambda s: repo.add_batches(s, run_id=run_id, batches=rows)


def test_a_group_commit_of_overlapping_ingests_stores_and_counts_each_row_once(
    store_url: str,
) -> None:
    """The writer's driver-SQL ingest, on SQLite and on PostgreSQL. Jobs committed in one
    transaction overlap each other, an earlier commit and themselves; one job of the group
    fails, so the group is rolled back and re-run job by job. Each row is stored once, and
    the counters equal what was stored."""
    store = Store(store_url)
    migrate.upgrade(store.engine)
    now = time.time()

    new_run = functools.partial(_new_run, now=now)
    run_id, done_id = store.write(new_run), store.write(new_run)
    store.write(
        lambda s: repo.update_run(
            s, run_id=done_id, status="finished", name=None, tags=None, now=now
        )
    )
    batches = functools.partial(_batches, now=now)

    assert store.write(batches(run_id, list(range(10)))) == (10, 0)
    gate = threading.Event()
    blocker = store.submit(lambda s: gate.wait(10))  # the next jobs queue up behind it
    group = [
        store.submit(batches(run_id, [*range(5, 15), 12])),  # 5-9 stored, 12 twice
        store.submit(batches(run_id, list(range(10, 20)), nonfinite=15)),  # 10-14: the job above
        store.submit(batches(done_id, [0])),  # a finished run: this job fails
        store.submit(
            lambda s: repo.add_epochs(
                s,
                run_id=run_id,
                epochs=[
                    {
                        "epoch": e,
                        "t": now + e,
                        "phase": None,
                        "accuracy": 0.5,
                        "loss": 1.0,
                        "val_loss": None,
                        "metrics": {"f1": 0.25 * e},
                    }
                    for e in (0, 1, 1)
                ],
            )
        ),
    ]
    gate.set()
    assert blocker.result(10) is True
    assert group[0].result(10) == (5, 6)
    assert group[1].result(10) == (5, 5)
    with pytest.raises(RunFinished):
        group[2].result(10)
    assert group[3].result(10) == (2, 1)
    with store.read() as s:
        run = repo.get_run(s, run_id=run_id)
        assert (run.n_batches, run.n_nonfinite, run.n_epochs) == (20, 1, 2)
        assert (run.last_seq, run.last_t) == (19, now + 19)
        stored = s.execute(text("SELECT seq FROM batches WHERE run_id = :r"), {"r": run_id})
        assert sorted(stored.scalars()) == list(range(20))
        assert [repo.sample_losses(s, run_id=run_id, seq=q)[1] for q in (4, 5)] == [
            [4, 2**40],
            [5, 2**40],
        ]
        odd = repo.sample_losses(s, run_id=run_id, seq=5)[0]
        assert odd[0] == 5.0 and math.isnan(odd[1])
        page = repo.sample_loss_page(s, run_id=run_id, after_seq=3, limit=3)  # the export's
        assert [(q, e, i) for q, e, _l, i in page] == [(q, 0, [q, 2**40]) for q in (4, 5, 6)]
        assert page[0][2] == [4.0, -4.0] and math.isnan(page[1][2][1])
        assert [e.metrics for e in repo.epochs(s, run_id=run_id)] == [{"f1": 0.0}, {"f1": 0.25}]
        assert repo.get_run(s, run_id=done_id).n_batches == 0
    store.close()


def test_two_daemons_on_one_postgresql_store_count_overlapping_ingests_once(
    pg_url: str,
) -> None:
    """Two writers (two daemons' stores) ingest overlapping batches into one run at once:
    the run's row lock orders them, so each row is counted by exactly one of them."""
    a, b = Store(pg_url), Store(pg_url)
    migrate.upgrade(a.engine)
    now = time.time()
    run_id = a.write(functools.partial(_new_run, now=now))
    futures = []
    for k in range(30):
        job = _batches(run_id, list(range(5 * k, 5 * k + 10)), now=now)  # half the next's
        futures += [a.submit(job), b.submit(job)]
    accepted = sum(f.result(60)[0] for f in futures)
    with a.read() as s:
        stored = s.scalar(text("SELECT count(*) FROM batches WHERE run_id = :r"), {"r": run_id})
        assert accepted == stored == repo.get_run(s, run_id=run_id).n_batches == 155
    a.close()
    b.close()


def test_driver_inserts_bind_each_value_to_its_column_in_any_order(store_url: str) -> None:
    """The compiled INSERT may bind columns in another order than the caller lists them
    (table order): values still land in their own columns, on SQLite and PostgreSQL."""
    from h3d.storage.models import Batch

    store = Store(store_url)
    migrate.upgrade(store.engine)
    run_id = store.write(functools.partial(_new_run, now=time.time()))
    cols = ("phase", "seq", "loss", "t", "run_id", "n", "epoch", "step", "rank")
    store.write(
        lambda s: repo._fast_insert(s, Batch, cols, [("x", 3, 0.25, 1.5, run_id, 2, 0, 7, 1)])
    )
    with store.read() as s:
        (b,) = repo.batch_page(s, run_id=run_id, after_seq=-1, limit=10)
        assert (b.seq, b.t, b.loss, b.n, b.epoch, b.step, b.phase, b.rank) == (
            3,
            1.5,
            0.25,
            2,
            0,
            7,
            "x",
            1,
        )
    store.close()


def test_a_node_lease_is_taken_from_a_holder_seen_exited_or_lapsed_never_from_a_live_one(
    store_url: str,
) -> None:
    """Whether the holder of a node's lease lives: where this process can see it (same
    boot and pid namespace), by its process; elsewhere (another host or container) only by
    its renewals: a daemon waits, and is refused if the holder renews, or takes the node
    once the lease lapses. Host and pid alone were wrong both ways across containers."""
    from h3d.errors import NodeTaken
    from h3d.reaper import NodeLease, proc_identity

    store = Store(store_url)
    migrate.upgrade(store.engine)
    me = proc_identity()
    assert me is not None  # Linux
    here_ns = me.rsplit("/", 1)[0]
    clock = [1000.0]

    def lease(host: str, pid: int, proc: str | None) -> NodeLease:
        return NodeLease(
            store, "n", lease_s=30, clock=lambda: clock[0], host=host, pid=pid, proc=proc
        )

    def sleeping(renew: NodeLease | None) -> Callable[[float], None]:
        def sleep(dt: float) -> None:
            clock[0] += dt
            if renew is not None and clock[0] % 5 < dt:  # its reaper's pass, every 5 s
                renew.renew()

        return sleep

    # another container (another pid namespace) that renews: alive, refused after waiting
    there = lease("h", 1, "boot/4026000001/77")
    there.claim()
    clock[0] += 1
    with pytest.raises(NodeTaken, match="pid 1 on h"):
        lease("h", 1, me).claim(sleep=sleeping(there))
    assert 1000 < clock[0] <= 1006  # refused at its first renewal, not after 30 s
    # the same container gone (a crash; its successor is pid 1 again): waits for the lapse
    start = clock[0]
    successor = lease("h", 1, me)
    successor.claim(sleep=sleeping(None))
    assert 29 <= clock[0] - start <= 31
    assert not there._lost
    there.renew()
    assert there._lost  # it logs, once, that two daemons now sample as one node
    # a holder this process can see: alive (this very process) is refused at once ...
    successor.release()
    lease("h", os.getpid(), me).claim()
    start = clock[0]
    with pytest.raises(NodeTaken):
        lease("h", 2, me).claim(sleep=sleeping(None))
    assert clock[0] == start
    # ... and one whose process is gone (a pid no process has) is taken at once
    store.write(lambda s: s.execute(text("DELETE FROM node_leases")))
    lease("h", 2**22 + 7, f"{here_ns}/12345").claim()
    start = clock[0]
    lease("h", 3, me).claim(sleep=sleeping(None))
    assert clock[0] == start
    with store.read() as s:
        assert s.scalar(text("SELECT pid FROM node_leases")) == 3
    store.close()
