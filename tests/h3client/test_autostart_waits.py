"""A profiler's autostart waits for the daemon that holds its data dir (an ``h3d serve``
started a moment ago, still starting) rather than start one that takes the data dir from
it: that daemon's store is the one its user chose. It waits on the sender thread: the
training script goes on logging meanwhile."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from h3client import H3Profiler, _daemon
from h3client._config import resolve
from h3client._daemon import _one_starter, ensure_daemon
from h3d.datadir import DataDirBusy, DataDirLock
from tests.conftest import Daemon, free_port


def _no_daemon_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing on the default port, and no URL, token or data dir from the environment."""
    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("H3D_PORT", str(free_port()))


def _autostart(data: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, list[str]]:
    """``ensure_daemon`` for ``data`` (nothing answering on the default port), in a thread;
    the URL it returns, once it has, in the list."""
    _no_daemon_answers(monkeypatch)
    found: list[str] = []
    config = resolve(data_dir=data)
    thread = threading.Thread(
        target=lambda: found.append(str(ensure_daemon(config, autostart=True)))
    )
    thread.start()
    return thread, found


def _serving(data: Path, daemon: Daemon) -> None:
    """What the holder writes once it serves: its daemon.json (the fixture's daemon, which
    holds the same token, stands in for it)."""
    info = {"url": daemon.url, "pid": os.getpid()}
    (data / "daemon.json").write_text(json.dumps(info))


@pytest.fixture
def data_dir(daemon: Daemon, tmp_path: Path) -> Path:
    """A data dir whose token is the fixture daemon's."""
    data = tmp_path / "profilers"
    data.mkdir(mode=0o700)
    shutil.copy(daemon.data_dir / "token", data / "token")
    return data


def test_autostart_waits_for_the_daemon_that_holds_the_data_dir(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch, started_daemons: None
) -> None:
    lock = DataDirLock(data_dir)  # as `h3d serve` takes it first thing
    lock.acquire()
    try:
        thread, found = _autostart(data_dir, monkeypatch)
        time.sleep(0.3)  # (the profiler looks while the daemon is still starting)
        _serving(data_dir, daemon)
        thread.join(timeout=60)
    finally:
        lock.release()
    assert found == [daemon.url]
    assert _daemon._started == [] and not (data_dir / "h3d.log").exists()  # none started


def test_autostart_waits_for_a_daemon_that_took_the_data_dir_before_its_own(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch, started_daemons: None
) -> None:
    thread, found = _autostart(data_dir, monkeypatch)
    while not (data_dir / "h3d.log").exists():  # it starts a daemon: nothing holds the dir
        time.sleep(0.01)
    lock = DataDirLock(data_dir)  # another one, started just before, takes the dir first
    try:
        lock.acquire()
    except DataDirBusy:
        thread.join(timeout=60)
        pytest.skip("the daemon the profiler started took the data dir first")
    try:
        _serving(data_dir, daemon)
        thread.join(timeout=60)
    finally:
        lock.release()
    assert found == [daemon.url]
    (proc,) = _daemon._started
    assert proc.wait(timeout=60) == 2  # its own daemon found the data dir taken, and exited
    assert "in use by another h3d daemon" in (data_dir / "h3d.log").read_text()


def test_the_training_script_does_not_wait_for_the_daemon_its_profiler_starts(
    daemon: Daemon,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    started_daemons: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``start()`` waited for the daemon to serve (0.5 s to 1.3 s of its imports, by host)
    before the first line of training ran. Here the daemon stays "starting" (the data dir
    held, no daemon.json) for as long as the test likes: the profiler is constructed and
    logs all the same, and its batches reach the daemon once it serves, none spooled."""
    _no_daemon_answers(monkeypatch)
    lock = DataDirLock(data_dir)  # a daemon there, still starting
    lock.acquire()
    try:
        with caplog.at_level(logging.INFO, logger="h3client"):
            prof = H3Profiler("no-wait", data_dir=data_dir, flush_interval_s=0.05)
        # it did not wait (20 s) for that daemon, and did not give up on it: no spooling
        assert "starting a daemon for" in caplog.text and "spool" not in caplog.text
        for k in range(100):
            prof.log_batch(1.0 / (k + 1))
        prof.log_epoch(0, accuracy=0.5)
        assert not (data_dir / "daemon.json").exists()  # still no daemon: nothing waited
        _serving(data_dir, daemon)
    finally:
        lock.release()
    res = prof.stop(timeout_s=60)
    assert (res["batches_posted"], res["batches_spooled"], res["offline"]) == (100, 0, False)
    assert not (data_dir / "spool").exists() or not any((data_dir / "spool").iterdir())
    with daemon.client() as api:
        run = api.get(f"/v1/runs/{prof.run_id}").json()
    assert run["n_batches"] == 100 and run["status"] == "finished"
    assert _daemon._started == []  # the starting one was waited for, none started


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_keep_the_autostart_lock(tmp_path: Path) -> None:
    """The sender may hold the autostart lock while a DataLoader forks its workers: a
    child that kept its copy would hold the lock until it exited, and every other process
    on the data dir would wait 30 s to start a daemon."""
    import fcntl

    r, w = os.pipe()
    with _one_starter(tmp_path, timeout_s=1.0):
        pid = os.fork()
        if pid == 0:  # the child (its fork handlers ran): lives on past the parent's release
            os.write(w, b"1")
            time.sleep(10)
            os._exit(0)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.close(w)
    try:
        fd = os.open(tmp_path / "autostart.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
        finally:
            os.close(fd)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
