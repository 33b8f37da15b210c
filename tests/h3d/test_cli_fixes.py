"""``h3d`` commands: imports that go on past a bad file, exports that leave no half file,
argument checks made before any request, and reports that do not call unknown energy 0 J."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, daemon_env, free_port
from tests.h3d.test_cli import _spool_line, h3d, one_error_line


def _wait_for(what: str, done: object, timeout_s: float = 60.0) -> None:
    """Wait until ``done()`` is true (a state the test waits for, not a time it asserts)."""
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class CutProxy:
    """A TCP relay to the daemon that passes the answers on until ``marker`` and ``extra``
    bytes after it, then holds the rest back (``tripped`` is set) until ``release()``, which
    closes the client's connection: a daemon that goes away in the middle of an answer."""

    def __init__(self, upstream_port: int, marker: bytes, extra: int = 200) -> None:
        self.upstream_port, self.marker, self.extra = upstream_port, marker, extra
        self.tripped = threading.Event()
        self._release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._conns += [client, up]
            threading.Thread(target=self._pump, args=(client, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _down(self, up: socket.socket, client: socket.socket) -> None:
        seen = b""
        with contextlib.suppress(OSError):
            while data := up.recv(65536):
                if not self.tripped.is_set():
                    before, seen = len(seen), seen + data
                    at = seen.find(self.marker)
                    if at >= 0:
                        client.sendall(data[: max(0, at + len(self.marker) + self.extra - before)])
                        self.tripped.set()
                        self._release.wait()
                        client.shutdown(socket.SHUT_RDWR)
                        client.close()
                        return
                client.sendall(data)

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def cut_proxy(daemon: Daemon, marker: bytes) -> Iterator[CutProxy]:
    proxy = CutProxy(daemon.port, marker)
    try:
        yield proxy
    finally:
        proxy.close()


def _run_with_batches(daemon: Daemon, name: str, n: int) -> str:
    now = time.time()
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": name}).json()
        batches = [{"seq": i, "t": now + i * 1e-4, "loss": 2.0 - i * 1e-4} for i in range(n)]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
    return str(run["id"])


def _via(proxy: CutProxy, daemon: Daemon) -> dict[str, str]:
    return {"H3D_URL": proxy.url, "H3D_TOKEN": daemon.token}


# --- export: a daemon that goes away midway, SIGTERM, a previous FILE (#17, #22) ----------


def _big_run_and_a_previous_export(daemon: Daemon, tmp_path: Path) -> tuple[Path, Path]:
    """A run "big" of 2000 batches, and (its dir, FILE): a previous export in FILE alone."""
    _run_with_batches(daemon, "big", 2000)
    (outs := tmp_path / "out").mkdir()
    out = outs / "keep_me.csv"
    out.write_text("precious previous export\n")
    return outs, out


def test_an_export_cut_off_midway_is_one_line_and_keeps_the_previous_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    outs, out = _big_run_and_a_previous_export(daemon, tmp_path)
    with cut_proxy(daemon, b"seq,t,epoch") as proxy:
        proxy.release()  # the connection closes as soon as the export has begun
        r = h3d(daemon, "export", "big", "-o", str(out), **_via(proxy, daemon))
    assert r.returncode == 1, r.stdout + r.stderr
    line = one_error_line(r)
    assert f"the daemon at {proxy.url} went away during the export" in line, line
    assert re.search(r"after \d+ row\(s\) of batches", line), line
    assert f"nothing was kept: {out} is as it was" in line, line
    assert out.read_text() == "precious previous export\n"  # a failed export deleted it
    assert sorted(p.name for p in outs.iterdir()) == ["keep_me.csv"]  # no temp file left

    # to stdout: what was received is there, and stderr says that it is partial
    with cut_proxy(daemon, b"seq,t,epoch") as proxy:
        proxy.release()
        r = h3d(daemon, "export", "big", **_via(proxy, daemon))
    assert r.returncode == 1
    line = one_error_line(r)
    assert "went away during the export" in line and "stdout holds a partial CSV" in line, line
    assert r.stdout.startswith("seq,t,epoch")
    rows = int(re.search(r"after (\d+) row", line)[1])  # type: ignore[index]
    assert rows == r.stdout.count("\n") - 1


def test_an_export_stopped_by_sigterm_leaves_the_previous_file_and_no_temp_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    outs, out = _big_run_and_a_previous_export(daemon, tmp_path)
    with cut_proxy(daemon, b"seq,t,epoch") as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-m", "h3d", "export", "big", "-o", str(out)],
            env=daemon_env(daemon.data_dir, **_via(proxy, daemon)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            temp = outs / f"keep_me.csv.tmp-{proc.pid}"
            _wait_for("the export to begin", lambda: proxy.tripped.is_set() and temp.exists())
            proc.send_signal(signal.SIGTERM)  # as `timeout` or a scheduler stops a command
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert out.read_text() == "precious previous export\n"  # not truncated, not half-written
    assert sorted(p.name for p in outs.iterdir()) == ["keep_me.csv"]


def test_a_complete_export_or_html_report_replaces_the_file_whole(
    daemon: Daemon, tmp_path: Path
) -> None:
    """FILE is written beside it and renamed onto it: a reader of FILE (here: a second link
    to the old file) never sees it emptied and half written; its permissions are kept."""
    _run_with_batches(daemon, "small", 30)
    (outs := tmp_path / "out").mkdir()
    for args, name in (
        (("export", "small", "-o"), "r.csv"),
        (("show", "small", "--html"), "r.html"),
    ):
        out, old = outs / name, outs / f"old-{name}"
        out.write_text("previous\n")
        out.chmod(0o640)
        os.link(out, old)
        r = h3d(daemon, *args, str(out))
        assert r.returncode == 0, r.stderr
        assert old.read_text() == "previous\n"  # the old file was not truncated in place
        assert out.read_text() != "previous\n" and out.stat().st_ino != old.stat().st_ino
        assert out.stat().st_mode & 0o777 == 0o640
    assert not [p for p in outs.iterdir() if ".tmp-" in p.name]


# --- import: a refused line, a vanished file (#13; spool #1, #10) ---------------------------


def _good_spool(rid: str, name: str) -> str:
    batch = json.dumps({"batches": [{"seq": 0, "t": time.time(), "loss": 1.5}]})
    return (
        _spool_line("create", rid, json.dumps({"id": rid, "name": name}))
        + _spool_line("batches", rid, batch)
        + _spool_line("update", rid, '{"status": "finished"}')
    )


def test_import_goes_on_past_a_file_the_daemon_refuses_a_line_of(daemon: Daemon) -> None:
    spool = daemon.data_dir / "spool"
    spool.mkdir(mode=0o700)
    bad_id, good_id = "0" * 31 + "1", "f" * 31 + "2"
    bad, good = spool / f"{bad_id}.jsonl", spool / f"{good_id}.jsonl"  # the bad one first
    in_ms = json.dumps({"batches": [{"seq": 0, "t": time.time() * 1000, "loss": 1.5}]})
    bad.write_text(
        _spool_line("create", bad_id, json.dumps({"id": bad_id, "name": "in-ms"}))
        + _spool_line("batches", bad_id, in_ms)
        + _spool_line("update", bad_id, '{"status": "finished"}')
    )
    good.write_text(_good_spool(good_id, "fine"))
    r = h3d(daemon, "import")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    refused, summary = r.stderr.strip().splitlines()
    # the daemon's code and message, not its JSON cut at 200 characters; the file is kept
    assert refused.startswith(f"h3d: {bad.name} line 2: not imported: 422 validation_error: ")
    assert "milliseconds" in refused and '{"error"' not in refused, refused
    assert refused.endswith(". The file is kept; 1 operation(s) before this line were imported."), (
        refused
    )
    assert summary == (
        "h3d: 1 file(s) stopped at an operation the daemon refused (above); "
        f"kept {bad.name}; 4 operation(s) imported"
    ), summary
    assert f"imported {good.name}: 3 operations" in r.stdout
    assert bad.exists() and not good.exists()
    with daemon.client() as api:  # the file after the refused one was imported
        run = api.get(f"/v1/runs/{good_id}").json()
    assert run["status"] == "finished" and run["n_batches"] == 1


def test_import_passes_over_a_spool_file_its_profiler_replayed_meanwhile(
    daemon: Daemon,
) -> None:
    """The files are listed, then imported one by one; one deleted in between (its profiler
    replayed it as the daemon answered again) is stored already: no error, the rest goes on.
    The first file is a FIFO, so the test knows when the import has listed them."""
    spool = daemon.data_dir / "spool"
    spool.mkdir(mode=0o700)
    ids = ["a" * 32, "b" * 32, "c" * 32]
    first, vanished, last = (spool / f"{rid}.jsonl" for rid in ids)
    os.mkfifo(first, 0o600)
    vanished.write_text(_good_spool(ids[1], "replayed-meanwhile"))
    last.write_text(_good_spool(ids[2], "after-it"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "h3d", "import"],
        env=daemon_env(daemon.data_dir),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        fds: list[int] = []

        def opened() -> bool:  # the import has listed the files and opened the first
            try:
                fds.append(os.open(first, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                assert proc.poll() is None, proc.communicate()
                return False
            return True

        _wait_for("the import to open the first spool file", opened)
        vanished.unlink()  # replayed by its profiler
        os.write(fds[0], _good_spool(ids[0], "first").encode())
        os.close(fds[0])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert err == "", err
    assert f"imported {last.name}: 3 operations" in out, out
    with daemon.client() as api:
        assert api.get(f"/v1/runs/{ids[2]}").json()["n_batches"] == 1
        assert api.get(f"/v1/runs/{ids[0]}").json()["n_batches"] == 1


# --- arguments checked before any request (#9, #11, #15) -------------------------------------


def test_compare_takes_at_most_20_runs_said_before_any_request(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing answers: no request may be made
    r = h3d(tmp_path / "data", "compare", *["beta"] * 21, H3D_URL=url)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "h3d compare: error: at most 20 runs (21 given)" in r.stderr, r.stderr
    assert "no h3d daemon" not in r.stderr and "query.runs" not in r.stderr


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_demo_refuses_a_number_of_epochs_below_one_before_starting_a_daemon(
    tmp_path: Path, epochs: str
) -> None:
    data = tmp_path / "demo"
    r = h3d(data, "demo", "--epochs", epochs, "--stop", H3D_PORT=str(free_port()))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "h3d demo: error: argument --epochs" in r.stderr, r.stderr
    assert not data.exists()  # no daemon was started for nothing


def test_show_refuses_json_with_html_rather_than_dropping_one(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    r = h3d(tmp_path / "data", "show", "x", "--json", "--html", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not allowed with argument" in r.stderr, r.stderr
    assert not out.exists()


# --- db current / db upgrade of a store elsewhere (#7) ---------------------------------------


def test_db_of_a_store_elsewhere_creates_no_data_dir(tmp_path: Path) -> None:
    data, store = tmp_path / "home" / "h3d", tmp_path / "elsewhere.db"
    for command in ("upgrade", "current"):
        r = h3d(data, "db", command, "--db-url", f"sqlite:///{store}")
        assert r.returncode == 0, r.stderr
        assert not data.exists() and not data.parent.exists(), command
    assert store.exists() and store.stat().st_mode & 0o777 == 0o600  # private all the same
    r = h3d(data, "db", "current", "--db-url", f"sqlite:///{tmp_path / 'missing.db'}")
    assert r.returncode == 1 and not data.parent.exists()


# --- reports: unknown energy, 0 batches, a stdout that cannot hold "η" (#11, #12, #16) -------


def test_a_window_no_reading_covers_is_not_0_j_and_is_named_by_the_daemons_note(
    daemon: Daemon,
) -> None:
    with daemon.client() as api:  # a run older than the daemon's devices: none read it
        before = api.post(
            "/v1/runs", json={"name": "before-devices", "created_at": time.time() - 7200}
        ).json()
        api.patch(
            f"/v1/runs/{before['id']}",
            json={"status": "finished", "finished_at": time.time() - 7100},
        ).raise_for_status()
    daemon.stop()  # a run while the daemon was down: its device did not read it
    t0 = time.time()
    # longer than the longest step the energy integral bridges (energy.max_gap: 1 s at the
    # fixture's interval): a shorter outage is interpolated across, as a late sample is
    _wait_for("the clock to move", lambda: time.time() > t0 + 1.5)
    t1 = time.time()
    daemon.start()
    with daemon.client() as api:
        down = api.post("/v1/runs", json={"name": "while-down", "created_at": t0}).json()
        api.patch(
            f"/v1/runs/{down['id']}", json={"status": "finished", "finished_at": t1}
        ).raise_for_status()
        reports = {
            rid: api.get(f"/v1/runs/{rid}/report").json() for rid in (before["id"], down["id"])
        }
    for rid, rep in reports.items():
        assert rep["energy"]["energy_j"] is None, rep["energy"]
        show = h3d(daemon, "show", rid)
        assert show.returncode == 0, show.stderr
        energy = next(line for line in show.stdout.splitlines() if "energy  " in line)
        assert energy.split()[1] == "-", energy
        assert "no device was readable" not in show.stdout  # the daemon has a device
        note = rep["energy"]["active_energy_note"]
        assert note and note in show.stdout
        for d in rep["energy"]["by_device"]:  # a device that read none of the run: not "0 J"
            (line,) = [ln for ln in show.stdout.splitlines() if ln.split()[:1] == [d["device"]]]
            assert line.split()[1] == "-", line
    assert reports[down["id"]]["energy"]["by_device"], "the device read around the outage"


def test_a_run_without_batches_says_so_not_smoothed_over_1_batches(daemon: Daemon) -> None:
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "empty"}).json()
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
    show = h3d(daemon, "show", run["id"])
    assert show.returncode == 0, show.stderr
    assert "(no batches)" in show.stdout and "smoothed over 1 batches" not in show.stdout


def test_compare_on_a_stdout_that_cannot_hold_eta_is_no_traceback(daemon: Daemon) -> None:
    rid = _run_with_batches(daemon, "beta", 10)
    r = h3d(daemon, "compare", "beta", PYTHONIOENCODING="cp1252")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and rid in r.stdout
    assert "? bits/J" in r.stdout  # "η bits/J", as the code page can show it


def test_import_keeps_the_spool_of_a_rank_that_would_join_a_run_that_ended(
    daemon: Daemon,
) -> None:
    """A create refused with 409 run_finished is a new rank joining a run that ended (a
    rank already in it is answered 200): its batches would be stored nowhere, so the file is
    kept and named, not counted as imported and deleted."""
    rid = "ab" * 16
    with daemon.client() as api:
        api.post("/v1/runs", json={"id": rid, "name": "ended", "rank": 0, "world_size": 2})
        api.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()  # whole run
        assert api.get(f"/v1/runs/{rid}").json()["status"] == "finished"
    spool = daemon.data_dir / "spool"
    spool.mkdir(mode=0o700)
    late = spool / f"{rid}.jsonl"
    join = {"id": rid, "name": "ended", "rank": 1, "world_size": 2}
    batch = {"batches": [{"seq": 0, "t": time.time(), "loss": 1.5, "rank": 1}]}
    late.write_text(
        _spool_line("create", rid, json.dumps(join))
        + _spool_line("batches", rid, json.dumps(batch))
        + _spool_line("update", rid, '{"status": "finished", "rank": 1}')
    )
    r = h3d(daemon, "import")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{late.name} line 1: not imported" in r.stderr, r.stderr
    assert late.exists()
    with daemon.client() as api:
        assert api.get(f"/v1/runs/{rid}").json()["n_batches"] == 0
