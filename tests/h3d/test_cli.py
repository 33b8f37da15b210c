"""The ``h3d`` command line, run as a user would run it, against a real daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from h3d.cli import _fmt
from h3d.datadir import DataDirLock
from h3d.storage import migrate
from tests.conftest import (
    REPO,
    Daemon,
    another_program_on_a_port,
    daemon_env,
    data_dir_with_a_token,
    free_port,
)


def h3d(
    daemon_or_dir: Daemon | Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    data = daemon_or_dir.data_dir if isinstance(daemon_or_dir, Daemon) else daemon_or_dir
    return subprocess.run(
        [sys.executable, "-m", "h3d", *args],
        env=daemon_env(data, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_status_runs_show_export(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "cli-run", "tags": ["x"]}).json()
        now = time.time()
        api.post(
            f"/v1/runs/{run['id']}/batches",
            json={
                "batches": [
                    {"seq": i, "t": now + i * 0.01, "loss": 2.0 - i * 0.01, "epoch": 0}
                    for i in range(120)
                ]
            },
        ).raise_for_status()
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
    st = h3d(daemon, "status")
    assert st.returncode == 0, st.stderr
    assert "runs: 1 stored, 0 running" in st.stdout and "constant:0" in st.stdout
    assert "ESTIMATE" in st.stdout  # an estimate is never shown as a measurement
    assert f"dashboard: {daemon.url}/#token={daemon.token}" in st.stdout  # the README's link
    runs = h3d(daemon, "runs")
    assert run["id"] in runs.stdout and "cli-run" in runs.stdout and "(1 of 1)" in runs.stdout
    show = h3d(daemon, "show", run["id"][:8])
    assert show.returncode == 0 and "120 batches" in show.stdout and "bits/J" in show.stdout
    missing = h3d(daemon, "show", "doesnotexist")
    assert missing.returncode != 0 and "run_not_found" in missing.stderr
    out = tmp_path / "r.csv"
    ex = h3d(daemon, "export", "cli-run", "-o", str(out))
    assert ex.returncode == 0, ex.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "seq,t,epoch,step,rank,phase,n,loss" and len(lines) == 121
    with daemon.client() as api:  # a run that logged per-sample losses
        run2 = api.post("/v1/runs", json={"name": "per-sample"}).json()
        api.post(
            f"/v1/runs/{run2['id']}/batches",
            json={"batches": [{"seq": i, "t": now, "loss": 1.0, "epoch": 0,
                               "losses": [0.25, 0.5], "indices": [2 * i, 2 * i + 1]}
                              for i in range(3)]},
        ).raise_for_status()  # fmt: skip
    ex = h3d(daemon, "export", "per-sample", "--samples", "-o", str(out))
    assert ex.returncode == 0 and "exported 6 per-sample losses" in ex.stderr, ex.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "seq,epoch,index,loss" and lines[1:3] == ["0,0,0,0.25", "0,0,1,0.5"]
    assert len(lines) == 7


def test_a_reader_that_leaves_early_ends_the_command_quietly(daemon: Daemon) -> None:
    with daemon.client() as api:  # `h3d show RUN | head -1`: the pipe closes under the report
        run = api.post("/v1/runs", json={"name": "piped"}).json()
    with subprocess.Popen(
        [sys.executable, "-m", "h3d", "show", run["id"]],
        env=daemon_env(daemon.data_dir),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the command writes a line
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    assert code == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_cli_talks_to_a_plain_http_daemon_without_a_ca_bundle(
    daemon: Daemon, ca_loads: list[str]
) -> None:
    from h3d._http import DaemonClient, http_client, probe
    from h3d.config import Settings

    # a verifying SSL context cost every command 34-52 ms of CPU, once or twice (probe and client)
    assert probe(daemon.url, daemon.token) == (True, True)
    client = DaemonClient(Settings(data_dir=daemon.data_dir), url=daemon.url)
    assert client.get("/v1/runs")["count"] == 0
    client.http.close()
    assert ca_loads == []
    http_client("https://127.0.0.1:1", None, 1.0).close()
    assert ca_loads, "an https daemon is reached with certificate verification"


def test_status_when_no_daemon_runs(tmp_path: Path) -> None:
    port = str(free_port())  # nothing answers there, whatever else runs on this machine
    r = h3d(tmp_path / "empty", "status", H3D_PORT=port)
    assert r.returncode == 1 and "no daemon answers" in one_error_line(r) and not r.stdout
    r = h3d(tmp_path / "empty", "runs", H3D_PORT=port)
    assert r.returncode == 1 and "no h3d daemon answers" in r.stderr


def test_a_daemon_that_holds_the_data_dir_but_does_not_answer_yet_is_named(
    tmp_path: Path,
) -> None:
    """A daemon starting (it holds the data dir's lock from its first moment, and reads
    power before it serves): the commands said "no daemon answers ... start one"."""
    data = tmp_path / "starting"
    data.mkdir(mode=0o700)
    lock = DataDirLock(data)  # as `h3d serve` takes it first thing
    lock.acquire()
    try:
        port = str(free_port())
        for command in ("status", "runs"):
            r = h3d(data, command, H3D_PORT=port)
            assert r.returncode == 1 and not r.stdout, r.stderr
            line = one_error_line(r)
            assert f"(pid {os.getpid()}) does not answer: it is starting" in line, line
            assert "start one" not in line and "start it" not in line
    finally:
        lock.release()
    r = h3d(data, "status", H3D_PORT=port)
    assert "no daemon answers" in one_error_line(r)  # nothing holds it now


def test_another_program_on_the_port_is_no_daemon(tmp_path: Path) -> None:
    with another_program_on_a_port() as port:  # its /healthz answers 200 "ok"
        r = h3d(tmp_path / "empty", "status", H3D_PORT=str(port))
    assert r.returncode == 1 and f"no daemon answers at http://127.0.0.1:{port}" in r.stderr


def test_a_daemon_of_another_data_dir_is_named_not_taken_for_this_ones(
    daemon: Daemon, tmp_path: Path
) -> None:
    # a data dir with no daemon.json: the commands look on the port, where the fixture's
    # daemon (another data dir: a demo's, say) answers and refuses this one's token
    mine, port = tmp_path / "mine", str(daemon.port)
    r = h3d(mine, "status", H3D_PORT=port)
    assert r.returncode == 1, r.stdout
    line = one_error_line(r)  # on stderr, as every error
    assert f"no daemon serves {mine}" in line and "serves another data dir" in line
    assert f"h3d serve --data-dir {mine} --port 0" in line
    r = h3d(mine, "runs", H3D_PORT=port)
    assert r.returncode == 1 and "serves another data dir" in r.stderr, r.stderr
    # a spool is not replayed into it: named as that daemon, not as its raw 401 answer
    spool = mine / "spool" / "0123456789abcdef0123456789abcdef.jsonl"
    spool.parent.mkdir(parents=True)
    spool.write_text(_spool_line("create", spool.stem, json.dumps({"id": spool.stem})))
    r = h3d(mine, "import", H3D_PORT=port)
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_error_line(r)
    assert f"no daemon serves {mine}" in line and f"{spool.name} is kept" in line, line
    assert "401" not in line and spool.exists()
    # with that daemon's token (a daemon in a container, on its published port) it is used
    r = h3d(mine, "status", H3D_PORT=port, H3D_TOKEN=daemon.token)
    assert r.returncode == 0 and "runs: 0 stored" in r.stdout, r.stdout + r.stderr


def test_a_daemon_slow_to_answer_is_waited_for_not_taken_for_absent(
    daemon: Daemon, tmp_path: Path
) -> None:
    # a daemon that accepts the connection but answers late (a loaded host): stopped here
    # for longer than the connect timeout, it is still found, and named as what it is
    mine = tmp_path / "mine"
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        cmd = [sys.executable, "-m", "h3d", "status"]
        env = daemon_env(mine, H3D_PORT=str(daemon.port))
        with subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True) as p:
            time.sleep(2.5)  # the command started and its probe has waited past 1 s
            os.kill(daemon.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
            _, err = p.communicate(timeout=60)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    assert p.returncode == 1 and "serves another data dir" in err, err


def test_the_dashboard_link_carries_the_token_the_command_used(
    daemon: Daemon, tmp_path: Path
) -> None:
    # a daemon in a container on its published port, its token given; this host's data dir
    # holds the token of an earlier local daemon, which must not go into the link
    mine = data_dir_with_a_token(tmp_path / "mine", "an-earlier-daemons-token")
    r = h3d(mine, "status", H3D_URL=daemon.url, H3D_TOKEN=daemon.token)
    assert r.returncode == 0, r.stderr
    assert f"dashboard: {daemon.url}/#token={daemon.token}\n" in r.stdout


def test_compare_puts_runs_side_by_side_and_report_is_show(daemon: Daemon) -> None:
    now = time.time()
    with daemon.client() as api:
        for name, n in (("small-lr", 30), ("big-lr", 50)):
            run = api.post("/v1/runs", json={"name": name}).json()
            batches = [{"seq": i, "t": now + i * 0.01, "loss": 2.0 - i * 0.01} for i in range(n)]
            api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches})
            api.post(f"/v1/runs/{run['id']}/epochs", json={"epoch": 0, "accuracy": n / 100})
            api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        time.sleep(0.5)  # the power readings up to the runs' ends are in: their energy is final
        rows = api.get("/v1/compare", params={"runs": ",".join(
            api.get("/v1/runs/resolve", params={"ref": r}).json()["id"]
            for r in ("small-lr", "big-lr"))}).json()["runs"]  # fmt: skip
    r = h3d(daemon, "compare", "small-lr", rows[1]["run_id"][:8])  # by name, by id prefix
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.split()[:6] == ["id", "name", "status", "batches", "energy", "J"], header
    assert len(lines) == 2
    for line, row in zip(lines, rows, strict=True):
        cells = line.split()
        assert cells[:4] == [row["run_id"], row["name"], "finished", str(row["n_batches"])]
        assert cells[4:6] == [_fmt(row["energy_j"]), row["source"]]
        assert cells[-1] == _fmt(row["final_accuracy"])
    missing = h3d(daemon, "compare", "small-lr", "nosuchrun")
    assert missing.returncode == 1 and "run_not_found" in one_error_line(missing)
    # `h3d report RUN` (DESIGN.md's name) is `h3d show RUN`
    shown, reported = h3d(daemon, "show", "big-lr"), h3d(daemon, "report", "big-lr")
    assert reported.returncode == 0 and "50 batches" in reported.stdout, reported.stderr
    assert reported.stdout == shown.stdout


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    data = tmp_path / "d"
    r = h3d(data, "db", "current")  # a question: it makes neither the data dir nor a store
    assert r.returncode == 1 and "no store there" in r.stderr and not data.exists()
    r = h3d(data, "db", "upgrade")
    head = migrate.head_revision()
    assert r.returncode == 0 and f"upgraded (empty) -> {head}" in r.stdout
    r = h3d(data, "db", "upgrade")
    assert f"already at {head}" in r.stdout


def test_demo_profiles_a_real_training_run(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "demo"
    args = ("--epochs", "3", "--stop", "--node", "demo-node", "--log-level", "WARNING")
    r = h3d(data, "demo", *args, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out: Any = r.stdout
    assert "epoch   3/3" in out and "energy" in out and "bits/J" in out
    assert "(epoch mean)" in out and f"--data-dir {data}" in out
    assert "source=estimated" in out or "source=" in out
    assert (data / "h3d.db").exists()
    # --stop: no link to the daemon it just stopped, but how to see the run again
    assert "browse:" not in out and "#token=" not in out and "/docs" not in out, out
    assert "the daemon it started is stopped" in out and f"serve --data-dir {data}" in out
    # --node and --log-level reached the daemon it started
    with contextlib.closing(sqlite3.connect(data / "h3d.db")) as db:
        assert db.execute("SELECT DISTINCT node FROM devices").fetchall() == [("demo-node",)]
        assert db.execute("SELECT node FROM runs").fetchall() == [("demo-node",)]
    log = (data / "h3d.log").read_text()
    assert " INFO " not in log, log


def test_serve_on_a_port_in_use_says_how_to_take_a_free_one(daemon: Daemon, tmp_path: Path) -> None:
    r = h3d(tmp_path / "second", "serve", "--port", str(daemon.port), timeout=60)
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{daemon.port}" in r.stderr and "--port 0" in r.stderr


def test_demo_without_torch_says_what_to_install_and_starts_nothing(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    code = (  # torch absent, as after `pip install h3` (h3d itself never needs it)
        "import sys; sys.modules['torch'] = None\n"
        "from h3d.cli import main\n"
        "raise SystemExit(main(['demo', '--epochs', '1']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=daemon_env(data),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not installed here: torch" in r.stderr and "pip install torch" in r.stderr
    assert not (data / "daemon.json").exists()  # no daemon started for nothing


def test_import_replays_a_client_spool(daemon: Daemon) -> None:
    from h3client import H3Profiler

    prof = H3Profiler(
        "spooled",
        data_dir=daemon.data_dir,
        url="http://127.0.0.1:9",
        autostart=False,
        flush_interval_s=0.05,
    )
    for s in range(300):
        prof.log_batch(1.0 + s)
    prof.log_epoch(0, accuracy=0.5)
    assert prof.stop()["batches_spooled"] == 300
    r = h3d(daemon, "import")
    assert r.returncode == 0, r.stderr
    assert "imported 1 spool file(s)" in r.stdout
    with daemon.client() as api:
        run = api.get(f"/v1/runs/{prof.run_id}").json()
    assert run["n_batches"] == 300 and run["status"] == "finished" and run["n_epochs"] == 1
    assert h3d(daemon, "import").stdout.startswith("h3d: nothing to import")


def test_import_into_a_closed_run_says_what_was_not_stored(daemon: Daemon) -> None:
    """A spool replayed into a run that ended meanwhile (reaped as failed when its process
    was gone) is refused in one line naming the rows not stored, and the file is kept; a
    replay of rows the run holds already is acknowledged."""
    import json
    import shutil

    from h3client import H3Profiler

    prof = H3Profiler("late", data_dir=daemon.data_dir, url="http://127.0.0.1:9", autostart=False)
    for s in range(50):
        prof.log_batch(1.0 + s)
    assert prof.stop()["batches_spooled"] == 50
    spool = daemon.data_dir / "spool" / f"{prof.run_id}.jsonl"
    create = json.loads(spool.read_text().splitlines()[0])
    assert create["op"] == "create"
    with daemon.client() as api:  # the run got to the daemon, then the reaper closed it
        assert api.post("/v1/runs", json=create["body"]).status_code == 201
        assert api.patch(f"/v1/runs/{prof.run_id}", json={"status": "failed"}).is_success
    r = h3d(daemon, "import")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert f"run {prof.run_id} is failed" in line and "50 of the 50 batches" in line, line
    assert "not stored" in line and "The file is kept" in line
    assert spool.exists()
    with daemon.client() as api:
        assert api.get(f"/v1/runs/{prof.run_id}").json()["n_batches"] == 0

    # the same spool, once stored in a run that then finished, replays as acknowledged
    prof2 = H3Profiler(
        "replayed", data_dir=daemon.data_dir, url="http://127.0.0.1:9", autostart=False
    )
    for s in range(50):
        prof2.log_batch(1.0 + s)
    prof2.stop()
    spool2 = daemon.data_dir / "spool" / f"{prof2.run_id}.jsonl"
    copy = daemon.data_dir / "copy.jsonl"
    shutil.copy(spool2, copy)
    assert h3d(daemon, "import", str(spool2)).returncode == 0
    r = h3d(daemon, "import", str(copy))
    assert r.returncode == 0, r.stderr
    with daemon.client() as api:
        run = api.get(f"/v1/runs/{prof2.run_id}").json()
    assert run["n_batches"] == 50 and run["status"] == "finished"


def test_stop_never_signals_a_pid_that_does_not_hold_the_data_dir(tmp_path: Path) -> None:
    """A daemon.json left by a SIGKILLed daemon may name a pid reused by anything."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    bystander = subprocess.Popen(["sleep", "1000"])
    try:
        (data / "daemon.json").write_text(json.dumps({"url": "http://x", "pid": bystander.pid}))
        (data / "sampling.json").write_text(json.dumps({"pid": bystander.pid}))
        r = h3d(data, "stop")
        assert r.returncode == 1 and "was not signalled" in one_error_line(r)
        time.sleep(0.2)
        assert bystander.poll() is None  # still alive
        assert not (data / "daemon.json").exists() and not (data / "sampling.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_second_daemon_on_a_locked_data_dir_refuses_in_one_line(daemon: Daemon) -> None:
    assert daemon.proc is not None
    r = h3d(daemon, "serve", "--port", "0", timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "in use by another h3d daemon" in lines[0] and f"pid {daemon.proc.pid}" in lines[0]
    # stop finds the daemon that holds the lock, and only that one
    r = h3d(daemon, "stop")
    assert r.returncode == 0 and f"pid {daemon.proc.pid}" in r.stdout
    daemon.proc.wait(timeout=20)  # uvicorn re-raises SIGTERM after its graceful shutdown
    for name in ("daemon.json", "sampling.json"):  # the lifespan's cleanup ran (serve's
        assert not (daemon.data_dir / name).exists(), name  # own `finally` does not)
    wal = daemon.data_dir / "h3d.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at stop


# Runs in a mount namespace of its own, where a 4 MiB tmpfs is the data dir: the daemon
# serves and stops once (a store, a lock file, a token), the disk is filled, and it restarts.
_DISK_FULL = """
mount -t tmpfs -o size=4m,mode=0700 tmpfs "$H3D_DATA_DIR" || exit 77
"$PY" -m h3d serve --port 0 2>"$LOG" &
i=0
until [ -f "$H3D_DATA_DIR/daemon.json" ] || [ $i -ge 600 ]; do sleep 0.05; i=$((i+1)); done
"$PY" -m h3d stop >/dev/null
wait
dd if=/dev/zero of="$H3D_DATA_DIR/filler" bs=4k 2>/dev/null
"$PY" -m h3d serve --port 0
"""


def in_namespace(script: str, env: dict[str, str], tmp_path: Path) -> str:
    """Run ``script`` with sh as root of a user and mount namespace of its own (mounts are
    private to it and gone with it); its stderr. Skips where no such namespace can be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount in a namespace of its own")
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env={**env, "PY": sys.executable},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode == 77 or "unshare:" in r.stderr:
        pytest.skip(f"cannot mount in a user and mount namespace here: {r.stderr!r}")
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr


def test_start_on_a_full_disk_fails_in_one_line_naming_the_cause(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = daemon_env(data, LOG=str(tmp_path / "first.log"))
    stderr = in_namespace(_DISK_FULL, env, tmp_path)
    assert "cannot start" not in (tmp_path / "first.log").read_text()  # it did serve once
    (line,) = stderr.strip().splitlines()
    assert line.startswith("h3d: cannot start: ") and (
        "No space left on device" in line or "is full" in line
    ), line
    assert "damaged" not in line and "not a readable database" not in line  # it is not


def test_data_dir_and_store_files_are_private(daemon: Daemon) -> None:
    with daemon.client() as api:
        api.post("/v1/runs", json={"name": "m"}).raise_for_status()
    d = daemon.data_dir
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("h3d.db", "h3d.db-wal", "token", "daemon.json", "sampling.json", "h3d.lock"):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name


def loaded(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The packages of ``prefixes`` that a fresh interpreter holds after ``code``."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    mods = json.loads(r.stdout)
    return [p for p in prefixes if any(m == p or m.startswith(p + ".") for m in mods)]


def test_serve_imports_no_http_client_alembic_or_torch() -> None:
    # What `h3d serve` imports before it answers: the CLI and the app. httpx is the CLI's
    # client for the other commands and the carbon fetch; Alembic only migrates old stores;
    # SQLAlchemy's PostgreSQL dialect arrives with a PostgreSQL engine.
    heavy = (
        "httpx",
        "alembic",
        "mako",
        "torch",
        "numpy",
        "h3client",
        "h3optim",
        "pydantic_settings",
    )
    assert loaded("import h3d.cli, h3d.app", (*heavy, "sqlalchemy.dialects.postgresql")) == []


# --- one clear line, never a traceback --------------------------------------------------------


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (and that it printed no traceback)."""
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("h3d: "), line
    return line


def test_db_upgrade_creates_the_data_dir_private_as_serve_does(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"  # parents too: none exists yet
    r = h3d(data, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert data.stat().st_mode & 0o777 == 0o700
    files = sorted(p.name for p in data.iterdir())
    assert "h3d.db" in files and "h3d.db.migrate-lock" in files, files
    for name in files:
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
    # a data dir another tool left open is tightened, as `serve` tightens it
    data.chmod(0o755)
    (data / "h3d.db").chmod(0o644)
    r = h3d(data, "db", "current")
    assert r.returncode == 0, r.stderr
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "h3d.db").stat().st_mode & 0o777 == 0o600


def test_an_output_file_that_cannot_be_written_is_one_line(daemon: Daemon, tmp_path: Path) -> None:
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "out"}).json()
        api.post(
            f"/v1/runs/{run['id']}/batches",
            json={"batches": [{"seq": 0, "t": time.time(), "loss": 1.0}]},
        ).raise_for_status()
    missing = tmp_path / "nonexistent" / "dir"
    for args, path in (
        (("export", "out", "-o"), missing / "x.csv"),
        (("export", "out", "--samples", "-o"), missing / "s.csv"),
        (("show", "out", "--html"), missing / "x.html"),
        (("export", "out", "-o"), tmp_path),  # a directory
        (("show", "out", "--html"), tmp_path),
    ):
        r = h3d(daemon, *args, str(path))
        assert r.returncode == 1, r.stdout + r.stderr
        line = one_error_line(r)
        assert line.startswith(f"h3d: cannot write {path}: "), line
        assert "No such file or directory" in line or "Is a directory" in line, line
    assert not missing.exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("serve", "--port", "70000"), {}, "--port 70000 (H3D_PORT): "),
        (("status",), {"H3D_PORT": "abc"}, "H3D_PORT=abc: "),
        (("serve", "--node", ""), {}, "--node '' (H3D_NODE): "),
        (("status",), {"H3D_SAMPLE_INTERVAL_S": "0"}, "H3D_SAMPLE_INTERVAL_S=0: "),
        (("runs",), {"H3D_LOG_LEVEL": "loud"}, "H3D_LOG_LEVEL=loud: unknown log level"),
        # before anything is created or bound (they crashed the daemon after binding)
        (
            ("serve", "--port", "0"),
            {"H3D_POWER_BACKENDS": "rapl,nvmll"},
            "H3D_POWER_BACKENDS=rapl,nvmll: unknown power backend 'rapl'",
        ),
        (("serve", "--port", "0"), {"H3D_IDLE_MIN_S": "inf"}, "H3D_IDLE_MIN_S=inf: "),
    ],
)
def test_a_bad_setting_names_the_setting_and_its_variable(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    data = tmp_path / "data"
    r = h3d(data, *args, timeout=60, **env)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert line.startswith("h3d: invalid setting ") and expected in line, line
    assert "errors.pydantic.dev" not in line
    assert not data.exists()  # nothing created for a command that cannot run


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (("serve", "--port", "0", "--db-url", "nonsense"), {}, "--db-url nonsense"),
        (("db", "current", "--db-url", "mysql://x@h/db"), {}, "--db-url mysql://x@h/db"),
        (("db", "upgrade"), {"H3D_DB_URL": "foo://u:secret@h/db"}, "H3D_DB_URL=foo://u:***@h/db"),
    ],
)
def test_a_database_url_h3d_cannot_use_is_one_line_naming_what_it_can(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], shown: str
) -> None:
    data = tmp_path / "data"
    r = h3d(data, *args, timeout=60, **env)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert line.startswith(f"h3d: {shown} is not a usable database URL"), line
    assert "sqlite:///" in line and "postgresql+psycopg://" in line, line
    assert "secret" not in line  # a password is never printed
    assert not data.exists()


def test_db_on_a_database_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    r = h3d(tmp_path / "data", "db", "upgrade", "--db-url", f"sqlite:///{tmp_path}/no/such/x.db")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path}/no/such/x.db" in one_error_line(r)


def _spool_line(op: str, run_id: str, body: str) -> str:
    return f'{{"v": 1, "op": "{op}", "run_id": "{run_id}", "body": {body}}}\n'


def test_import_skips_lines_it_cannot_send_names_them_and_keeps_the_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    rid = "0123456789abcdef0123456789abcdef"
    now = time.time()
    spool = tmp_path / f"{rid}.jsonl"
    spool.write_text(
        _spool_line("create", rid, json.dumps({"id": rid, "name": "odd-spool"}))
        + '{"op":"frobnicate","run_id":"x","body":{}}\n'  # an operation nobody knows
        + _spool_line("epochs", rid, '{"epochs": [{"epoch": 0, "accuracy": NaN}]}')
        + '{"v": 1, "op": "batches", "run_id": "' + rid + '", "bo\n'  # torn
        + "\n"  # blank lines are nothing to skip
        + _spool_line("batches", rid, json.dumps({"batches": [{"seq": 0, "t": now, "loss": 1.5}]}))
        + _spool_line("update", rid, '{"status": "finished"}')
    )  # fmt: skip
    before = spool.read_text()
    r = h3d(daemon, "import", str(spool))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4, r.stderr
    assert lines[0] == f"h3d: {spool.name} line 2 skipped: unknown operation 'frobnicate'"
    assert lines[1].startswith(f"h3d: {spool.name} line 3 skipped: ") and "NaN" in lines[1]
    assert lines[2].startswith(f"h3d: {spool.name} line 4 skipped: not readable JSON")
    assert "3 line(s) skipped" in lines[3] and f"kept {spool.name}" in lines[3], lines[3]
    assert "3 operation(s) imported" in lines[3]
    assert spool.read_text() == before  # kept as it was, for a person to look at
    with daemon.client() as api:  # the lines after the skipped ones were imported
        run = api.get(f"/v1/runs/{rid}").json()
    assert run["status"] == "finished" and run["n_batches"] == 1 and run["n_epochs"] == 0
    r = h3d(daemon, "import", str(spool))  # again: idempotent, and still said
    assert r.returncode == 1 and "3 line(s) skipped" in r.stderr, r.stderr
    with daemon.client() as api:
        assert api.get(f"/v1/runs/{rid}").json()["n_batches"] == 1


def test_import_with_no_daemon_keeps_the_file_and_says_so(tmp_path: Path) -> None:
    rid = "0123456789abcdef0123456789abcdef"
    spool = tmp_path / f"{rid}.jsonl"
    spool.write_text(_spool_line("create", rid, json.dumps({"id": rid})))
    r = h3d(tmp_path / "data", "import", str(spool), H3D_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no h3d daemon answers" in one_error_line(r)
    assert spool.exists()
    r = h3d(tmp_path / "data", "import", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1
    assert one_error_line(r).startswith(f"h3d: cannot read {tmp_path / 'missing.jsonl'}: ")


def test_show_calls_unknown_energy_unknown_not_estimated(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory("none", H3D_POWER_BACKENDS="none")
    with d.client() as api:
        run = api.post("/v1/runs", json={"name": "dark"}).json()
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
    show = h3d(d, "show", run["id"])
    assert show.returncode == 0, show.stderr
    assert "source=none  (unknown: no device was readable)" in show.stdout
    assert "ESTIMATED" not in show.stdout


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_import_completes_a_run_the_reaper_failed(
    daemon_factory: Callable[..., Daemon],
    request: pytest.FixtureRequest,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A short outage at the end of a run: its rest and its final status went to the spool,
    and the daemon, back, failed the run (no request came for it). `h3d import` was then
    refused (409 run_finished) and those batches could never be stored. A replay may fill
    a run the reaper failed, exactly once; never one its client ended (see
    test_import_into_a_closed_run_says_what_was_not_stored)."""
    from h3client import H3Profiler

    # 3 s: on a loaded 2-core host the first post came more than 1 s after the run's create,
    # and the reaper had failed the run before its first batches (409)
    env = {"H3D_RUN_TIMEOUT_S": "3", "H3D_RUN_REAP_EVERY_S": "0.2"}
    if store == "postgresql":
        env["H3D_DB_URL"] = request.getfixturevalue("pg_url")
    d = daemon_factory(f"reaped-{store}", **env)
    # on another host: timed out (this test process, followed here, would be its heartbeat)
    monkeypatch.setattr(socket, "gethostname", lambda: "remote-host")
    prof = H3Profiler("reaped", url=d.url, data_dir=d.data_dir, flush_interval_s=0.05)
    for s in range(50):
        prof.log_batch(2.0 - s / 100)
    assert prof.flush(timeout_s=30)
    d.kill()
    for s in range(50, 100):
        prof.log_batch(2.0 - s / 100)
    prof.log_epoch(0, accuracy=0.5)
    t_stop = time.time()
    res = prof.stop(timeout_s=10)
    assert res["batches_posted"] == 50 and res["batches_spooled"] == 50
    d.start()
    with d.client() as api:
        deadline = time.monotonic() + 60
        while api.get(f"/v1/runs/{prof.run_id}").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    spool = d.data_dir / "spool" / f"{prof.run_id}.jsonl"
    copy = d.data_dir / "copy.jsonl"
    shutil.copy(spool, copy)
    r = h3d(d, "import", str(spool))
    assert r.returncode == 0, r.stderr
    with d.client() as api:
        run = api.get(f"/v1/runs/{prof.run_id}").json()
    assert run["status"] == "finished" and run["n_batches"] == 100 and run["n_epochs"] == 1
    assert run["last_seq"] == 99 and t_stop <= run["finished_at"] <= t_stop + 10  # its own end
    # replayed again: every row once; the run its client ended stays as it ended
    assert h3d(d, "import", str(copy)).returncode == 0
    with d.client() as api:
        assert api.get(f"/v1/runs/{prof.run_id}").json() == run


def test_import_sends_a_line_over_the_daemons_body_limit_in_halves(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A spool line over the daemon's (or a proxy's) body limit was refused (413) at every
    import: nothing after it could ever be stored."""
    import torch

    from h3client import H3Profiler

    d = daemon_factory("small", H3D_MAX_BODY_BYTES=str(1024 * 1024))
    prof = H3Profiler(
        "big-line", data_dir=d.data_dir, url="http://127.0.0.1:9", autostart=False,
        flush_interval_s=60,
    )  # fmt: skip
    losses, idx = torch.rand(4096), torch.arange(4096)
    for _ in range(100):  # one spool line of 6.4 MiB
        prof.log_batch(torch.tensor(1.0), losses=losses, indices=idx)
    assert prof.stop()["batches_spooled"] == 100
    r = h3d(d, "import")
    assert r.returncode == 0, r.stderr
    with d.client() as api:
        run = api.get(f"/v1/runs/{prof.run_id}").json()
    assert run["n_batches"] == 100 and run["status"] == "finished"
    assert not list((d.data_dir / "spool").glob("*.jsonl"))


def test_runs_pages_past_the_apis_limit_and_show_names_gaps(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """`h3d runs --limit 1001` was a 422 (a page holds 1000); `h3d show` of a run the daemon
    did not sample printed "energy 0 J" and no word of the gap."""
    d = daemon_factory("many", H3D_POWER_BACKENDS="constant:50")
    time.sleep(0.5)
    d.stop()
    down = time.time()
    time.sleep(2.5)  # no daemon samples: the run below lies in that gap
    d.start()
    with d.client() as api:
        ids = [api.post("/v1/runs", json={"name": f"r{i}"}).json()["id"] for i in range(1002)]
        old = api.post("/v1/runs", json={"name": "unsampled", "created_at": down + 0.5})
        api.patch(
            f"/v1/runs/{old.json()['id']}",
            json={"status": "finished", "finished_at": down + 2.0},
        ).raise_for_status()
    r = h3d(d, "runs", "--limit", "1002")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines()[1:-1]]
    assert len(listed) == len(set(listed)) == 1002 and "(1002 of 1003)" in r.stdout
    assert set(ids[1:]) <= set(listed)  # the newest 1002: the first run made is left out
    bad = h3d(d, "runs", "--limit", "0")
    assert bad.returncode == 2 and "0 is not a positive number" in bad.stderr
    show = h3d(d, "show", "unsampled")
    assert show.returncode == 0, show.stderr
    assert "no readings while it ran" in show.stdout and "1.5 s unmeasured" in show.stdout


def test_run_names_and_phases_are_printed_with_control_characters_escaped(
    daemon: Daemon,
) -> None:
    """A run named with terminal escapes cleared the screen on `h3d runs` / `h3d show`, and
    a newline in a name broke the runs table: names are anyone's with a token."""
    evil = "\x1b[2J\x1b[31mpwned\x1b[0m\nnext\u202eline"
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": evil}).json()
        now = time.time()
        batches = [{"seq": i, "t": now + i * 0.01, "loss": 2.0, "epoch": 0} for i in range(5)]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        epoch = {"epoch": 0, "t": now + 0.1, "phase": "p\x1b]0;title\x07"}
        api.post(f"/v1/runs/{run['id']}/epochs", json={"epochs": [epoch]}).raise_for_status()
    shown = "\\x1b[2J\\x1b[31mpwned\\x1b[0m\\nnext\\u202eline"
    runs = h3d(daemon, "runs")
    assert runs.returncode == 0, runs.stderr
    assert runs.stdout.splitlines()[1].startswith(f"{run['id']}  {shown[:24]} ")
    assert len(runs.stdout.splitlines()) == 3  # header, the run, the count
    show = h3d(daemon, "show", run["id"])
    assert show.returncode == 0, show.stderr
    assert (
        f"{run['id']}  {shown}  [running]" in show.stdout and "p\\x1b]0;title\\x07" in show.stdout
    )
    missing = h3d(daemon, "show", "\x1b[2Jnope")  # the daemon's answer quotes what was typed
    assert missing.returncode == 1 and "\\x1b[2Jnope" in missing.stderr, missing.stderr
    for r in (runs, show, missing):
        assert not any(c in r.stdout + r.stderr for c in "\x1b\x07\u202e"), r


def test_a_blank_run_and_output_to_stdout_are_said_in_the_commands_words(
    daemon: Daemon, tmp_path: Path
) -> None:
    """`h3d show ""` printed the API's `422 validation_error: query.ref: String should have at
    least 1 character`; `h3d export RUN -o -` wrote a file named `-`."""
    for args in (("show", ""), ("export", "  "), ("show", "", "--html", "-")):
        r = h3d(daemon, *args)
        assert r.returncode == 2, r
        line = one_error_line(r)
        assert line.startswith("h3d: no run given (") and "unique id prefix" in line, line
        assert "query.ref" not in line and "422" not in line, line
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "to-stdout"}).json()
        api.post(
            f"/v1/runs/{run['id']}/batches",
            json={"batches": [{"seq": 0, "t": time.time(), "loss": 1.0}]},
        ).raise_for_status()
    here = tmp_path / "cwd"  # a directory of its own: a file named `-` would show there
    here.mkdir()
    ex = subprocess.run(
        [sys.executable, "-m", "h3d", "export", "to-stdout", "-o", "-"],
        env=daemon_env(daemon.data_dir),
        cwd=here,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ex.returncode == 0, ex.stderr
    assert ex.stdout.splitlines()[0] == "seq,t,epoch,step,rank,phase,n,loss"
    assert len(ex.stdout.splitlines()) == 2 and list(here.iterdir()) == []
    html = subprocess.run(
        [sys.executable, "-m", "h3d", "show", "to-stdout", "--html", "-"],
        env=daemon_env(daemon.data_dir),
        cwd=here,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert html.returncode == 0, html.stderr
    assert "<html" in html.stdout[:500].lower() and list(here.iterdir()) == []
