"""The sender under load and faults, against real daemons: tensors with per-sample losses
faster than the daemon takes them, a daemon that dies for good, a daemon that hangs, and a
process that exits without ``stop()``. Every batch is accounted for in each case."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from h3client import Client, H3ClientError, H3Profiler, H3RunNotFound
from h3client._spool import batch_seqs
from tests.conftest import REPO, Daemon, daemon_env, free_port

N = 20_000

# Logs n tensor batches with 64 per-sample losses and indices each (values derived from the
# seq, so the test can check what was stored), then stops (or not), and reports.
SCRIPT = """
import json, sys, time, torch
from h3client import H3Profiler
n, mode = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
prof = H3Profiler("sender", max_queue=10 * n)
base, idx = torch.arange(64, dtype=torch.float32) / 64, torch.arange(64)
for k in range(n):
    prof.log_batch(torch.tensor(1.0 + k), losses=base + k, indices=idx + k)
print(prof.run_id, flush=True)
if mode != "exit":
    t = time.monotonic()
    res = prof.stop(timeout_s=120 if mode == "stop" else 0.5)
    res["stop_s"] = time.monotonic() - t
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("batches", "stop", "fl"))}))
"""


def run_script(daemon: Daemon, n: int, mode: str) -> tuple[subprocess.CompletedProcess[str], str]:
    env = daemon_env(daemon.data_dir, H3D_URL=daemon.url)
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n), mode],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr  # no "terminate called without an active exception"
    assert "terminate" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    return r, r.stdout.split()[0]


def stored(daemon: Daemon, run_id: str) -> tuple[list[int], list[int], int]:
    """(seqs in batches, seqs in sample_losses, per-sample values checked), from the SQLite
    file itself: the primary key (run, seq) holds each batch at most once."""
    db = sqlite3.connect(f"file:{daemon.data_dir / 'h3d.db'}?mode=ro", uri=True)
    try:
        seqs = [
            s
            for (s,) in db.execute("SELECT seq FROM batches WHERE run_id=? ORDER BY seq", (run_id,))
        ]
        rows = db.execute(
            "SELECT seq, count, losses, indices FROM sample_losses WHERE run_id=? ORDER BY seq",
            (run_id,),
        ).fetchall()
    finally:
        db.close()
    checked = 0
    for seq, count, losses, indices in rows[:: max(1, len(rows) // 50)]:
        vals, idx = array("f"), array("q")
        vals.frombytes(losses)
        idx.frombytes(indices)
        expected = (torch.arange(64, dtype=torch.float32) / 64 + seq).tolist()
        assert (
            count == 64 and vals.tolist() == expected and idx.tolist() == list(range(seq, seq + 64))
        )
        checked += 1
    return seqs, [r[0] for r in rows], checked


def test_20k_tensor_batches_with_per_sample_losses_are_stored_exactly_once(daemon: Daemon) -> None:
    r, run_id = run_script(daemon, N, "stop")
    res = json.loads(r.stdout.splitlines()[1])
    assert res["batches_logged"] == res["batches_posted"] == N and res["flushed"]
    assert res["batches_spooled"] == res["batches_lost"] == res["batches_rejected"] == 0
    assert res["stop_s"] < 60  # well inside its 120 s timeout (about 2 s on an idle machine)
    seqs, sample_seqs, checked = stored(daemon, run_id)
    assert seqs == sample_seqs == list(range(N)) and checked >= 50
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(run_id)
    assert run["status"] == "finished" and run["n_batches"] == N


def test_a_process_that_exits_without_stop_finishes_its_run(daemon: Daemon) -> None:
    n = 5000
    _, run_id = run_script(daemon, n, "exit")  # exit code 0 checked there
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(run_id)
    assert run["status"] == "finished" and run["n_batches"] == n
    seqs, sample_seqs, _ = stored(daemon, run_id)
    assert seqs == sample_seqs == list(range(n))


def test_a_stop_that_times_out_with_a_backlog_spools_it_and_exits_cleanly(daemon: Daemon) -> None:
    """The issue's abort: stop() gave up on a backlog, then the interpreter died with
    "terminate called without an active exception" while the sender still ran torch code."""
    r, run_id = run_script(daemon, N, "short")  # exit code 0 checked there
    res = json.loads(r.stdout.splitlines()[1])
    assert res["batches_posted"] + res["batches_spooled"] == res["batches_logged"] == N
    assert res["batches_lost"] == 0 and res["stop_s"] < 5
    assert h3d_import(daemon).returncode == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(run_id)
    assert run["status"] == "finished" and run["n_batches"] == N


def h3d_import(daemon: Daemon, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "h3d", "import", *files],
        env=daemon.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def log_tensors(prof: H3Profiler, start: int, stop: int) -> None:
    base, idx = torch.arange(64, dtype=torch.float32) / 64, torch.arange(64)
    for k in range(start, stop):
        prof.log_batch(torch.tensor(1.0 + k), losses=base + k, indices=idx + k)


def wait_posted(prof: H3Profiler, run_id: str, daemon: Daemon, at_least: int) -> None:
    deadline = time.monotonic() + 60
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        while True:
            try:
                n = c.get_run(run_id)["n_batches"]
            except H3RunNotFound:  # the sender has not posted the run's creation yet
                n = 0
            if n >= at_least:
                return
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_daemon_killed_for_good_leaves_everything_in_the_spool_for_import(
    daemon: Daemon,
) -> None:
    prof = H3Profiler("killed", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=0.1)
    assert prof.run_id is not None
    log_tensors(prof, 0, N // 2)
    wait_posted(prof, prof.run_id, daemon, 1)  # part of it reached the daemon
    daemon.kill()  # SIGKILL, never restarted while the profiler lives
    log_tensors(prof, N // 2, N)
    t0 = time.monotonic()
    res = prof.stop(timeout_s=20)
    assert time.monotonic() - t0 < 25
    assert res["batches_logged"] == res["batches_posted"] + res["batches_spooled"] == N
    assert res["batches_lost"] == res["batches_rejected"] == 0
    assert res["batches_posted"] > 0 and res["batches_spooled"] > 0 and res["offline"]
    # later: a daemon on that data dir, and `h3d import` completes the run
    daemon.start()
    r = h3d_import(daemon)
    assert r.returncode == 0, r.stderr
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(prof.run_id)
    assert run["status"] == "finished" and run["n_batches"] == N
    seqs, sample_seqs, _ = stored(daemon, prof.run_id)
    assert seqs == sample_seqs == list(range(N))
    assert not list((daemon.data_dir / "spool").glob("*.jsonl"))


def test_a_refused_token_spools_everything_for_the_daemon_that_takes_it(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a 401 says nothing against the data: it waits on disk, as when no daemon answers,
    # instead of being dropped as rejected
    mine = tmp_path / "mine"
    with caplog.at_level("WARNING", logger="h3client"):
        prof = H3Profiler(
            "refused", url=daemon.url, token="not-its-token", data_dir=mine, flush_interval_s=0.05
        )
        log_tensors(prof, 0, 300)
        prof.log_epoch(0, accuracy=0.5)
        res = prof.stop(timeout_s=20)
    assert res["batches_logged"] == res["batches_spooled"] == 300
    assert res["batches_posted"] == res["batches_rejected"] == res["batches_lost"] == 0
    assert f"the daemon at {daemon.url} refused this profiler's token" in caplog.text
    assert caplog.text.count("refused this profiler's token") == 1  # once, not per request
    spool = mine / "spool" / f"{prof.run_id}.jsonl"
    r = h3d_import(daemon, str(spool))  # on the daemon it belongs to (its data dir, token)
    assert r.returncode == 0, r.stderr
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(str(prof.run_id))
    assert run["status"] == "finished" and run["n_batches"] == 300


def test_a_hung_daemon_stop_returns_by_its_deadline_with_everything_spooled(
    daemon: Daemon,
) -> None:
    prof = H3Profiler("hung", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=0.1)
    assert prof.run_id is not None and daemon.proc is not None
    log_tensors(prof, 0, 1000)
    wait_posted(prof, prof.run_id, daemon, 1000)
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        log_tensors(prof, 1000, 6000)
        prof.log_epoch(0, accuracy=0.5)
        t0 = time.monotonic()
        res = prof.stop(timeout_s=3)
        took = time.monotonic() - t0
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert took < 4.0  # its deadline, not the HTTP timeout
    assert not res["flushed"] and res["batches_lost"] == res["batches_rejected"] == 0
    assert res["batches_posted"] + res["batches_spooled"] == res["batches_logged"] == 6000
    assert res["batches_spooled"] >= 5000 - 2000  # at most one request was acknowledged late
    spool = daemon.data_dir / "spool" / f"{prof.run_id}.jsonl"
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert lines[-1]["op"] == "update" and lines[-1]["body"]["status"] == "finished"
    spooled = {s for op in lines if op["op"] == "batches" for s in batch_seqs(op["body"])}
    assert len(spooled) >= res["batches_spooled"]
    r = h3d_import(daemon)
    assert r.returncode == 0, r.stderr
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(prof.run_id)
    assert run["status"] == "finished" and run["n_epochs"] == 1
    seqs, _, _ = stored(daemon, prof.run_id)
    assert seqs == list(range(6000))


def test_live_eta_has_a_value_early_in_a_run(daemon: Daemon) -> None:
    prof = H3Profiler(
        "eta-early",
        url=daemon.url,
        data_dir=daemon.data_dir,
        flush_interval_s=0.2,
        eta_interval_s=60,  # far longer than the test: the first value cannot be a refresh
    )
    t0 = time.monotonic()
    value = None
    for s in range(400):
        prof.log_batch(2.0 * 0.99**s)
        time.sleep(0.01)
        value = prof.live_eta()
        if value is not None:
            break
    assert value is not None and value > 0  # the loss fell, energy was spent
    assert time.monotonic() - t0 < 30
    prof.stop()


def test_the_config_is_stored_as_given(daemon: Daemon) -> None:
    config: dict[str, Any] = {"lr": 1e-3, "layers": [64, 10], "opt": {"name": "adam"}}
    prof = H3Profiler("cfg", url=daemon.url, data_dir=daemon.data_dir, config=config)
    prof.stop()
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(str(prof.run_id))
    assert run["config"] == config and run["tags"] == []  # no "device": "auto" added
    assert config == {"lr": 1e-3, "layers": [64, 10], "opt": {"name": "adam"}}


def test_a_config_that_json_cannot_hold_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN"):
        H3Profiler("bad", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
                   config={"lr": float("nan")})  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "x" * 201}, "name: a string of at most 200"),
        ({"name": 7}, "name: a string"),
        ({"tags": ["t" * 101]}, "tags: strings of 1 to 100"),
        ({"tags": [""]}, "tags: strings of 1 to 100"),
        ({"tags": [str(i) for i in range(101)]}, "tags: at most 100"),
        ({"n_train": 0}, "n_train: a positive int"),
        ({"n_train": 1.5}, "n_train: a positive int"),
        ({"config": {"data": "x" * 70_000}}, "over the daemon's 65536"),
    ],
)
def test_a_run_the_daemon_would_refuse_is_refused_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    # before: the daemon refused the create (422), then every batch (404 run_not_found), and
    # the whole run was counted rejected, found out only from warnings after training
    kw: dict[str, Any] = {"name": "ok", "url": "http://127.0.0.1:9", "data_dir": tmp_path}
    kw.update(kwargs, autostart=False)
    threads = threading.active_count()
    with pytest.raises(ValueError, match=match):
        H3Profiler(**kw)
    assert threading.active_count() == threads  # no sender left behind


def test_a_run_at_the_daemons_limits_is_taken(daemon: Daemon) -> None:
    import numpy as np

    # the client's checks are the daemon's, not stricter; a numpy integer is an int
    prof = H3Profiler(
        "x" * 200,
        url=daemon.url,
        data_dir=daemon.data_dir,
        tags=["t" * 100] * 100,
        n_train=np.int64(1),
        config={"data": "x" * 60_000},
    )
    assert type(prof.n_train) is int
    prof.log_batch(1.0)
    res = prof.stop()
    assert res["batches_posted"] == 1 and res["batches_rejected"] == 0


def test_an_epoch_keeps_its_figures_when_one_of_them_is_not_a_number(daemon: Daemon) -> None:
    # before: a NaN in any extra metric made the whole epoch unsendable (accuracy with it),
    # counted only in log_errors
    prof = H3Profiler("epoch-figures", url=daemon.url, data_dir=daemon.data_dir)
    prof.log_batch(1.0)
    prof.log_epoch(
        0,
        accuracy=torch.tensor(0.9),
        val_loss=float("inf"),
        grad_norm=float("nan"),
        note="warm-up",
        lr=1e-3,
        kept=torch.tensor(7),
    )
    prof.stop()
    assert prof.log_errors == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        (epoch,) = c.report(str(prof.run_id))["epochs"]
    assert epoch["accuracy"] == pytest.approx(0.9) and epoch["val_loss"] is None
    assert epoch["metrics"] == {"lr": 1e-3, "kept": 7.0}


def test_one_batch_with_a_bad_field_costs_that_batch_only(daemon: Daemon) -> None:
    import numpy as np

    prof = H3Profiler("bad-field", url=daemon.url, data_dir=daemon.data_dir)
    for _ in range(100):
        prof.log_batch(1.0)
    prof.log_batch(1.0, epoch="x")  # the daemon would refuse it, and the request with it
    prof.log_batch(1.0, epoch=np.int64(1))  # an integer all the same
    for _ in range(100):
        prof.log_batch(1.0)
    res = prof.stop()
    assert res["batches_posted"] == 201 and res["batches_rejected"] == 1
    assert n_stored(daemon, prof) == 201


def test_per_token_losses_are_posted_in_requests_the_daemon_takes(daemon: Daemon) -> None:
    # 60 batches of 65 536 per-sample losses (a language model's per-token losses) logged
    # faster than the sender's tick: about 60 MiB as one request, which the daemon refused
    # whole (413, its 32 MiB body limit): every batch counted rejected
    prof = H3Profiler("per-token", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=5)
    log_wide(prof, 60, 65536)
    res = prof.stop()
    assert res["batches_posted"] == 60 and res["batches_rejected"] == 0
    assert n_stored(daemon, prof) == 60


def log_wide(prof: H3Profiler, batches: int, width: int) -> None:
    """``batches`` batches of ``width`` per-sample losses and indices each."""
    losses, idx = torch.rand(width), torch.arange(width)
    for _ in range(batches):
        prof.log_batch(torch.tensor(1.0), losses=losses, indices=idx)


def n_stored(daemon: Daemon, prof: H3Profiler) -> int:
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        return int(c.get_run(str(prof.run_id))["n_batches"])


def test_a_daemon_with_a_lower_body_limit_gets_the_batches_in_smaller_requests(
    daemon_factory: Any,
) -> None:
    # a daemon set to 1 MiB (H3D_MAX_BODY_BYTES) answers 413 to the sender's first, larger
    # requests: their batches go back to the queue and are sent fewer at a time
    small = daemon_factory("small", H3D_MAX_BODY_BYTES=str(1024 * 1024))
    prof = H3Profiler("small-limit", url=small.url, data_dir=small.data_dir, flush_interval_s=5)
    log_wide(prof, 60, 16384)  # about 260 KiB a batch, encoded
    log_wide(prof, 1, 100_000)  # one batch over the limit on its own: refused, and only it
    log_wide(prof, 5, 16384)
    res = prof.stop()
    assert res["batches_posted"] == 65 and res["batches_rejected"] == 1
    assert n_stored(small, prof) == 65


# --- the spool, replayed: outages, limits, tokens and deadlines -----------------------------


@contextlib.contextmanager
def hanging_up(port: int) -> Iterator[list[float]]:
    """Something on ``port`` that takes each connection and closes it at once, as a daemon
    that is down makes every try fail straight away; the times of the connections."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    srv.settimeout(0.05)
    seen: list[float] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            seen.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        srv.close()


def daemon_on(data: Path, port: int, **env: str) -> Daemon:
    env = {"H3D_POWER_BACKENDS": "constant:50", "H3D_LOG_LEVEL": "WARNING", **env}
    return Daemon(data, daemon_env(data, **env), port=port).start()


def with_token(data: Path) -> Path:
    """``data`` as a data dir whose daemon's token exists already (it ran there before)."""
    data.mkdir(mode=0o700, parents=True)
    (data / "token").write_text("a-token-of-an-earlier-start\n")
    (data / "token").chmod(0o600)
    return data


def test_stop_tries_the_daemon_once_whatever_the_back_off(tmp_path: Path) -> None:
    """The daemon answered again, but the sender's back-off (it doubles up to 10 s) had not
    run out: stop() spooled everything without one try, and the run stayed `running` on the
    daemon until the reaper failed it."""
    data, port = with_token(tmp_path / "data"), free_port()
    with hanging_up(port) as tries:
        prof = H3Profiler(
            "backoff", url=f"http://127.0.0.1:{port}", data_dir=data, autostart=False,
            flush_interval_s=0.05,
        )  # fmt: skip
        n = 0
        deadline = time.monotonic() + 60
        while len(tries) < 5:  # the probe at start, then tries 0.5, 1, 2 and 4 s apart
            prof.log_batch(1.0)
            n += 1
            time.sleep(0.005)
            assert time.monotonic() < deadline
    d = daemon_on(data, port)  # the next try is 8 s away
    try:
        for _ in range(10):
            prof.log_batch(0.5)
        res = prof.stop(timeout_s=30)
        assert not res["offline"] and res["flushed"]
        assert res["batches_logged"] == n + 10 and res["batches_lost"] == 0
        with Client(d.url, data_dir=data) as c:
            run = c.get_run(str(prof.run_id))
        assert run["status"] == "finished" and run["n_batches"] == n + 10
        assert not (data / "spool" / f"{prof.run_id}.jsonl").exists()
    finally:
        d.stop()


def test_a_token_the_daemon_writes_after_the_profiler_started_is_read_on_a_refusal(
    tmp_path: Path,
) -> None:
    """A profiler that starts before its data dir's first daemon (compose, systemd): the
    token did not exist yet, was never read again, and every request was refused (401) and
    spooled, the warning pointing at the very file that held the token."""
    data, port = tmp_path / "fresh", free_port()
    prof = H3Profiler(
        "late-daemon", url=f"http://127.0.0.1:{port}", data_dir=data, autostart=False,
        flush_interval_s=0.05,
    )  # fmt: skip
    d = daemon_on(data, port)
    try:
        for _ in range(200):
            prof.log_batch(1.0)
            time.sleep(0.005)
        res = prof.stop(timeout_s=30)
        assert not res["offline"] and res["batches_lost"] == res["batches_rejected"] == 0
        with Client(d.url, data_dir=data) as c:
            run = c.get_run(str(prof.run_id))
        assert run["status"] == "finished" and run["n_batches"] == 200
    finally:
        d.stop()


def test_a_spool_line_over_the_daemons_body_limit_is_replayed_in_halves(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A line the daemon refuses as too large (413: a daemon or a proxy set lower than the
    line) blocked the run's spool for good: replayed whole, every time, refused every time."""
    small = daemon_factory("small", H3D_MAX_BODY_BYTES=str(1024 * 1024))
    data = tmp_path / "offline"
    prof = H3Profiler(
        "big-line", url="http://127.0.0.1:9", data_dir=data, autostart=False, flush_interval_s=60
    )
    log_wide(prof, 100, 4096)  # 6.4 MiB: in one spool line, or two
    assert prof.stop()["batches_spooled"] == 100
    spool = data / "spool" / f"{prof.run_id}.jsonl"
    assert max(len(line) for line in spool.read_bytes().splitlines()) > 3 * 1024 * 1024
    # the spool is replayed before the resume asks for the run, which its replay ended
    with pytest.raises(H3ClientError, match="already ended"):
        H3Profiler(url=small.url, token=small.token, data_dir=data, run_id=prof.run_id)
    with Client(small.url, small.token) as c:
        run = c.get_run(str(prof.run_id))
    assert run["n_batches"] == 100 and run["status"] == "finished"
    assert not spool.exists()


def test_stop_returns_by_its_deadline_while_the_sender_replays_a_long_spool(
    tmp_path: Path,
) -> None:
    """The sender held the spool's lock for its whole replay, across every request, and
    stop()'s take-over waited for it to write the rest: stop(timeout_s=2) took 10 s."""
    data, port = with_token(tmp_path / "data"), free_port()
    prof = H3Profiler(
        "replaying", url=f"http://127.0.0.1:{port}", data_dir=data, autostart=False,
        flush_interval_s=0.05, max_batch=50,
    )  # fmt: skip
    n = 100_000
    for k in range(n):
        prof.log_batch(1.0, losses=[0.5, 0.25], indices=[1, 2])
        if k % 5000 == 0:
            prof.flush(30)
    assert prof.flush(120)
    spool = data / "spool" / f"{prof.run_id}.jsonl"
    d = daemon_on(data, port)
    try:
        with Client(d.url, data_dir=data) as c:
            deadline = time.monotonic() + 60
            while True:  # the loop goes on until the sender replays: part of it stored
                prof.log_batch(1.0)
                n += 1
                try:
                    if c.get_run(str(prof.run_id))["n_batches"] > 0:
                        break
                except H3RunNotFound:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert spool.exists()
        t0 = time.monotonic()
        res = prof.stop(timeout_s=2)
        took = time.monotonic() - t0
        assert took < 5, (took, res)  # its deadline, with room for a loaded machine
        assert res["batches_logged"] == res["batches_posted"] + res["batches_spooled"] == n
        assert res["batches_lost"] == res["batches_rejected"] == 0
        r = h3d_import(d)
        assert r.returncode == 0, r.stderr
        with Client(d.url, data_dir=data) as c:
            run = c.get_run(str(prof.run_id))
        assert run["status"] == "finished" and run["n_batches"] == n
    finally:
        d.stop()


def test_every_field_that_leaves_a_batch_out_is_warned_about_once(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """A loss of two elements and indices of another length than the losses left their
    batches out with no word (only a bad epoch was warned about)."""
    prof = H3Profiler("warned", url=daemon.url, data_dir=daemon.data_dir)
    with caplog.at_level("WARNING", logger="h3client"):
        prof.log_batch(1.0)
        for _ in range(2):
            prof.log_batch(torch.tensor([1.0, 2.0]))  # a loss of two elements
            prof.log_batch(1.0, losses=[1.0, 2.0], indices=[1])  # indices of another length
            prof.log_batch(1.0, epoch=-1)  # an epoch the daemon refuses
        res = prof.stop()
    assert res["batches_posted"] == 1 and res["batches_rejected"] == 6
    left_out = [
        r.getMessage().split("(counted rejected): ", 1)[1]
        for r in caplog.records
        if "batches left out" in r.getMessage()
    ]
    assert sorted(w.split(" ", 1)[0] for w in left_out) == ["epoch", "indices", "loss"], left_out
