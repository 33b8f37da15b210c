"""A migration on SQLite is one transaction, its DDL included: one that fails leaves the store
as it was, so running it again works.

pysqlite begins a transaction only before a DML statement, so the CREATE TABLE that starts a
revision (and each one of a first creation) committed at once: a failed or killed upgrade left
its new table behind and every rerun failed on it ("table run_ranks already exists"), and a
first start on a full disk left tables without a revision, a store h3d then refused for good
as foreign.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import event, inspect
from sqlalchemy.exc import OperationalError

from h3d.errors import SchemaMismatch
from h3d.storage import migrate
from h3d.storage.engine import make_engine


def tables_and_revision(db: Path) -> tuple[list[str], list[str]]:
    with sqlite3.connect(db) as c:
        names = c.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        tables = [r[0] for r in names]
        revs = [r[0] for r in c.execute("SELECT version_num FROM alembic_version")]
    c.close()
    return tables, revs


def test_an_upgrade_that_fails_after_its_first_ddl_leaves_the_old_schema_and_runs_again(
    tmp_path: Path,
) -> None:
    db = tmp_path / "h3d.db"
    url = f"sqlite:///{db}"
    command.upgrade(migrate.alembic_config(url), "0003")
    with sqlite3.connect(db) as c:  # foreign keys off (SQLite's default): an orphan epoch
        c.execute(
            "INSERT INTO runs (id, name, status, created_at, config, n_batches, n_epochs,"
            " n_nonfinite) VALUES ('r1', 'ok', 'finished', 1e9, '{}', 0, 1, 0)"
        )
        c.execute("INSERT INTO epochs (run_id, epoch, t, metrics) VALUES ('gone', 0, 1e9, '{}')")
    c.close()
    before = tables_and_revision(db)
    assert before[1] == ["0003"] and "run_ranks" not in before[0]
    engine = make_engine(url)
    # 0004 creates run_ranks first; the check of every reference before the commit fails
    with pytest.raises(SchemaMismatch, match="it was rolled back and the database is as it was"):
        migrate.upgrade(engine)
    assert tables_and_revision(db) == before
    with sqlite3.connect(db) as c:  # what the message named, fixed
        c.execute("DELETE FROM epochs WHERE run_id = 'gone'")
    c.close()
    assert migrate.upgrade(engine) == ("0003", migrate.head_revision())
    engine.dispose()


def test_a_first_start_that_fails_while_creating_the_store_leaves_it_empty(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'h3d.db'}"
    small = make_engine(url)

    @event.listens_for(small, "connect")
    def _room_for_a_few_tables(dbapi_conn: Any, _record: Any) -> None:
        # SQLite's own "database or disk is full", after some of the tables were created
        dbapi_conn.execute("PRAGMA max_page_count=8")

    with pytest.raises(OperationalError, match="database or disk is full"):
        migrate.upgrade(small)
    small.dispose()
    engine = make_engine(url)
    assert inspect(engine).get_table_names() == []  # not refused as foreign below
    assert migrate.upgrade(engine) == (None, migrate.head_revision())
    engine.dispose()
