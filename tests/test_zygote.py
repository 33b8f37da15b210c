"""The suite's daemon zygote (tests/_zygote.py) gives the tests the daemon a spawn gives:
the same exit codes, log lines and signals, through ``subprocess.Popen``'s surface."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import Daemon, ForkedProcess, daemon_env


def _daemon(root: Path, spawn: bool, monkeypatch: pytest.MonkeyPatch, **env: str) -> Daemon:
    monkeypatch.setattr(conftest, "SPAWN", spawn)
    return Daemon(root, daemon_env(root, H3D_POWER_BACKENDS="constant:50", **env))


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_a_daemon_that_cannot_start_says_why_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: bool
) -> None:
    d = _daemon(tmp_path / "data", spawn, monkeypatch, H3D_SAMPLE_INTERVAL_S="-1")
    with pytest.raises(RuntimeError, match="h3d exited 2") as info:
        d.start()
    assert "H3D_SAMPLE_INTERVAL_S" in str(info.value)
    assert isinstance(d.proc, ForkedProcess) is not spawn


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_a_daemon_serves_in_its_environment_and_ends_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: bool
) -> None:
    d = _daemon(tmp_path / "data", spawn, monkeypatch, H3D_NODE=f"node-{spawn}").start()
    try:
        with d.client() as c:
            assert c.get("/healthz").status_code == 200
            node = c.get("/v1/devices").json()
        assert f"node-{spawn}" in str(node)
        proc = d.proc
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM after its graceful shutdown, in either
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert "Traceback" not in d.log.read_text()
    finally:
        d.stop()


@pytest.mark.parametrize("spawn", [False, True], ids=["forked", "spawned"])
def test_a_daemon_not_healthy_in_time_is_killed_not_left_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: bool
) -> None:
    d = _daemon(tmp_path / "data", spawn, monkeypatch)
    ended: list[int] = []
    real_kill = d.kill
    monkeypatch.setattr(d, "kill", lambda: (ended.append(d.proc.pid), real_kill()))  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="did not become healthy"):
        d.start(timeout_s=0)
    assert d.proc is None and len(ended) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped (by the zygote, or here)
        os.kill(ended[0], 0)
