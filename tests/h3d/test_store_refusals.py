"""A store h3d cannot use is refused at start in one line that names why: a table missing
from a store at head, a full disk, a path longer than SQLite opens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from h3d.errors import SchemaMismatch, StorageUnavailable
from h3d.storage import migrate
from h3d.storage.engine import make_engine
from tests.conftest import daemon_env
from tests.h3d.test_cli import h3d, in_namespace


def test_a_store_at_head_without_a_table_h3d_needs_is_refused(store_url: str) -> None:
    # it was served: every request that touched the table was a 503 "the store is
    # unavailable", an outage a client retries for good, and `db upgrade` said "already at"
    engine = make_engine(store_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE run_idle"))
    for check in (migrate.upgrade, migrate.verify_schema):
        with pytest.raises(SchemaMismatch, match="has no table run_idle, which h3d needs"):
            check(engine)
    engine.dispose()


def test_db_upgrade_refuses_a_store_at_head_without_a_table_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    engine = make_engine(f"sqlite:///{data / 'h3d.db'}")
    migrate.upgrade(engine)
    with engine.connect() as conn:  # foreign keys off, as `sqlite3 h3d.db` has them
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("DROP TABLE batches")
        conn.commit()
    engine.dispose()
    r = h3d(data, "db", "upgrade")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("h3d: the database is at ") and "no table batches" in line


def test_db_upgrade_on_a_full_disk_says_the_disk_is_full(tmp_path: Path) -> None:
    # it called h3d's own new store "not a readable database ... Move it aside"
    data = tmp_path / "data"
    data.mkdir()
    script = (
        'mount -t tmpfs -o size=4m,mode=0700 tmpfs "$H3D_DATA_DIR" || exit 77\n'
        'dd if=/dev/zero of="$H3D_DATA_DIR/filler" bs=4k 2>/dev/null\n'
        '"$PY" -m h3d db upgrade\n'
    )
    (line,) = in_namespace(script, daemon_env(data), tmp_path).strip().splitlines()
    assert line.endswith(f"the disk holding {data} is full; free some space and start again")
    assert "not a readable database" not in line and "Move it aside" not in line


def path_of(size: int, under: Path) -> Path:
    """A store's path of ``size`` bytes under ``under``, its directories made (none over 200
    bytes, well within NAME_MAX)."""
    rest = size - len(os.fsencode(under / "h3d.db"))
    parts = []
    while rest > 0:
        part = min(200, rest - 1)
        parts.append("d" * part)
        rest -= part + 1
    where = under.joinpath(*parts)
    where.mkdir(parents=True)
    assert len(os.fsencode(where / "h3d.db")) == size
    return where / "h3d.db"


def test_a_store_path_longer_than_sqlite_opens_is_named_as_such(tmp_path: Path) -> None:
    # it was "not a readable database ... Move it aside", for a file that did not exist
    longest = make_engine(f"sqlite:///{path_of(migrate.SQLITE_MAX_PATH, tmp_path / 'a')}")
    assert migrate.upgrade(longest) == (None, migrate.head_revision())
    longest.dispose()
    too_long = path_of(migrate.SQLITE_MAX_PATH + 1, tmp_path / "b")
    engine = make_engine(f"sqlite:///{too_long}")
    for check in (migrate.check_integrity, migrate.upgrade):
        with pytest.raises(StorageUnavailable) as got:
            check(engine)
        assert f"the store's path is {migrate.SQLITE_MAX_PATH + 1} bytes long" in str(got.value)
        assert "Move it aside" not in str(got.value)
    engine.dispose()
    assert not too_long.exists()
