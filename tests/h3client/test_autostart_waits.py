"""A profiler's autostart waits for the daemon that holds its data dir (an ``h3d serve``
started a moment ago, still starting) rather than start one that takes the data dir from
it: that daemon's store is the one its user chose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from h3client import _daemon
from h3client._config import resolve
from h3client._daemon import ensure_daemon, find_daemon
from h3d.datadir import DataDirBusy, DataDirLock
from tests.conftest import Daemon, free_port


def _autostart(data: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, list[str]]:
    """``ensure_daemon`` for ``data`` (nothing answering on the default port), in a thread;
    the URL it returns, once it has, in the list."""
    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("H3D_PORT", str(free_port()))
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


def test_a_profiler_waits_only_until_the_daemon_that_holds_the_data_dir_reads_power(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch, started_daemons: None
) -> None:
    """A profiler's autostart (``find_daemon``) returns once the daemon starting there
    writes its ``sampling.json``, naming a live pid (a killed daemon's names a dead one);
    its sender then waits for the URL."""
    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("H3D_PORT", str(free_port()))
    config = resolve(data_dir=data_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = DataDirLock(data_dir)  # as `h3d serve` takes it first thing
    lock.acquire()
    try:
        (data_dir / _daemon.SAMPLING_NAME).write_text(json.dumps({"pid": dead.pid}))
        found: list[object] = []
        thread = threading.Thread(target=lambda: found.append(find_daemon(config, autostart=True)))
        thread.start()
        time.sleep(0.3)
        assert found == []  # a file a killed daemon left: still waiting
        (data_dir / _daemon.SAMPLING_NAME).write_text(json.dumps({"pid": os.getpid()}))
        thread.join(timeout=60)
        (start,) = found
        assert isinstance(start, _daemon.DaemonStart)  # it reads power: the run may begin
        _serving(data_dir, daemon)
        assert start.wait() == daemon.url  # what the sender waits for
    finally:
        lock.release()
    assert _daemon._started == []  # none started
