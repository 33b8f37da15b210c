"""The only code that knows ``migrations/``: upgrade, inspect and verify a database's revision.

Several daemons may start at once on one store (every node of a cluster, on one PostgreSQL):
the upgrade runs under a lock that the store itself holds (a PostgreSQL advisory lock, for
SQLite a lock on a file beside the database), and the revision is read again under it, so
the schema is migrated exactly once and the others find it at head.

Alembic is imported only to migrate a store written by an older h3d. A start on a store at
head reads ``alembic_version`` with one query and compares it with ``HEAD_REVISION``, a
constant that tests/h3d/test_storage.py checks against the migration scripts (the query
before it, which looks for that table, lists them all: a store at head that lacks one of
the ORM's is refused); an empty store (the first start) is created at head from the ORM's
tables and stamped, as Alembic's cookbook builds "an up to date database from scratch"
(the same test checks that this schema and the migrated one are the same). Importing
Alembic and running ``migrations/`` cost more than the rest of the store's start-up
(benchmarks/results/startup.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DatabaseError, OperationalError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one daemon per store
    fcntl = None  # type: ignore[assignment]

from h3d.errors import H3DError, SchemaMismatch, StorageUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key of schema migrations: "H3D_MIGR" as a big-endian int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"H3D_MIGR", "big")

# Every revision in migrations/versions, oldest first; the last is the head. A new migration
# adds its id here (tests/h3d/test_storage.py fails until it does).
REVISIONS = (
    "0001",
    "0002",
    "0003",
    "0004_nodes_and_ranks",
    "0005_run_idle",
    "0006_run_seen_at",
    "0007_bigint_counts",
    "0008_repair_lone_surrogates",
    "0009_node_leases",
    "0010_node_lease_proc",
)
HEAD_REVISION = REVISIONS[-1]

# The longest path SQLite's unix VFS opens: 512 bytes (MAX_PATHNAME), less room for the
# suffix of the store's journal ("-journal"). Longer is "unable to open database file".
SQLITE_MAX_PATH = 512 - 8


def migrations_dir() -> Path:
    """``migrations/`` beside the packages (a checkout), else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").exists():
        return checkout
    import h3d._migrations as installed

    return Path(installed.__file__).parent


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return HEAD_REVISION


def script_revisions() -> list[str]:
    """The revisions of the migration scripts, oldest first, as Alembic reads them (slow:
    imports Alembic and every script: for the tests, not for a start)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _read_revision(conn: Connection) -> tuple[str | None, set[str]]:
    """``alembic_version``'s row, read the way Alembic's MigrationContext does (None: no
    table or no row), without importing Alembic; and the names of the store's tables (one
    query, which also tells whether ``alembic_version`` is there)."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" not in tables:
        return None, tables
    rows = [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    if len(rows) > 1:
        raise SchemaMismatch(
            f"the database records several revisions ({', '.join(sorted(rows))}); "
            "h3d has one line of migrations and will not guess. Point --db-url elsewhere."
        )
    return (rows[0] if rows else None), tables


def _read_store(engine: Engine) -> tuple[str | None, set[str]]:
    """The store's revision and table names (``_read_revision``), or one line on why it
    cannot be read."""
    try:
        with engine.connect() as conn:
            return _read_revision(conn)
    except DatabaseError as exc:
        if engine.dialect.name == "sqlite":  # a file it cannot open or read
            raise _unreadable(engine, exc) from exc
        url = engine.url.render_as_string(hide_password=True)
        why = " ".join(str(exc.orig).split())
        if isinstance(exc, OperationalError):
            raise StorageUnavailable(
                f"cannot reach the database at {url} ({why}); is the server running, and the "
                "URL right? h3d changed nothing."
            ) from exc
        # the server answered, and refused (a role without the privilege to read the tables)
        raise StorageUnavailable(
            f"{url}: the server refused to read h3d's tables ({why}); grant this role access "
            "to them, or point --db-url at another database. h3d changed nothing."
        ) from exc


def current_revision(engine: Engine) -> str | None:
    return _read_store(engine)[0]


def _path_problem(database: str | None) -> str | None:
    """What keeps SQLite from opening a store at ``database`` that is not the file's
    content: its path too long, its directory missing, not a directory, read-only or not
    writable (SQLite writes its WAL index beside the store even to read it), or the file
    not open to us."""
    if not database or database == ":memory:":
        return None
    path = Path(database).absolute()
    size = len(os.fsencode(path))
    if size > SQLITE_MAX_PATH:
        return (
            f"the store's path is {size} bytes long, and SQLite opens none longer than "
            f"{SQLITE_MAX_PATH}; use a shorter data dir or --db-url"
        )
    parent = path.parent
    if not parent.exists():
        return f"the directory {parent} does not exist; create it or point --db-url elsewhere"
    if not parent.is_dir():
        return f"{parent} is not a directory; point --db-url elsewhere"
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return (
            f"{parent} is on a read-only file system, and SQLite writes beside the store even "
            "to read it; mount it read-write, or copy the store elsewhere and point --db-url "
            "at the copy"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by this user; fix its permissions or use another"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user; fix its permissions"
    return None


def _unreadable(engine: Engine, exc: DatabaseError) -> H3DError:
    """SQLite could not open or read the store: a full disk or the place it is in, if that
    is why, else the file itself (not a database)."""
    url = engine.url.render_as_string(hide_password=True)
    full = _disk_full(engine)
    if full is not None:  # SQLite says "disk I/O error" when it cannot size the WAL index
        return StorageUnavailable(f"{url}: cannot open it ({exc.orig}): {full_disk_note(full)}")
    problem = _path_problem(engine.url.database)
    if problem is not None:
        return StorageUnavailable(f"{url}: {problem} ({exc.orig}); h3d changed nothing")
    return SchemaMismatch(
        f"{url} is not a readable database ({exc.orig}); h3d left it untouched. "
        "Move it aside or point --db-url elsewhere."
    )


def _check_known(rev: str | None, tables: set[str]) -> None:
    """Refuse a store h3d cannot use as it is: at a revision this h3d does not know, with
    tables but no revision (not h3d's), or at head without a table h3d needs."""
    if rev is not None and rev not in REVISIONS:
        raise SchemaMismatch(
            f"the database is at revision {rev!r}, which this h3d does not know: it was "
            "written by a newer h3d. Upgrade h3d, or point --db-url at another database."
        )
    if rev == HEAD_REVISION:
        from h3d.storage.models import Base

        missing = sorted(set(Base.metadata.tables) - tables)
        if missing:
            raise SchemaMismatch(
                f"the database is at {rev} but has no table {', '.join(missing)}, which h3d "
                "needs (something other than h3d dropped it); h3d will not write into it. "
                "Restore the store from a copy, or point --db-url at another database."
            )
    if rev is None and tables - {"alembic_version"}:
        raise SchemaMismatch(
            "the database has tables but no h3d revision "
            f"({', '.join(sorted(tables))}); h3d will not write into it. "
            "Point --db-url at another database."
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _no_cascades(engine: Engine) -> Iterator[Connection]:
    """A SQLite connection in one transaction, DDL included, with its foreign keys off
    until it commits.

    Alembic alters a SQLite table by copying it into a new one and dropping the old (batch
    mode). With foreign keys on, as every h3d connection has them, that DROP deletes every
    row that refers to the table through an ON DELETE CASCADE: altering ``devices`` emptied
    ``power_samples``. SQLite reads the pragma only outside a transaction, so it is set on
    the driver's connection before the transaction begins, and the references are checked
    before the commit instead (``PRAGMA foreign_key_check``): a migration that broke one
    rolls back.

    The driver (pysqlite) begins a transaction only before a DML statement, so a CREATE
    TABLE ahead of the first one committed at once: a failed or killed upgrade kept its new
    table and every rerun failed on it ("table run_ranks already exists"), and a first start
    on a full disk left a half-made store that was then refused as foreign. So the driver is
    put in autocommit and the transaction begun here (SQLAlchemy's pysqlite recipe), as the
    writer's engine does: everything the migration does commits or rolls back as one.
    """
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        driver_level = raw.isolation_level
        raw.isolation_level = None
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise SchemaMismatch(
                        f"the migration left {len(broken)} rows referring to rows that do not "
                        f"exist (first: {tuple(broken[0])}); it was rolled back and the "
                        "database is as it was"
                    )
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
            raw.isolation_level = driver_level


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the store's migration lock until it ends."""
    db = sqlite_file(engine)
    if db is not None:
        with _file_lock(Path(f"{db}.migrate-lock")), _no_cascades(engine) as conn:
            yield conn
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # no statement or lock timeout (engine.make_engine's) in this transaction: an
            # ALTER of a large table may take minutes, and a daemon that starts while another
            # migrates waits for it here
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SET LOCAL lock_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        yield conn


def create_at_head(conn: Connection) -> None:
    """Create the schema of an empty database at head in ``conn``'s transaction: the ORM's
    tables, and ``alembic_version`` (Alembic's own definition of it) holding the head."""
    from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table

    from h3d.storage.models import Base

    Base.metadata.create_all(conn)
    version = Table(
        "alembic_version",
        MetaData(),
        Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(conn, checkfirst=True)  # left empty by a downgrade to base
    conn.execute(version.delete())
    conn.execute(version.insert().values(version_num=HEAD_REVISION))


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to head; returns (revision found under the lock, head).

    The first element equals the second when there was nothing to do, also when another
    daemon migrated the store while this one waited for the lock.
    """
    before, tables = _read_store(engine)
    _check_known(before, tables)
    head = head_revision()
    if before == head:
        return before, head
    with migration_lock(engine) as conn:
        found, tables = _read_revision(conn)
        if found == head:
            logger.info("database already at %s: another h3d migrated it", head)
            return found, head
        _check_known(found, tables)
        if found is None:  # empty: no data to carry through the migrations
            create_at_head(conn)
            logger.info("database upgraded from empty to %s (created at head)", head)
            return found, head
        from alembic import command

        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    logger.info("database upgraded from %s to %s", found or "empty", head)
    return found, head


def verify_schema(engine: Engine) -> None:
    """Refuse a database that is not at head, with the command that fixes it."""
    rev, tables = _read_store(engine)
    _check_known(rev, tables)
    head = head_revision()
    if rev != head:
        raise SchemaMismatch(
            f"the database is at revision {rev or 'none'}, this h3d needs {head}: "
            "run `h3d db upgrade` (or start with H3D_AUTO_MIGRATE=true)."
        )


def full_disk_note(where: Path) -> str:
    """How a start that failed for want of space says so (``h3d serve``'s checks)."""
    return f"the disk holding {where} is full; free some space and start again"


def _disk_full(engine: Engine) -> Path | None:
    """The SQLite file's directory if the disk holding it has no room left for a page."""
    db = sqlite_file(engine)
    if db is None:
        return None
    where = db.resolve().parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    return where if free < 64 * 1024 else None


def sqlite_file(engine: Engine) -> Path | None:
    """The SQLite file ``engine`` opens, as an absolute path (not normalised: ``..`` after a
    symbolic link is the kernel's to resolve, as SQLite's open does); None for a server's
    database or an in-memory one."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database).absolute()


def _file_state(db: Path) -> list[int] | None:
    """The database file's device, inode, size and modification time (ns); None while its
    WAL holds transactions not folded into it (a stop that was not clean), or if absent."""
    try:
        if os.stat(f"{db}-wal").st_size > 0:
            return None
    except FileNotFoundError:
        pass
    try:
        st = db.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def record_clean_stop(engine: Engine, stamp: Path) -> None:
    """Write ``stamp``: the store's file as a clean stop leaves it, once ``Store.close()``
    folded the WAL into it. The next start skips ``PRAGMA quick_check`` if the file is
    still exactly that (:func:`check_integrity`). Nothing is written for a store that is
    not a SQLite file, or whose WAL could not be folded (a full disk)."""
    db = sqlite_file(engine)
    state = None if db is None else _file_state(db)
    if state is None:
        return
    tmp = stamp.with_name(stamp.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"db": str(db), "file": state}, f)
        os.replace(tmp, stamp)
    except OSError as exc:  # a full or read-only disk: the next start checks the file
        logger.warning("could not record the store's clean stop: %s", exc)


def _unchanged_since_clean_stop(engine: Engine, stamp: Path) -> bool:
    """Whether the store's file is as the last clean stop recorded it in ``stamp``. The
    stamp is used once: removed here, so that only the next clean stop vouches again."""
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            stamp.unlink()
    db = sqlite_file(engine)
    return (
        db is not None
        and isinstance(recorded, dict)
        and recorded.get("db") == str(db)
        and recorded.get("file") == _file_state(db)
    )


def check_integrity(engine: Engine, clean_stop: Path | None = None) -> None:
    """Refuse a damaged SQLite store (``PRAGMA quick_check``), leaving it untouched.

    Serving from a damaged file would fail later, in the middle of someone's report, and
    writing into it can spread the damage. The message says how to keep what can be kept.

    ``quick_check`` reads the whole file: about 2 s a GB with the file in the page cache
    (benchmarks/results/startup.md), at every start. With ``clean_stop`` (``h3d serve``'s
    ``<data dir>/store.clean``), a file that is, to the nanosecond of its modification
    time, what the daemon's last clean stop left (same device, inode and size, no WAL to
    replay) is not read again: anything that wrote to it since, a crash, a copy or another
    program, makes the next start check it. Damage that changes none of these (the disk
    itself) is found by SQLite when the damaged page is read: that request fails with
    "database disk image is malformed".
    """
    if engine.dialect.name != "sqlite":
        return
    if clean_stop is not None and _unchanged_since_clean_stop(engine, clean_stop):
        logger.debug("the store is as its last clean stop left it: quick_check skipped")
        return
    url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(5)")]
    except DatabaseError as exc:
        raise _unreadable(engine, exc) from exc
    if rows != ["ok"]:
        path = engine.url.database
        first = " ".join(" ".join(rows).split())[:160]  # quick_check's lines, on one line
        raise SchemaMismatch(
            f"{url} is damaged (quick_check: {first}); h3d left it untouched. To keep what "
            f"can be kept: sqlite3 {path} .recover | sqlite3 recovered.db, then start with "
            "--db-url sqlite:///recovered.db"
        )


def probe_write(engine: Engine) -> None:
    """One real write (it changes nothing): a full disk or a read-only store fails here, at start,
    in one line, not in the first request or the sampler."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
