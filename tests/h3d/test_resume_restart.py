"""A resumed run through a daemon restart: the store, not only the sampler, knows its process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from tests.conftest import Daemon


def test_a_resumed_run_is_followed_by_its_new_process_after_a_daemon_restart(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The resume was followed in memory only; the row kept the crashed process's pid. A
    restarted daemon took the run up by that pid, found it gone: the live run got no share
    (its energy froze) and, after the exit grace, was failed, its later batches refused."""
    d = daemon_factory("resume", H3D_RUN_EXIT_GRACE_S="1", H3D_RUN_REAP_EVERY_S="0.2")
    crashed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(crashed.stdout)
    live = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the resumed process
    rid, host = uuid.uuid4().hex, socket.gethostname()
    try:
        with d.client() as c:
            r = c.post(
                "/v1/runs", json={"id": rid, "name": "resumed", "pid": dead_pid, "host": host}
            )
            assert r.status_code == 201, r.text
            r = c.post(
                "/v1/runs",
                json={"id": rid, "name": "resumed", "pid": live.pid, "host": host},
                headers={"H3-Resume": "1"},
            )
            assert r.status_code == 200 and r.json()["pid"] == live.pid, r.text
        d.restart()
        time.sleep(3)  # quiet for three exit graces: the reaper passes every 0.2 s
        with d.client() as c:
            assert c.get(f"/v1/runs/{rid}").json()["status"] == "running"
            first = c.get(f"/v1/runs/{rid}/energy").json()["energy_j"]
            time.sleep(1)
            second = c.get(f"/v1/runs/{rid}/energy").json()["energy_j"]
            assert second > first, (first, second)  # its share of the devices keeps coming
            r = c.post(f"/v1/runs/{rid}/batches",
                       json={"batches": [{"seq": 0, "t": time.time(), "loss": 1.0}]})  # fmt: skip
            assert r.status_code == 200, r.text
    finally:
        live.kill()
        live.wait()
