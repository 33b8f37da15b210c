"""Where the daemon's store goes, which settings and flags each command takes, and how a start
or a store that cannot be used says so: one line on stderr, never a traceback.

Each test runs ``python -m h3d`` as a user would, against real files (and, where the bug
needs one, a real mount in a user and mount namespace of its own)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, daemon_env
from tests.h3d.test_cli import h3d, in_namespace, one_error_line

# --- the store is the data dir's file, whatever the data dir's name -------------------------


def test_a_data_dir_named_like_a_url_keeps_its_store_inside(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    # The URL was pasted from the path: "?" began a query string (the daemons of "exp?a" and
    # "exp?b" shared one store, "exp", outside both) and "%41" was read as "A".
    d = daemon_factory("exp?a")
    with d.client() as api:
        api.post("/v1/runs", json={"name": "only-in-a"}).raise_for_status()
    r = h3d(tmp_path / "x%41y", "db", "upgrade")
    assert r.returncode == 0, r.stderr
    d.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp?a", "x%41y"]
    assert (tmp_path / "x%41y" / "h3d.db").is_file()
    with contextlib.closing(sqlite3.connect(tmp_path / "exp?a" / "h3d.db")) as db:
        assert db.execute("SELECT name FROM runs").fetchall() == [("only-in-a",)]


# --- an empty variable is unset ---------------------------------------------------------------


def test_an_empty_data_dir_variable_is_the_default_data_dir_not_the_current_one(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "notes.txt").write_text("mine")
    (project / "notes.txt").chmod(0o644)
    env = daemon_env(tmp_path, H3D_DATA_DIR="", XDG_DATA_HOME=str(tmp_path / "xdg"))
    r = subprocess.run(
        [sys.executable, "-m", "h3d", "db", "current"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr  # no store there yet: `db current` makes none
    assert f"{tmp_path / 'xdg' / 'h3d' / 'h3d.db'}: no store there" in r.stderr, r.stderr
    # the current directory untouched: no store in it, its modes as they were
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    assert project.stat().st_mode & 0o777 == 0o755
    assert (project / "notes.txt").stat().st_mode & 0o777 == 0o644


def test_an_empty_host_variable_binds_loopback(daemon_factory: Callable[..., Daemon]) -> None:
    # it bound every interface and recorded http://:PORT, which no client could reach
    d = daemon_factory(H3D_HOST="")
    assert d.url == f"http://127.0.0.1:{d.port}"
    r = h3d(d, "status")
    assert r.returncode == 0 and f"at {d.url}" in r.stdout, r.stdout + r.stderr


# --- each command takes the flags it uses ---------------------------------------------------


@pytest.mark.parametrize(
    ("command", "refused"),
    [
        (("status",), ("--db-url", "--node", "--log-level")),
        (("runs",), ("--db-url", "--node", "--log-level")),
        (("show", "r"), ("--db-url", "--node", "--log-level")),
        (("report", "r"), ("--db-url", "--node", "--log-level")),
        (("compare", "r", "s"), ("--db-url", "--node", "--log-level")),
        (("export", "r"), ("--db-url", "--node", "--log-level")),
        (("stop",), ("--db-url", "--node", "--log-level")),
        (("import",), ("--db-url", "--node", "--log-level")),
        (("doctor",), ("--db-url", "--node", "--log-level")),
        (("db", "current"), ("--node", "--log-level")),
    ],
)
def test_a_command_refuses_a_flag_it_would_ignore(
    tmp_path: Path, command: tuple[str, ...], refused: tuple[str, ...]
) -> None:
    # `h3d runs --db-url OTHER` listed the runs of the data dir's daemon, exit 0
    data = tmp_path / "data"
    values = {"--db-url": "sqlite:////nonexistent/other.db", "--node": "n", "--log-level": "DEBUG"}
    flags = [x for flag in refused for x in (flag, values[flag])]
    r = h3d(data, *command, *flags, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"h3d {command[0]}: error: unrecognized arguments: "), error
    assert all(flag in error for flag in refused), error
    assert f"usage: h3d {command[0]} " in r.stderr  # its own usage: the flags it does take
    assert not data.exists()


def test_serve_and_demo_take_every_store_flag_and_db_its_url() -> None:
    from h3d.cli import build_parser

    parser = build_parser()
    flags = ["--data-dir", "d", "--db-url", "sqlite://", "--node", "n", "--log-level", "WARNING"]
    for command in ("serve", "demo"):
        args = parser.parse_args([command, *flags])
        assert (args.data_dir, args.db_url, args.node, args.log_level) == (
            "d",
            "sqlite://",
            "n",
            "WARNING",
        )
    args = parser.parse_args(["db", "upgrade", *flags[:4]])
    assert (args.data_dir, args.db_url) == ("d", "sqlite://")


# --- a start that cannot go on: one line, exit 2 ----------------------------------------------

# The store passes the checks before binding (its probe write fits), then the devices'
# registration in the app's start-up fills the disk: a trigger makes it write 4 MB into a
# 2 MiB tmpfs, a real "database or disk is full" at exactly that step.
_FULL_AT_REGISTRATION = """
mount -t tmpfs -o size=2m,mode=0700 tmpfs "$H3D_DATA_DIR" || exit 77
"$PY" -m h3d db upgrade >/dev/null || exit 3
"$PY" - "$H3D_DATA_DIR/h3d.db" <<'EOF' || exit 4
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.executescript(
    "CREATE TABLE pad (b BLOB);"
    "CREATE TRIGGER fill AFTER INSERT ON devices BEGIN INSERT INTO pad VALUES (zeroblob(4000000)); END;"
)
db.close()
EOF
"$PY" -m h3d serve --port 0
"""


def test_a_disk_that_fills_during_the_start_up_is_one_line(tmp_path: Path) -> None:
    # it was three chained tracebacks, "Application startup failed" and exit 3
    data = tmp_path / "data"
    data.mkdir()
    env = daemon_env(data, H3D_POWER_BACKENDS="constant:50", H3D_LOG_LEVEL="WARNING")
    err = in_namespace(_FULL_AT_REGISTRATION, env, tmp_path)
    assert "Traceback" not in err and "startup failed" not in err, err
    (line,) = err.strip().splitlines()
    assert (
        line
        == f"h3d: cannot start: the disk holding {data} is full; free some space and start again"
    )


def test_a_store_on_a_read_only_file_system_is_named_as_such(tmp_path: Path) -> None:
    # SQLite cannot make the WAL index beside it: this was "not a readable database ... Move
    # it aside", for a store sqlite3 reads fine
    src, ro = tmp_path / "src", tmp_path / "ro"
    ro.mkdir()
    assert h3d(src, "db", "upgrade").returncode == 0
    script = (
        'mount --bind "$SRC" "$RO" && mount -o remount,bind,ro "$RO" || exit 77\n'
        '"$PY" -m h3d db current --db-url "sqlite:///$RO/h3d.db"\n'
    )
    env = daemon_env(tmp_path / "data", SRC=str(src), RO=str(ro))
    (line,) = in_namespace(script, env, tmp_path).strip().splitlines()
    assert line.startswith(f"h3d: sqlite:///{ro}/h3d.db: {ro} is on a read-only file system")
    assert "not a readable database" not in line and "Move it aside" not in line


def test_a_store_whose_directory_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    for args in (("db", "current"), ("serve", "--port", "0")):
        r = h3d(tmp_path / "data", *args, "--db-url", f"sqlite:///{missing}/h3d.db", timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        line = one_error_line(r)
        assert f"the directory {missing} does not exist" in line, line
        assert "not a readable database" not in line and "Move it aside" not in line
    assert not missing.parent.exists()


def test_a_file_where_the_data_dir_should_be_is_named_as_such(tmp_path: Path) -> None:
    # it was "h3d: /path: File exists"
    file = tmp_path / "f"
    file.write_text("x")
    for data, args, prefix in (
        (file, ("db", "current"), "h3d: "),
        (file, ("serve", "--port", "0"), "h3d: cannot start: "),
        (file / "sub", ("db", "upgrade"), "h3d: "),
    ):
        r = h3d(data, *args, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert one_error_line(r) == (
            f"{prefix}{file} is not a directory; name another data dir (--data-dir or H3D_DATA_DIR)"
        )
    assert file.read_text() == "x"


def test_db_current_on_a_path_with_no_store_creates_none(tmp_path: Path) -> None:
    """`h3d db current --db-url sqlite:///typo.db`, a read-only question, created a 4 KiB
    store at the typo'd path (and the data dir) and answered "at (empty)"."""
    data = tmp_path / "data"
    typo = tmp_path / "typo.db"
    r = h3d(data, "db", "current", "--db-url", f"sqlite:///{typo}")
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_error_line(r)
    assert line == (
        f"h3d: sqlite:///{typo}: no store there (nothing was created); `h3d db upgrade` or "
        "`h3d serve` creates it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no data dir
    typo.touch()  # an empty file is a store at no revision yet: answered as before
    r = h3d(data, "db", "current", "--db-url", f"sqlite:///{typo}")
    assert r.returncode == 0 and "at (empty)" in r.stdout, r.stdout + r.stderr


def test_a_postgresql_error_during_an_upgrade_is_one_line(pg_url: str, tmp_path: Path) -> None:
    """A role that may write rows but not create tables (a shared store's daemons may run so):
    the server's message came with its ``LINE 2: CREATE TABLE ...`` and ``^`` lines."""
    from sqlalchemy import create_engine, text

    from tests.h3d.conftest import ADMIN_URL

    older = "from alembic import command; from h3d.storage import migrate; command.upgrade("
    older += f"migrate.alembic_config({pg_url!r}), '0008_repair_lone_surrogates')"
    subprocess.run([sys.executable, "-c", older], cwd=REPO, check=True, timeout=120)
    role = f"h3dml_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            conn.execute(text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
            conn.execute(
                text(
                    f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
                )
            )
        url = pg_url.replace("postgres@", f"{role}@", 1)
        for cmd in (["db", "upgrade"], ["serve", "--port", "0"]):
            r = h3d(tmp_path / "data", *cmd, "--db-url", url, timeout=60, H3D_LOG_LEVEL="WARNING")
            assert r.returncode == 2
            assert "permission denied" in one_error_line(r)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
        admin.dispose()
        # the role outlives the test's database otherwise
        server = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with server.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        server.dispose()
