"""The node lease where there is no /proc (macOS, Windows): a same-host holder's process is
told by psutil, so a daemon restarted after a crash takes its name at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from h3d import reaper
from h3d.errors import NodeTaken
from h3d.reaper import NodeLease, proc_identity
from h3d.storage.engine import Store


def never(dt: float) -> None:
    raise AssertionError("waited for a holder this host can see")


def test_a_dead_same_host_holder_is_seen_without_proc(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, with no /proc the identity was None, so a daemon restarted after a kill -9
    waited the whole lease (30 s, longer than a client's 20 s autostart) for itself."""
    monkeypatch.setattr(reaper, "_PROC", tmp_path / "no-proc")
    me = proc_identity()
    assert me == f"{psutil.boot_time():.0f}/-/{psutil.Process().create_time()!r}"
    here = me.rsplit("/", 1)[0]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed = f"{here}/{psutil.Process(child.pid).create_time()!r}"
    child.wait()

    def lease(pid: int, proc: str) -> NodeLease:
        return NodeLease(store, "n", lease_s=30, host="h", pid=pid, proc=proc)

    lease(child.pid, crashed).claim()  # the daemon that was killed
    successor = lease(os.getpid(), me)
    successor.claim(sleep=never)  # taken at once
    # a live holder is refused at once ...
    with pytest.raises(NodeTaken, match=f"pid {os.getpid()} on h"):
        lease(child.pid, crashed).claim(sleep=never)
    # ... and one whose pid another process has now (this one, started later) is not alive
    successor.release()
    lease(os.getpid(), f"{here}/{psutil.Process().create_time() - 1.0!r}").claim()
    lease(child.pid, crashed).claim(sleep=never)
