"""A starting daemon's readings (h3d.power.early): taken before the sampler exists, then
the sampler's own, so a run that an autostarting profiler began meanwhile is measured
from its start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from h3d.attribution import CpuShareTracker, busy_cpu_s
from h3d.datadir import SAMPLING_NAME
from h3d.energy import EnergyCurve
from h3d.power.base import PowerReading
from h3d.power.early import EarlyReadings
from h3d.power.fake import ConstantBackend
from h3d.power.sampler import PowerSampler
from h3d.storage.engine import Store, session_scope
from h3d.storage.models import PowerSample


class Counted(ConstantBackend):
    """A constant 30 W device with a counter that says whether it was closed."""

    def __init__(self) -> None:
        super().__init__(30.0, counter=True)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _until(cond: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s  # a loaded host reads slower: no fixed sleep
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond(), "timed out"


def test_the_samplers_takes_over_the_readings_of_the_daemons_start(
    store: Store, tmp_path: Path
) -> None:
    device = Counted()
    early = EarlyReadings([device], tmp_path, 0.01)
    marker = tmp_path / SAMPLING_NAME
    _until(lambda: marker.exists() and len(early.busy) >= 10)
    assert json.loads(marker.read_text())["pid"] == os.getpid()

    s = PowerSampler([device], store, interval_s=0.01, flush_interval_s=0.05)
    created = s.now()
    adopted = s.adopt(early.handover(), early.busy)
    assert adopted >= 10
    s.start()
    _until(lambda: s.ticks >= 10)
    s.stop()
    early.stop()
    assert not marker.exists()  # the daemon stopped
    assert device.closed  # by the sampler, which took it over

    with session_scope(store.sessions) as sess:
        rows = sess.execute(
            select(PowerSample.t, PowerSample.power_w, PowerSample.energy_j).order_by(PowerSample.t)
        ).all()
    ts = [r[0] for r in rows]
    assert len(rows) == adopted + s.ticks and sum(t < created for t in ts) == adopted
    # one curve from the first early reading to the last, bridged across the hand-over
    curve = EnergyCurve([tuple(r) for r in rows], max_gap_s=1.0)
    integral = curve.integral(ts[0], ts[-1])
    assert integral.gaps_s == 0 and integral.method == "counter"
    assert integral.energy_j == pytest.approx(30.0 * (ts[-1] - ts[0]), rel=0.02)
    d = s.devices[0]
    assert d.energy_total_j == pytest.approx(30.0 * (ts[-1] - ts[0]), rel=0.02)
    # the start's readings are no idle baseline: the script that started it was running
    assert d.idle_n == s.ticks


def test_a_start_that_never_served_closes_its_devices_and_removes_its_marker(
    tmp_path: Path,
) -> None:
    device = Counted()
    early = EarlyReadings([device], tmp_path, 0.01)
    _until((tmp_path / SAMPLING_NAME).exists)
    early.stop()
    early.stop()  # idempotent
    assert device.closed and not (tmp_path / SAMPLING_NAME).exists()


class Failing:
    """A device whose every read raises, as a driver that is not ready yet."""

    info = ConstantBackend(1.0).info

    def read(self) -> PowerReading:
        raise RuntimeError("not ready")

    def close(self) -> None:
        pass


def test_failing_reads_are_left_to_the_sampler_and_the_marker_still_comes(
    tmp_path: Path,
) -> None:
    early = EarlyReadings([Failing()], tmp_path, 0.01)  # type: ignore[list-item]
    _until((tmp_path / SAMPLING_NAME).exists)
    assert early.handover() == []
    early.stop()


def test_a_run_that_began_during_the_start_gets_its_cpu_share_from_its_start() -> None:
    """The run's process (an autostarting profiler's) began before the sampler's first
    share sample; the start's busy readings let its first share count from its start."""
    work = (
        "import os, sys, time\n"
        "print(sum(os.times()[:4]), time.time(), flush=True)\n"
        "t = time.thread_time() + 0.3\n"
        "while time.thread_time() < t: pass\n"
        "print('done', flush=True); sys.stdin.readline()\n"
    )
    before = (time.time() - 0.05, busy_cpu_s())
    with subprocess.Popen(
        [sys.executable, "-c", work], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as run:
        assert run.stdin is not None and run.stdout is not None
        try:
            cpu0, t0 = map(float, run.stdout.readline().split())
            at_start = (time.time(), busy_cpu_s())  # the start's reading beside its own
            assert run.stdout.readline() == "done\n"
            seeded, bare = CpuShareTracker(), CpuShareTracker()
            seeded.seed([before, at_start])
            for tracker in (seeded, bare):
                assert tracker.track("r", run.pid, cpu_s=cpu0, since_t=t0)
            now = time.time()
            share, unseeded = seeded.sample(now)["r"], bare.sample(now).get("r")
            import psutil

            t = psutil.Process(run.pid).cpu_times()
            used, busy = t.user + t.system - cpu0, busy_cpu_s() - at_start[1]
        finally:
            run.kill()
    assert seeded.starts == {"r": t0} and bare.starts == {}
    assert used >= 0.29
    expected = used / busy
    assert abs(share - min(1.0, expected)) <= 0.2 * expected + 0.05, (share, expected)
    assert unseeded is None  # no busy reading that old: nothing to count it from
