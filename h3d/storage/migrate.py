"""The only code that knows ``migrations/``: upgrade, inspect and verify a database's revision."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DatabaseError

from h3d.errors import SchemaMismatch

logger = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """``migrations/`` beside the packages (a checkout), else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").exists():
        return checkout
    import h3d._migrations as installed

    return Path(installed.__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DatabaseError as exc:
        raise SchemaMismatch(
            f"{engine.url.render_as_string(hide_password=True)} is not a readable database "
            f"({exc.orig}); h3d left it untouched. Move it aside or point --db-url elsewhere."
        ) from exc


def _check_known(engine: Engine, rev: str | None) -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    if rev is not None and rev not in {r.revision for r in script.walk_revisions()}:
        raise SchemaMismatch(
            f"the database is at revision {rev!r}, which this h3d does not know: it was "
            "written by a newer h3d. Upgrade h3d, or point --db-url at another database."
        )
    if rev is None:
        tables = set(inspect(engine).get_table_names())
        if tables - {"alembic_version"}:
            raise SchemaMismatch(
                "the database has tables but no h3d revision "
                f"({', '.join(sorted(tables))}); h3d will not write into it. "
                "Point --db-url at another database."
            )


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to head; returns (revision before, revision after)."""
    before = current_revision(engine)
    _check_known(engine, before)
    head = head_revision()
    if before != head:
        with engine.begin() as conn:
            cfg = alembic_config(engine.url.render_as_string(hide_password=False))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        logger.info("database upgraded from %s to %s", before or "empty", head)
    return before, head


def verify_schema(engine: Engine) -> None:
    """Refuse a database that is not at head, with the command that fixes it."""
    rev = current_revision(engine)
    _check_known(engine, rev)
    head = head_revision()
    if rev != head:
        raise SchemaMismatch(
            f"the database is at revision {rev or 'none'}, this h3d needs {head}: "
            "run `h3d db upgrade` (or start with H3D_AUTO_MIGRATE=true)."
        )


def check_integrity(engine: Engine) -> None:
    """Refuse a damaged SQLite store (``PRAGMA quick_check``), leaving it untouched.

    Serving from a damaged file would fail later, in the middle of someone's report, and
    writing into it can spread the damage. The message says how to keep what can be kept.
    """
    if engine.dialect.name != "sqlite":
        return
    url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(5)")]
    except DatabaseError as exc:
        raise SchemaMismatch(
            f"{url} is not a readable database ({exc.orig}); h3d left it untouched. "
            "Move it aside or point --db-url elsewhere."
        ) from exc
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
