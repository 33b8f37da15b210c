"""Per-run attribution with real processes: CPU-burning children in two runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from h3d import analysis
from h3d.attribution import CpuShareTracker, busy_cpu_s
from h3d.power.base import DeviceInfo, PowerReading
from h3d.power.sampler import PowerSampler
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, session_scope
from tests.conftest import burn_cpu

BURN = """
import sys, time
duty = float(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.monotonic()
    while time.monotonic() - t < 0.02 * duty:
        pass
    time.sleep(0.02 * (1 - duty))
"""


def burner(duty: float, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BURN, str(duty), str(seconds)])


def test_tracker_follows_children_and_shares_stay_below_one() -> None:
    # the tracked process is a shell whose child does the burning
    parent = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            f"exec \"{sys.executable}\" -c \"import subprocess,sys; subprocess.run([sys.executable, '-c', {BURN!r}, '0.9', '1.5'])\"",
        ]
    )
    tr = CpuShareTracker()
    assert tr.track("r", parent.pid)
    assert not tr.track("gone", 2**22 + 12345)
    tr.sample()
    shares = []
    for _ in range(6):
        time.sleep(0.2)
        shares.append(tr.sample().get("r", 0.0))
    parent.wait()
    # the grandchild's CPU time is counted (without it the share is ~0: the shell and its
    # python child sleep); a share of the machine's busy time, so other load lowers it
    assert max(shares) > 0.05
    assert all(0.0 <= s <= 1.0 for s in shares)


class BurnerMeter:
    """A device at the hardware seam whose power follows the watched processes: 10 W idle
    plus 50 W per core they keep busy. Other load on the machine does not move it, so the
    idle baseline and the active energy are known whatever else runs."""

    def __init__(self) -> None:
        self.info = DeviceInfo(name="meter:cpu", kind="cpu", source="estimated", model="test meter")
        self.procs: list[psutil.Process] = []
        self._last: tuple[float, float] | None = None

    def watch(self, pid: int) -> None:
        self.procs.append(psutil.Process(pid))

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def read(self) -> PowerReading:
        now, cpu = time.monotonic(), self._cpu()
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return PowerReading(power_w=10.0)
        return PowerReading(power_w=10.0 + 50.0 * max(0.0, cpu - last[1]) / (now - last[0]))

    def close(self) -> None:
        pass


def test_busier_run_gets_about_twice_the_active_energy(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(store.engine)
    factory = store.sessions
    meter = BurnerMeter()
    sampler = PowerSampler([meter], store, interval_s=0.05, flush_interval_s=0.2, idle_min_s=1.0)
    sampler.start()
    time.sleep(1.5)  # no run active: the idle baseline (10 W) is measured
    busy, light = burner(0.6, 4.0), burner(0.3, 4.0)
    runs = {}
    for name, proc in (("busy", busy), ("light", light)):
        meter.watch(proc.pid)
        with session_scope(factory) as s:
            runs[name] = repo.create_run(
                s,
                name=name,
                config={},
                tags=[],
                pid=proc.pid,
                host=None,
                n_train=None,
                now=sampler.mark(),
            ).id
        assert sampler.run_started(runs[name], proc.pid)
    busy.wait()
    light.wait()
    for rid in runs.values():
        with session_scope(factory) as s:
            repo.update_run(
                s, run_id=rid, status="finished", name=None, tags=None, now=sampler.mark()
            )
        sampler.run_ended(rid)
    time.sleep(0.3)
    sampler.stop()
    with session_scope(factory) as s:
        e = {
            n: analysis.run_energy(s, run=repo.get_run(s, run_id=rid), interval_s=0.05)
            for n, rid in runs.items()
        }
    store.close()
    for name in e:
        dev = e[name]["by_device"][0]
        assert dev["attribution"] == "process" and dev["idle_power_w"] == pytest.approx(10.0)
        assert dev["energy_j"] <= dev["device_energy_j"] + 1e-9
        assert 0 < e[name]["active_energy_j"] <= e[name]["energy_j"]
    # together the two runs never get more than the device drew over their windows
    assert e["busy"]["energy_j"] + e["light"]["energy_j"] <= 1.02 * max(
        e["busy"]["device_energy_j"], e["light"]["device_energy_j"]
    )
    ratio = e["busy"]["active_energy_j"] / e["light"]["active_energy_j"]
    assert ratio == pytest.approx(2.0, rel=0.4), e


REAPER = """
import subprocess, sys, time
for _ in range(3):  # three short-lived workers, each waited for (as DataLoader workers are)
    subprocess.run([sys.executable, "-c", sys.argv[1]], check=True)
time.sleep(0.3)
"""
# 0.4 s of the worker's own CPU time, however loaded the machine (BURN counts wall time)
CPU_BURN = "import time\nend = time.thread_time() + 0.4\nwhile time.thread_time() < end: pass"


def test_reaped_children_are_counted_once() -> None:
    """A child's CPU time arrives twice: seen while it runs, then in the parent's
    children_* fields when it is reaped. It must be counted once."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", REAPER, CPU_BURN])
    ps = psutil.Process(parent.pid)
    tr = CpuShareTracker()
    assert tr.track("r", parent.pid)
    truth = 0.0
    while parent.poll() is None:
        tr.sample()
        try:
            t = ps.cpu_times()  # own + every reaped worker: the ground truth
            truth = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert truth > 1.1  # the workers did burn their 3 x 0.4 s
    # the tracker saw every worker while it ran and again when reaped: once is the truth
    assert tr.cpu_s("r") == pytest.approx(truth, rel=0.25), (tr.cpu_s("r"), truth)


def test_several_runs_never_get_more_than_the_machine() -> None:
    procs = [burner(0.9, 1.2), burner(0.45, 1.2), burner(0.9, 1.2)]
    tr = CpuShareTracker()
    for i, p in enumerate(procs):
        assert tr.track(f"r{i}", p.pid)
    tr.track("dup", procs[0].pid)  # the same process in two runs: still no more than 1
    tr.sample()
    sums = []
    busy = {f"r{i}": 0.0 for i in range(3)}
    while any(p.poll() is None for p in procs):
        time.sleep(0.1)
        shares = tr.sample()
        sums.append(sum(shares.values()))
        for k in busy:
            busy[k] += shares.get(k, 0.0)
    assert all(s <= 1.0 + 1e-9 for s in sums), sums
    assert busy["r0"] > busy["r1"]  # the busier one gets more


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def test_a_run_announced_late_is_counted_from_its_start(daemon: Any) -> None:
    """A client's create arrives after the run began (its sender thread sends it). The run
    here burns its CPU before the daemon hears of it and ends at once: told the process's
    CPU time at ``created_at``, the daemon counts that CPU. (Not told, it saw the process
    idle from the create on and gave it next to nothing: this failed before cpu_s.)"""
    t0, cpu0, busy0 = time.time(), _cpu_s(), busy_cpu_s()
    burn_cpu(0.4)
    body = {"name": "late", "created_at": t0, "pid": os.getpid(), "cpu_s": cpu0}
    with daemon.client() as api:
        run = api.post("/v1/runs", json=body).json()
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        share = (_cpu_s() - cpu0) / (busy_cpu_s() - busy0)  # this process's, as we saw it
        done = api.get(f"/v1/runs/{run['id']}").json()
        energy = api.get(f"/v1/runs/{run['id']}/energy").json()
    device_j = 50.0 * (done["finished_at"] - done["created_at"])  # the constant:50 backend
    assert energy["by_device"][0]["attribution"] == "process"
    # its share of the machine's busy time since t0: about 1 alone, less beside other work
    # (0.197 seen with two valgrinds on the two cores); a daemon that missed the CPU burnt
    # before the create gives next to nothing, far below even that
    assert share > 0.05 and energy["energy_j"] == pytest.approx(share * device_j, rel=0.3), energy


def test_tracker_counts_from_a_start_only_inside_its_busy_readings() -> None:
    tr = CpuShareTracker()
    tr.sample(t=100.0)  # the first busy reading, at 100 on the caller's clock
    cpu0, busy0 = _cpu_s(), busy_cpu_s()
    burn_cpu(0.3)
    me = os.getpid()
    assert tr.track("from-start", me, cpu_s=cpu0, since_t=100.0)
    assert tr.track("before-the-readings", me, cpu_s=cpu0, since_t=50.0)
    assert tr.track("not-its-reading", me, cpu_s=1e9, since_t=100.0)  # more than it has
    assert tr.track("plain", me)
    mine = (_cpu_s() - cpu0) / (busy_cpu_s() - busy0)  # its share, as this test saw it
    shares = tr.sample(t=100.5)
    assert tr.starts == {"from-start": 100.0}
    # its share of the busy CPU is what the machine's load leaves it (0.17 with other work on
    # both cores); the pids tracked from when they were tracked were idle since
    assert shares["from-start"] == pytest.approx(mine, rel=0.3), shares
    for key in ("before-the-readings", "not-its-reading", "plain"):
        assert shares.get(key, 0.0) < mine / 4, shares
    assert tr.cpu_s("from-start") >= 0.25 > tr.cpu_s("plain")
    assert tr.sample(t=100.6) is not None and tr.starts == {}  # only the first share
