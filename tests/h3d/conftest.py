from __future__ import annotations

import os
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, make_engine, make_sessionmaker, session_scope
from tests.h3d.fake_pynvml import FakeGpu, make_module


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A session on a fresh SQLite store at the current revision."""
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as s:
        yield s
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store on a migrated SQLite file, closed after the test."""
    st = Store(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(st.engine)
    yield st
    st.close()


def filled_store(path: Path) -> None:
    """A SQLite store of about 0.7 MB at ``path`` (a run of 2 000 batches of per-sample
    losses), closed as a daemon's stop closes it: the WAL folded into the file."""
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as s:
        run = repo.create_run(
            s, name=None, config={}, tags=[], pid=None, host=None, n_train=None, now=time.time()
        )
        rows = [
            repo.BatchRow(
                seq=i, t=1.0 + i, loss=0.5, n=64, epoch=0, step=i, phase=None,
                losses=b"\0" * 256, indices=None,
            )
            for i in range(2000)
        ]  # fmt: skip
        repo.add_batches(s, run_id=run.id, batches=rows)
    engine.dispose()
    Store(f"sqlite:///{path}").close()


def damaged_in_the_middle(db: Path, keep_mtime: bool = False) -> bytes:
    """Write 64 KiB of garbage in the middle of the file, in place (same size; with
    ``keep_mtime`` its modification time put back too); the file's bytes then."""
    st = db.stat()
    with open(db, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(bytes(range(256)) * 256)
    if keep_mtime:
        os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns))
    return db.read_bytes()


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Install a fake ``pynvml`` (the hardware seam) backed by the given GPUs."""

    def install(gpus: list[FakeGpu], **kw: object) -> types.ModuleType:
        mod = make_module(gpus, **kw)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod

    return install


@pytest.fixture
def fake_amdsmi(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Install a fake ``amdsmi`` (the hardware seam) backed by the given GPU dies."""
    from tests.h3d.fake_amdsmi import FakeAmdGpu
    from tests.h3d.fake_amdsmi import make_module as make_amd

    def install(gpus: list[FakeAmdGpu], **kw: object) -> types.ModuleType:
        mod = make_amd(gpus, **kw)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "amdsmi", mod)
        return mod

    return install


ADMIN_URL = os.environ.get("H3_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped after the test."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        conn = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL server answers at {ADMIN_URL}: {exc.orig}")
    name = f"h3test_{uuid.uuid4().hex[:12]}"
    conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
