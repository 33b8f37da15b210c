"""A clean stop lets the next start skip ``PRAGMA quick_check``, which reads the whole store
(2.3-2.9 s for a 0.9 GB store here, against 0.5 s for a fresh one): only while the file is
exactly what that stop left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from h3d.datadir import CLEAN_STOP
from h3d.errors import SchemaMismatch
from h3d.storage import migrate
from h3d.storage.engine import make_engine
from tests.conftest import REPO, Daemon, daemon_env
from tests.h3d.conftest import damaged_in_the_middle, filled_store

SKIPPED = "quick_check skipped"


def test_a_daemons_clean_stop_lets_its_next_start_skip_the_check_once(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(H3D_LOG_LEVEL="DEBUG")
    stamp = d.data_dir / CLEAN_STOP
    assert not stamp.exists()  # a first start checks the store
    assert SKIPPED not in d.log.read_text()
    d.stop()
    db = d.data_dir / "h3d.db"
    st = db.stat()
    recorded = json.loads(stamp.read_text())
    assert recorded == {"db": str(db), "file": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
    assert stamp.stat().st_mode & 0o777 == 0o600
    d.start()
    assert d.log.read_text().count(SKIPPED) == 1
    assert not stamp.exists()  # used once: while it runs, nothing vouches for the file
    d.stop()
    assert stamp.exists()


def test_a_store_written_after_the_clean_stop_is_checked_and_refused_when_damaged(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(H3D_LOG_LEVEL="DEBUG")
    d.stop()
    db = d.data_dir / "h3d.db"
    filled_store(db)  # another program wrote to it: the stop's stamp no longer matches
    damaged = damaged_in_the_middle(db)
    with pytest.raises(RuntimeError, match="h3d exited 2") as got:
        d.start()
    assert "is damaged" in str(got.value) and SKIPPED not in str(got.value)
    assert db.read_bytes() == damaged  # left untouched
    assert not (d.data_dir / CLEAN_STOP).exists()


def test_what_the_stamp_vouches_for(tmp_path: Path) -> None:
    db, stamp = tmp_path / "h3d.db", tmp_path / CLEAN_STOP
    filled_store(db)
    engine = make_engine(f"sqlite:///{db}")

    def stamped() -> None:
        migrate.record_clean_stop(engine, stamp)
        assert stamp.exists()

    # the file as the stop left it is not read again, so what it cannot see is damage that
    # changes none of what it records (the disk's own); the stamp is used once
    stamped()
    damaged_in_the_middle(db, keep_mtime=True)
    migrate.check_integrity(engine, stamp)
    assert not stamp.exists()
    with pytest.raises(SchemaMismatch, match="is damaged"):
        migrate.check_integrity(engine, stamp)

    # a new modification time or size, or transactions left in the WAL: read again
    def written() -> None:
        os.utime(db, ns=(time.time_ns(), db.stat().st_mtime_ns + 1_000_000))

    def grown() -> None:
        with db.open("ab") as f:
            f.write(b"\0" * 4096)

    def wal() -> None:
        Path(f"{db}-wal").write_bytes(b"\0" * 32)

    for change in (written, grown, wal):
        stamped()
        change()
        with pytest.raises(SchemaMismatch, match="is damaged"):
            migrate.check_integrity(engine, stamp)
        assert not stamp.exists()

    # a WAL left with transactions in it: no stamp is written
    wal()
    migrate.record_clean_stop(engine, stamp)
    assert not stamp.exists()
    Path(f"{db}-wal").unlink()

    # another store's stamp, or one that is not JSON: read again
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    filled_store(tmp_path / "other.db")
    migrate.record_clean_stop(other, stamp)
    other.dispose()
    for text in (None, "{"):
        if text is not None:
            stamp.write_text(text)
        with pytest.raises(SchemaMismatch, match="is damaged"):
            migrate.check_integrity(engine, stamp)
        assert not stamp.exists()
    engine.dispose()


def test_a_postgresql_store_has_no_clean_stop_record(pg_url: str, tmp_path: Path) -> None:
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    stamp = tmp_path / CLEAN_STOP
    migrate.record_clean_stop(engine, stamp)
    assert not stamp.exists()  # a server's database is not a file h3d can vouch for
    migrate.check_integrity(engine, stamp)  # nothing to check on a server: no error
    engine.dispose()


def test_h3d_db_check_reads_the_whole_store_when_asked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    db = data / "h3d.db"

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "h3d", "db", "check"],
            env=daemon_env(data),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = check()  # no store: a question creates none
    assert r.returncode == 1 and "no store there" in r.stderr and not db.exists()
    filled_store(db)
    r = check()
    assert r.returncode == 0 and r.stdout.strip() == f"sqlite:///{db}: quick_check ok", r
    damaged = damaged_in_the_middle(db, keep_mtime=True)  # what a start after a clean stop skips
    r = check()
    assert r.returncode == 2 and "is damaged" in r.stderr and ".recover" in r.stderr, r
    assert db.read_bytes() == damaged
