"""The sampler thread and the retention policy, on a real SQLite file."""

from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from h3d import analysis
from h3d.attribution import SPLIT_RANK, busy_cpu_s
from h3d.energy import EnergyCurve
from h3d.errors import StorageUnavailable
from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading
from h3d.power.fake import ConstantBackend
from h3d.power.sampler import PowerSampler
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, session_scope
from h3d.storage.models import Device, PowerSample
from tests.conftest import burn_cpu

T = TypeVar("T")


S = TypeVar("S", bound=Store)


def opened(cls: type[S], tmp_path: Path) -> Iterator[S]:
    """A store of class ``cls`` on a migrated SQLite file, closed after the test."""
    st = cls(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(st.engine)
    yield st
    st.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield from opened(Store, tmp_path)


class Flaky:
    """A device that fails on some reads, as a GPU that falls off the bus would."""

    def __init__(self) -> None:
        self.info = DeviceInfo(name="flaky:0", kind="gpu", source="nvml_power_instant")
        self.n = 0

    def read(self) -> PowerReading:
        self.n += 1
        if 5 <= self.n < 10:
            raise PowerBackendError("GPU is lost")
        if self.n == 12:
            raise KeyError("a vendor library bug")
        return PowerReading(power_w=100.0)

    def close(self) -> None:
        pass


def test_sampler_survives_failing_devices_and_stores_readings(store) -> None:
    flaky = Flaky()
    s = PowerSampler(
        [ConstantBackend(30.0, counter=True), flaky],
        store,
        interval_s=0.01,
        flush_interval_s=0.05,
    )
    s.start()
    deadline = time.monotonic() + 30  # ticks, not a fixed sleep: a loaded host ticks slower
    while flaky.n < 25 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop()
    assert s.devices[1].errors == 6 and s.devices[1].status == "ok"
    with session_scope(store.sessions) as sess:
        n = sess.scalar(select(func.count()).select_from(PowerSample))
        assert n > 2 * 20
    st = s.stats()
    assert st["ticks"] > 20 and st["achieved_hz"] > 30 and st["cpu_fraction_of_core"] < 1.0
    # the running total of a counter device follows its counter
    assert s.devices[0].energy_total_j == pytest.approx(
        30.0 * (s.devices[0].last_t - s.devices[0].recent[0][0]), rel=0.05
    )


def test_retention_thins_old_samples_but_keeps_run_windows(store) -> None:
    with session_scope(store.sessions) as sess:
        dev = repo.upsert_device(
            sess, name="d", kind="cpu", source="estimated", model="", uuid_=None, now=0.0
        )
        repo.add_power_samples(
            sess,
            rows=[
                {"device_id": dev.id, "t": t * 0.1, "power_w": 5.0, "energy_j": None}
                for t in range(2000)
            ],
        )
        run = repo.create_run(
            sess, name="old", config={}, tags=[], pid=None, host=None, n_train=None, now=50.0
        )
        run.finished_at = 190.0  # finished after the cutoff: its window keeps full resolution
        gone = repo.create_run(
            sess, name="older", config={}, tags=[], pid=None, host=None, n_train=None, now=10.0
        )
        gone.finished_at = 20.0  # finished before the cutoff: thinned like idle time
    with session_scope(store.sessions) as sess:
        deleted = repo.prune_power_samples(sess, cutoff=180.0, bucket_s=10.0)
        left = [t for (t,) in sess.execute(select(PowerSample.t).order_by(PowerSample.t))]
    assert [t for t in left if t < 50.0] == [0.0, 10.0, 20.0, 30.0, 40.0]  # one per 10 s bucket
    assert len([t for t in left if 50.0 <= t < 180.0]) == 1300  # the run's window, untouched
    assert [t for t in left if t >= 180.0] == [t * 0.1 for t in range(1800, 2000)]  # recent
    assert deleted == 2000 - len(left)


def _cpu_now(pid: int) -> tuple[float, float]:
    """(the machine's busy CPU seconds, the process's CPU seconds), read now."""
    t = psutil.Process(pid).cpu_times()
    return busy_cpu_s(), t.user + t.system


def _assert_share(share: float, before: tuple[float, float], after: tuple[float, float]) -> None:
    """``share`` is the process's CPU over the machine's busy CPU between two readings
    taken beside the sampler's own (to /proc's 10 ms ticks): a share of the whole machine's
    busy CPU, so it is near 1 for a run alone on an idle machine and lower when other work
    shares the machine, and this test measures which."""
    expected = (after[1] - before[1]) / (after[0] - before[0])
    assert abs(share - min(1.0, expected)) <= 0.2 * expected + 0.05, (share, expected)


def test_a_run_shorter_than_a_share_interval_gets_the_cpu_it_used(store) -> None:
    """The periodic share sample fell while the run's process was still idle (the machine
    busy with other work); the run then worked and ended before the next sample. Ending
    samples its share once more, so its work is counted; before, the idle start stood for
    the whole run (it gave a 0.18 s h3-tune trial 0 J of the device's 35)."""
    work = (
        "import sys, time\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "t = time.thread_time() + 0.3\n"
        "while time.thread_time() < t: pass\n"
        "print('done', flush=True); sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", work], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as run:
        assert run.stdin is not None and run.stdout is not None
        try:
            assert run.stdout.readline() == "ready\n"  # started: its start-up is not the run's
            s = PowerSampler([ConstantBackend(50.0)], store, interval_s=0.01, flush_interval_s=60.0)
            with session_scope(store.sessions) as sess:
                run_id = repo.create_run(
                    sess, name="short", config={}, tags=[], pid=run.pid, host=None,
                    n_train=None, now=s.now(),
                ).id  # fmt: skip
            assert s.run_started(run_id, run.pid)
            s.sample_shares()  # the sampler's first look: the shares' clock starts
            burn_cpu(0.1)  # other work on the machine; the run is idle
            s.sample_shares()  # the periodic sample, as the sampler thread takes it
            before = _cpu_now(run.pid)
            run.stdin.write("go\n")
            run.stdin.flush()
            assert run.stdout.readline() == "done\n"  # the run worked 0.3 s of CPU
            after = _cpu_now(run.pid)
            s.run_ended(run_id)  # ... and ended before the next periodic sample
            s.flush()
        finally:
            run.kill()
    with session_scope(store.sessions) as sess:
        pieces = repo.run_shares(sess, run_id=run_id)[("", -1, "cpu")]
    assert len(pieces) == 2 and pieces[0][1] < 0.2  # the idle start
    assert after[1] - before[1] >= 0.29  # the work: 0.3 s of CPU, measured ...
    _assert_share(pieces[1][1], before, after)  # ... and counted


def test_a_run_whose_process_is_gone_keeps_its_last_measured_share(store) -> None:
    """Ended by the reaper after its process exited: the final interval cannot be read (the
    process's CPU time went with it), so no share of 0 is recorded for it; the last measured
    share stands."""
    work = "import time\nt = time.thread_time() + 0.3\nwhile time.thread_time() < t: pass\n"
    s = PowerSampler([ConstantBackend(50.0)], store, interval_s=0.01, flush_interval_s=60.0)
    with subprocess.Popen([sys.executable, "-c", work]) as run:
        with session_scope(store.sessions) as sess:
            run_id = repo.create_run(
                sess, name="gone", config={}, tags=[], pid=run.pid, host=None, n_train=None,
                now=s.now(),
            ).id  # fmt: skip
        assert s.run_started(run_id, run.pid)
        s.sample_shares()  # the shares' clock starts
        before = _cpu_now(run.pid)
        time.sleep(0.15)
        s.sample_shares()  # the run working
        after = _cpu_now(run.pid)
        run.wait()  # it exits; the reaper then ends its run
    s.run_ended(run_id)
    s.flush()
    with session_scope(store.sessions) as sess:
        pieces = repo.run_shares(sess, run_id=run_id)[("", -1, "cpu")]
    assert len(pieces) == 1 and pieces[0][1] > 0  # not a share of 0 for the last interval
    _assert_share(pieces[0][1], before, after)  # the measured one


def test_gpu_shares_come_from_process_utilisation(store) -> None:
    import os

    class Gpu(ConstantBackend):
        def __init__(self) -> None:
            super().__init__(200.0, name="nvml:GPU-test", counter=True)
            self.info = DeviceInfo(name="nvml:GPU-test", kind="gpu", source="nvml_counter")

        def process_share(self, pids: set[int], since_us: int) -> float | None:
            return 0.75 if os.getpid() in pids else 0.0

    s = PowerSampler([Gpu()], store, interval_s=0.01, flush_interval_s=0.05)
    with session_scope(store.sessions) as sess:
        run_id = repo.create_run(
            sess,
            name="g",
            config={},
            tags=[],
            pid=os.getpid(),
            host=None,
            n_train=None,
            now=s.now(),
        ).id
    assert s.run_started(run_id, os.getpid())
    s.start()
    # the run works, as a training run does (here in a child, as a DataLoader worker would):
    # on an idle machine the busy-CPU counter may not move for a whole 50 ms window, and
    # such a window has no CPU share (0 of 0)
    burn = "import time\nt = time.monotonic() + 0.4\nwhile time.monotonic() < t: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    s.run_ended(run_id)
    s.stop()
    with session_scope(store.sessions) as sess:
        shares = repo.run_shares(sess, run_id=run_id)
    # keyed (node, rank, kind); rank -1: the run's processes on the node together
    assert set(shares) == {("", -1, "cpu"), ("", -1, "gpu:nvml:GPU-test")}
    assert {v for _t, v in shares[("", -1, "gpu:nvml:GPU-test")]} == {0.75}


# --- storing under a failing store: the tick/flush logic, step by step ------------------


class GatedStore(Store):
    """A real store whose writes from the sampler wait at a gate the test opens.

    Only the write seam is faked: ``submit`` (the sampler's flush) parks the job; ``succeed``
    runs the oldest parked job on the real store, ``fail`` fails it as a locked SQLite store
    does. Nothing else changes, so what ``succeed`` stores is really stored.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.parked: list[tuple[Callable[[Session], Any], Future[Any]]] = []

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        fut: Future[T] = Future()
        self.parked.append((fn, fut))
        return fut

    def write(self, fn: Callable[[Session], T]) -> T:  # registration and pruning: straight through
        return super().submit(fn).result()

    def succeed(self) -> None:
        fn, fut = self.parked.pop(0)
        fut.set_result(self.write(fn))

    def fail(self) -> None:
        _fn, fut = self.parked.pop(0)
        fut.set_exception(StorageUnavailable("the store is unavailable: database is locked"))


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedStore]:
    yield from opened(GatedStore, tmp_path)


def stored_ts(st: Store) -> list[float]:
    with st.read() as sess:
        return list(sess.scalars(select(PowerSample.t).order_by(PowerSample.t)))


def test_a_failing_store_holds_at_most_max_unstored_rows_and_drops_one_span(
    gated: GatedStore,
) -> None:
    """The bound counts the write in flight; what is dropped is the oldest, so one span."""
    clock = Clock()
    s = PowerSampler(
        [ConstantBackend(30.0)], gated, interval_s=0.1, clock=clock, max_unstored_rows=5
    )
    t: dict[int, float] = {}  # reading number -> its time stamp

    def tick(k: int, unstored: int) -> None:
        clock.t += 0.1
        t[k] = s.tick()
        assert s.storage()["unstored_rows"] == unstored  # never above max_unstored_rows

    # the store works
    for k in (1, 2, 3):
        tick(k, unstored=k)
    s.flush(wait=False)
    gated.succeed()
    assert s.storage()["unstored_rows"] == 0 and stored_ts(gated) == [t[1], t[2], t[3]]

    # the store is locked: a write of 4, 5 stalls while readings keep coming
    tick(4, unstored=1)
    tick(5, unstored=2)
    s.flush(wait=False)
    for k, n in [(6, 3), (7, 4), (8, 5), (9, 5)]:  # 9 gives up 4, the oldest (in flight)
        tick(k, unstored=n)
    s.flush(wait=False)  # one write in flight at a time: nothing happens
    assert len(gated.parked) == 1
    gated.fail()
    st = s.storage()
    assert st["status"] == "failing" and "locked" in st["reason"]
    assert (st["unstored_rows"], st["dropped_rows"]) == (5, 1)
    assert (st["dropped_t0"], st["dropped_t1"]) == (t[4], t[4])

    s.flush(wait=False)  # retries 5..9, which stalls too
    for k in range(10, 17):  # gives up 5..9 (in flight), then drops 10, 11
        tick(k, unstored=5)
    gated.fail()
    st = s.storage()
    assert (st["unstored_rows"], st["dropped_rows"]) == (5, 8)
    assert (st["dropped_t0"], st["dropped_t1"]) == (t[4], t[11])

    # the lock is gone: a write in flight that was given up on but succeeds is not a gap
    s.flush(wait=False)  # 12..16
    tick(17, unstored=5)  # gives up 12
    gated.succeed()
    tick(18, unstored=2)
    s.flush(wait=False)
    gated.succeed()
    st = s.storage()
    assert st["status"] == "ok" and st["reason"] is None
    assert (st["unstored_rows"], st["dropped_rows"]) == (0, 8)
    assert (st["dropped_t0"], st["dropped_t1"]) == (t[4], t[11])

    # nothing stored before was lost; the dropped readings are one span, 4..11
    assert stored_ts(gated) == [t[k] for k in (1, 2, 3, *range(12, 19))]
    with gated.read() as sess:
        dev = repo.devices(sess)[0]
        samples = repo.power_window(sess, device_id=dev.id, t0=t[1], t1=t[18])
    integral = EnergyCurve(samples, max_gap_s=0.15).integral(t[1], t[18])
    assert integral.gaps_s == pytest.approx(t[12] - t[3])  # the span, to its stored neighbours
    assert integral.energy_j == pytest.approx(30.0 * (t[18] - t[12] + t[3] - t[1]))


@pytest.mark.parametrize("seed", range(5))
def test_any_order_of_ticks_flushes_and_failures_keeps_the_bound_and_the_count(
    gated: GatedStore, seed: int
) -> None:
    """Every reading ends stored or counted as dropped, and the bound holds at every step."""
    rng = random.Random(seed)
    clock = Clock()
    s = PowerSampler(
        [ConstantBackend(30.0), ConstantBackend(5.0, name="constant:1")],
        gated,
        interval_s=0.1,
        clock=clock,
        max_unstored_rows=7,
    )
    taken: list[float] = []
    for _ in range(300):
        op = rng.choices(["tick", "flush", "succeed", "fail"], weights=[6, 2, 2, 2])[0]
        if op == "tick":
            clock.t += 0.1
            taken.append(s.tick())
        elif op == "flush":
            s.flush(wait=False)
        elif gated.parked:
            gated.succeed() if op == "succeed" else gated.fail()
        assert s.storage()["unstored_rows"] <= 7
    while gated.parked or s.storage()["unstored_rows"]:
        if not gated.parked:
            s.flush(wait=False)
        gated.succeed()
    st = s.storage()
    with gated.read() as sess:
        stored = {(d, t) for d, t in sess.execute(select(PowerSample.device_id, PowerSample.t))}
    every = {(d.device_id, t) for t in taken for d in s.devices}
    assert stored <= every and len(stored) == len(every) - st["dropped_rows"]
    missing = sorted(t for _d, t in every - stored)
    if missing:
        assert (st["dropped_t0"], st["dropped_t1"]) == (missing[0], missing[-1])


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``cond`` until it holds: a deadline, never a sleep that guesses the scheduler."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_sampler_survives_a_locked_store_and_reports_the_gap(tmp_path: Path) -> None:
    """The same on a real SQLite file locked by another writer, with the sampler's thread.

    Only facts that hold however the threads are scheduled: the exact bound and the exact
    span are the step-by-step tests' above.
    """
    import sqlite3

    path = tmp_path / "h.db"
    st = Store(f"sqlite:///{path}", busy_timeout_s=0.05)
    migrate.upgrade(st.engine)
    s = PowerSampler(
        [ConstantBackend(30.0)], st, interval_s=0.01, flush_interval_s=0.05, max_unstored_rows=50
    )
    s.devices[0].recent = deque()  # every reading's time stamp, not only the last 600

    def n_stored(after: float = float("-inf")) -> int:
        with st.read() as sess:
            n = sess.scalar(select(func.count()).where(PowerSample.t > after))
        return n or 0

    def storage() -> dict[str, Any]:
        now = s.storage()
        assert now["unstored_rows"] <= 50  # the bound holds at every look
        return now

    s.start()
    wait_for("readings are stored", lambda: n_stored() > 0)
    blocker = sqlite3.connect(path, timeout=0)  # another writer holds SQLite's lock
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        wait_for("storing fails", lambda: storage()["status"] == "failing")
        assert "locked" in storage()["reason"]
        wait_for(  # long enough to show in energy figures that bridge gaps up to 1 s
            "over 1.5 s of readings are dropped",
            lambda: (storage()["dropped_t1"] or 0.0) - (storage()["dropped_t0"] or 0.0) > 1.5,
        )
        assert s.stats()["running"]  # the thread did not die
    finally:
        blocker.rollback()
        blocker.close()
    t_unlocked = s.now()
    wait_for("readings are stored again", lambda: n_stored(after=t_unlocked) > 0)
    assert storage()["status"] == "ok" and s.stats()["running"]
    s.stop()
    st.close()
    after = s.storage()
    assert after["unstored_rows"] == 0
    taken = [t for t, _p, _e in s.devices[0].recent]
    assert len(taken) == s.ticks  # every reading's time stamp is known

    st2 = Store(f"sqlite:///{path}")
    with st2.read() as sess:
        dev = repo.devices(sess)[0]
        samples = repo.power_window(sess, device_id=dev.id, t0=taken[0], t1=taken[-1])
    st2.close()
    stored = [t for t, _p, _e in samples]
    # the readings missing from the store are exactly those reported dropped, and only them
    missing = sorted(set(taken) - set(stored))
    assert set(stored) <= set(taken) and len(missing) == after["dropped_rows"]
    assert (missing[0], missing[-1]) == (after["dropped_t0"], after["dropped_t1"])
    assert stored[0] < missing[0] and stored[-1] > missing[-1]  # stored before and after
    # what could not be stored is a gap, never bridged as if measured
    integral = EnergyCurve(samples, max_gap_s=1.0).integral(taken[0], taken[-1])
    assert integral.gaps_s >= after["dropped_t1"] - after["dropped_t0"]
    assert integral.energy_j == pytest.approx(30.0 * integral.covered_s)


def test_concurrent_runs_never_take_more_than_the_device_before_or_without_shares(
    store: Store,
) -> None:
    """The live per-run energy (/metrics' h3d_run_energy_joules_total): a run with no share
    yet (before the first share sample, or never followed here) used to count the whole
    device, so two runs together counted it twice. A followed run's energy now waits for its
    first measured share and is then counted at it, as the stored share (back-dated to the
    run's start) counts it: before, it took the whole device until then (an idle process
    read 36 J on /metrics, 0 J over REST)."""
    import os

    clock = Clock()
    device = ConstantBackend(100.0)  # power only: 100 W × 0.1 s = 10 J a tick
    s = PowerSampler([device], store, interval_s=0.1, clock=clock)
    s.tick()
    s.run_started("A", os.getpid())
    s.run_started("B", os.getpid())
    for _ in range(5):  # before any share sample: followed runs wait for their shares
        clock.t += 0.1
        s.tick()
    assert s.run_energy_j == {"A": 0.0, "B": 0.0}
    s.run_ended("B")
    s.run_started("C", None)  # not followed here: never gets a share
    for _ in range(5):  # C splits the device with A, whose share is not known yet
        clock.t += 0.1
        s.tick()
    assert s.run_energy_j == pytest.approx({"A": 0.0, "C": 25.0})
    with s._lock:
        s._last_share[("A", "cpu")] = 0.7  # as sample_shares() would set it ...
        s._count_held()  # ... and then count what A drew until then: 100 J x 0.7
    assert s.run_energy_j["A"] == pytest.approx(70.0)
    before = dict(s.run_energy_j)
    for _ in range(5):
        clock.t += 0.1
        s.tick()
    gained = {r: s.run_energy_j[r] - before[r] for r in ("A", "C")}
    assert gained == pytest.approx({"A": 35.0, "C": 15.0})  # 0.7 and what is left
    s.stop()


# --- retention beside the sampler -----------------------------------------------------------


class WatchedStore(Store):
    """A real store that records which thread asked for each write, in order."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writers: list[str] = []

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        self.writers.append(threading.current_thread().name)
        return super().submit(fn)


@pytest.fixture
def watched_store(tmp_path: Path) -> Iterator[WatchedStore]:
    yield from opened(WatchedStore, tmp_path)


def _seed(st: Store, name: str, t0: float, n: int, step: float = 0.1) -> int:
    """A power-only device with ``n`` readings from ``t0``, every ``step``."""
    with session_scope(st.sessions) as sess:
        dev = repo.upsert_device(
            sess, name=name, kind="gpu", source="nvml_power_instant", model="", uuid_=None, now=t0
        )
        rows = [
            {"device_id": dev.id, "t": t0 + k * step, "power_w": 100.0 + (k % 37), "energy_j": None}
            for k in range(n)
        ]
        for i in range(0, n, 20_000):
            repo.add_power_samples(sess, rows=rows[i : i + 20_000])
        return dev.id


def test_a_retention_pass_never_stops_sampling_nor_holds_the_writer(
    watched_store: WatchedStore,
) -> None:
    """A pass over a large store ran in the sampler thread, in one transaction: no reading
    was taken, and no other write (ingest, run create) was stored, until it was done (55 s
    at 3.45 M rows). It now runs on a thread of its own, in short writes, and the sampler's
    readings are taken and stored in between."""
    st = watched_store
    s = PowerSampler(
        [ConstantBackend(30.0, counter=True)],
        st,
        interval_s=0.01,
        flush_interval_s=0.05,
        full_resolution_s=3600.0,
        downsample_s=10.0,
    )
    old = _seed(st, "old", s.now() - 3600.0 - 7000.0, 60_000)
    s.prune_first_s = 0.0  # the first pass at once (5 s after start by default)
    s.prune_slice_rows = 500
    seen: dict[str, Any] = {}
    done = threading.Event()
    prune = s.prune

    def watched() -> int:
        seen["thread"] = threading.current_thread().name
        first, t0, ticks0 = len(st.writers), s.now(), s.ticks
        deleted = prune()
        seen["writers"], t1 = st.writers[first:], s.now()
        seen["ticks"] = s.ticks - ticks0
        with st.read() as sess:  # readings taken during the pass and stored by its end
            seen["stored"] = sess.scalar(
                select(func.count())
                .select_from(PowerSample)
                .where(PowerSample.device_id == s.devices[0].device_id)
                .where(PowerSample.t > t0, PowerSample.t < t1)
            )
        done.set()
        return deleted

    s.prune = watched  # type: ignore[method-assign]
    s.start()
    assert done.wait(120)
    s.stop()
    assert seen["thread"] != "h3d-sampler"
    assert seen["ticks"] > 0 and seen["stored"] > 0
    mine = [w for w in seen["writers"] if w == seen["thread"]]
    assert len(mine) > 60_000 // 500  # one short write per slice
    # the sampler's writes went in between the pass's
    first = seen["writers"].index(seen["thread"])
    last = len(seen["writers"]) - seen["writers"][::-1].index(seen["thread"])
    assert "h3d-sampler" in seen["writers"][first:last]
    with st.read() as sess:
        left = sess.scalar(
            select(func.count()).select_from(PowerSample).where(PowerSample.device_id == old)
        )
    assert left <= 7000 // 10 + 2  # one per 10 s bucket


def test_a_run_running_when_a_pass_went_by_is_thinned_once_it_has_ended(store: Store) -> None:
    """Each pass began at the last one's cutoff, so the samples of a run still running when
    they crossed the cutoff were never looked at again: the store kept any run longer than
    the pass period at full resolution until the daemon restarted."""
    clock = Clock()
    s = PowerSampler([], store, clock=clock, full_resolution_s=100.0, downsample_s=10.0)
    now0 = s.now()
    _seed(store, "d", now0 - 1000.0, 14_000)  # to now0 + 400
    with session_scope(store.sessions) as sess:
        run = repo.create_run(
            sess, name="long", config={}, tags=[], pid=None, host=None, n_train=None, now=now0 - 500
        )
        run_id = run.id
    s.prune()  # cutoff now0 - 100: the run's samples so far are kept, it runs
    clock.t += 100.0
    with session_scope(store.sessions) as sess:
        repo.get_run(sess, run_id=run_id).finished_at = now0 + 50.0
    s.prune()  # cutoff now0: it ended, but less than full_resolution_s ago
    with store.read() as sess:
        before = analysis.run_energy(sess, run=repo.get_run(sess, run_id=run_id), interval_s=0.1)
    clock.t += 200.0
    s.prune()  # cutoff now0 + 200: its full-resolution time has passed
    with store.read() as sess:
        ts = list(sess.scalars(select(PowerSample.t).order_by(PowerSample.t)))
        after = analysis.run_energy(sess, run=repo.get_run(sess, run_id=run_id), interval_s=0.1)
    in_run = [t for t in ts if now0 - 500.0 <= t <= now0 + 50.0]
    assert len(in_run) <= 55 + 4  # one per 10 s bucket, and the samples at its edges
    assert len([t for t in ts if t >= now0 + 200.0]) == 2000  # recent: full resolution
    assert before["by_device"][0]["n_samples"] > 5000
    assert after["device_energy_j"] == pytest.approx(before["device_energy_j"], rel=1e-6)
    assert after["by_device"][0]["gaps_s"] == before["by_device"][0]["gaps_s"] == 0.0


def test_running_runs_taken_up_at_start_write_one_split(daemon_factory: Any) -> None:
    """A daemon that starts with n running runs took each up in turn, and each closed the
    split rows of those before it: n(n+1)/2 rows at every restart (1275 for 50 runs). They
    are now taken up together and split once: n rows."""
    n = 12
    d = daemon_factory()
    with d.client() as c:
        for k in range(n):  # no pid: remote runs, which split the device
            c.post("/v1/runs", json={"name": f"r{k}"}).raise_for_status()
    d.stop()

    def share_rows() -> int:
        with sqlite3.connect(f"file:{d.data_dir / 'h3d.db'}?mode=ro", uri=True) as con:
            return int(con.execute("SELECT count(*) FROM run_shares").fetchone()[0])

    rows = share_rows()
    d.start()
    time.sleep(1.0)  # a few share samples: the split is extended, not written anew
    d.stop()
    assert share_rows() - rows <= 2 * n


class ClockGpu:
    """A GPU drawing ``power_w`` on the test's clock: a counter, and per-process figures
    (``share``: this process's tree's share of SM utilisation, the rest to any other; None:
    NVML has no figure)."""

    def __init__(self, clock: Clock, power_w: float, share: float | None) -> None:
        self.info = DeviceInfo(name="nvml:GPU-clock", kind="gpu", source="nvml_counter")
        self.clock, self.power_w, self.share = clock, power_w, share

    def read(self) -> PowerReading:
        return PowerReading(energy_j=self.power_w * self.clock.t)

    def process_share(self, pids: set[int], since_us: int) -> float | None:
        if self.share is None:
            return None
        return self.share if os.getpid() in pids else 1.0 - self.share

    def close(self) -> None:
        pass


def _runs(st: Store, *ids: str) -> None:
    with session_scope(st.sessions) as sess:
        for rid in ids:
            repo.create_run(
                sess, name=rid, config={}, tags=[], pid=None, host=None, n_train=None, now=0.0,
                run_id=rid,
            )  # fmt: skip


def test_a_run_awaiting_its_gpu_share_gets_no_split_row_beside_it(store: Store) -> None:
    """Run B joins run A before A's first GPU share sample: A (followed, on a GPU with
    per-process figures) awaits its measured share, which is back-dated to the last sample.
    Before, B's start also wrote A a split row of the whole device for that time, so A got
    1.0 on top of its 0.75 there and the two runs more than the device."""
    _runs(store, "A", "B")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        clock = Clock()
        gpu = ClockGpu(clock, 300.0, 0.75)
        s = PowerSampler([gpu], store, interval_s=0.1, clock=clock)
        s.tick()
        s.sample_shares()  # the first share time, a little before A starts
        clock.t += 0.05
        assert s.run_started("A", os.getpid())
        for _ in range(3):
            clock.t += 0.1
            s.tick()
        assert s.run_started("B", child.pid)  # before A's first share sample
        for _ in range(3):
            clock.t += 0.1
            s.tick()
        s.sample_shares()
        for _ in range(3):
            clock.t += 0.1
            s.tick()
        s.run_ended("A")
        s.run_ended("B")
        s.flush()
        s.stop()
    finally:
        child.kill()
        child.wait()
    kind = "gpu:nvml:GPU-clock"
    with store.read() as sess:
        rows = {rid: repo.run_share_rows(sess, run_id=rid)[("", -1, kind)] for rid in "AB"}
    assert [v for _a, _b, v in rows["A"]] == pytest.approx([0.75] * len(rows["A"])), rows["A"]
    assert [v for _a, _b, v in rows["B"]] == pytest.approx([0.25] * len(rows["B"])), rows["B"]
    for rid in "AB":  # no two rows of one run cover the same time
        spans = sorted((a, b) for a, b, _v in rows[rid])
        assert all(
            b0 <= a1 + 1e-9 for (_a0, b0), (a1, _b1) in zip(spans, spans[1:], strict=False)
        ), spans


def test_a_gpu_share_nvml_cannot_measure_is_split_from_the_runs_start(store: Store) -> None:
    """The other side of the rule above: a followed run whose GPU share NVML cannot say
    gets the whole device while alone and splits it with the runs beside it after."""
    _runs(store, "A", "B")
    clock = Clock()
    s = PowerSampler([ClockGpu(clock, 300.0, None)], store, interval_s=0.1, clock=clock)
    s.tick()
    s.sample_shares()
    assert s.run_started("A", os.getpid())
    t_a = s.now()
    clock.t += 0.3
    s.run_started("B", None)
    t_b = s.now()
    clock.t += 0.3
    s.sample_shares()
    s.run_ended("A")
    s.run_ended("B")
    s.flush()
    s.stop()
    with store.read() as sess:
        rows = repo.run_share_rows(sess, run_id="A")[("", SPLIT_RANK, "gpu:nvml:GPU-clock")]
    assert [(a, b, v) for a, b, v in rows][:2] == [
        (pytest.approx(t_a), pytest.approx(t_b), 1.0),
        (pytest.approx(t_b), pytest.approx(t_b + 0.3), 0.5),
    ], rows


class SlowRead:
    """A device whose read takes ``delay_s`` of the test's clock (a busy driver)."""

    def __init__(self, clock: Clock, delay_s: float) -> None:
        self.info = DeviceInfo(name="slow:0", kind="gpu", source="nvml_counter")
        self.clock, self.delay_s = clock, delay_s

    def read(self) -> PowerReading:
        self.clock.t += self.delay_s
        return PowerReading(energy_j=50.0 * self.clock.t)

    def close(self) -> None:
        pass


def test_each_reading_is_stamped_at_its_own_read(store: Store) -> None:
    """A device read after a slow one is stamped when it was read, not at the tick's start:
    before, its counter was put 0.3 s early, so a power change at a run's edge (300 W −
    50 W here) moved 75 J across it. ``mark()`` still returns the tick's start."""
    clock = Clock()
    fast = ClockGpu(clock, 100.0, None)
    s = PowerSampler([SlowRead(clock, 0.3), fast], store, interval_s=0.1, clock=clock)
    start = s.now()
    assert s.mark() - start == pytest.approx(0.0, abs=1e-9)
    slow_t, fast_t = (d.recent[-1][0] for d in s.devices)
    assert fast_t - start == pytest.approx(0.3)  # read once the slow one returned
    assert slow_t - start == pytest.approx(0.15)  # the middle of its read
    s.stop()


def test_an_energy_only_device_gets_an_idle_baseline_from_its_counter(store: Store) -> None:
    """RAPL zones (and GPUs without instant power) report energy only: the idle baseline
    is the median of the counter's steps over time. Before, it needed power readings, so
    such devices never got one and energy above idle stayed null forever."""
    clock = Clock()
    s = PowerSampler(
        [ClockGpu(clock, 40.0, None)], store, interval_s=0.1, idle_min_s=1.0, clock=clock
    )
    for _ in range(22):  # 21 counter steps: at least 20 idle readings
        s.tick()
        clock.t += 0.1
    s.flush()
    s.stop()
    assert s.devices[0].idle_power_w == pytest.approx(40.0)
    with store.read() as sess:
        dev = sess.get(Device, s.devices[0].device_id)
        assert dev is not None and dev.idle_power_w == pytest.approx(40.0)


def test_a_split_gpu_share_is_labelled_whole_device_not_process(store: Store) -> None:
    """Run A (followed) on a GPU without per-process figures, run B (no pid) joining it:
    A gets the whole device alone and half of it beside B, labelled ``whole_device``.
    Before, the split rows were stored as measured ones, so the figure read ``process``
    although no process share of the GPU was measured."""
    clock = Clock()
    s = PowerSampler([ClockGpu(clock, 300.0, None)], store, interval_s=0.1, clock=clock)
    s.tick()
    s.sample_shares()

    def create(rid: str) -> None:
        with session_scope(store.sessions) as sess:
            repo.create_run(
                sess, name=rid, config={}, tags=[], pid=None, host=None, n_train=None,
                now=s.now(), run_id=rid,
            )  # fmt: skip
        s.mark()

    def finish(rid: str) -> None:
        with session_scope(store.sessions) as sess:
            run = repo.get_run(sess, run_id=rid)
            run.finished_at = s.now()
            run.status = "finished"
        s.mark()
        s.run_ended(rid)

    create("A")
    assert s.run_started("A", os.getpid())
    for _ in range(3):
        clock.t += 0.1
        s.tick()
    create("B")
    s.run_started("B", None)
    for _ in range(3):
        clock.t += 0.1
        s.tick()
    s.sample_shares()
    finish("A")
    finish("B")
    s.flush()
    s.stop()
    with session_scope(store.sessions) as sess:
        e = analysis.run_energy(sess, run=repo.get_run(sess, run_id="A"), interval_s=0.1)
    gpu = e["by_device"][0]
    assert gpu["energy_j"] == pytest.approx(300.0 * 0.3 + 0.5 * 300.0 * 0.3)
    assert gpu["attribution"] == "whole_device"


def test_the_idle_baseline_waits_for_h3d_idle_min_s_beyond_the_readings_kept(
    store: Store,
) -> None:
    """H3D_IDLE_MIN_S of 40 s at a 0.01 s period is 4000 readings without a run, more than
    a device keeps (IDLE_KEPT, 3000): the baseline waits for all of them. Before, the count
    needed was capped at the readings kept, so it was set after 30 s."""
    clock = Clock()
    s = PowerSampler([ConstantBackend(30.0)], store, interval_s=0.01, idle_min_s=40.0, clock=clock)
    for _ in range(3999):
        s.tick()
        clock.t += 0.01
    s.flush()
    assert s.devices[0].idle_power_w is None  # 39.99 s of readings: not yet
    s.tick()
    s.flush()
    s.stop()
    assert s.devices[0].idle_power_w == pytest.approx(30.0)


def test_an_unknown_granularity_is_stored_as_unknown_not_as_the_sampling_period(
    store: Store,
) -> None:
    """docs/power.md: an unmeasured granularity is None, never a guessed number. Before, the
    device row (which the energy breakdown reads) held the sampling period in its place, so
    a run's energy said 0.1 s where /v1/devices said null."""

    class Measured(ConstantBackend):
        def __init__(self) -> None:
            super().__init__(50.0, name="measured:0")
            self.info = dataclasses.replace(self.info, granularity_s=0.5)

    s = PowerSampler([ConstantBackend(10.0), Measured()], store, interval_s=0.1)
    with store.read() as sess:
        stored = {d.name: d.granularity_s for d in sess.scalars(select(Device))}
    s.stop()
    assert stored == {"constant:0": None, "measured:0": 0.5}


class Wall:
    """A wall clock the test moves (a suspend moves it and not the monotonic one)."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_after_a_suspend_the_stamps_follow_the_wall_clock_and_the_sleep_is_a_gap(
    store: Store,
) -> None:
    """The monotonic clock stands still while the machine sleeps: the stamps are re-anchored
    to the wall clock, and the hour asleep is a gap (no energy bridged across it). Before,
    every later reading was stamped an hour in the past, so no run after the suspend found
    any. A wall clock stepped back (NTP) never moves the stamps back."""
    clock, wall = Clock(), Wall()
    s = PowerSampler([ConstantBackend(10.0)], store, interval_s=0.1, clock=clock, wall=wall)

    def tick(dt: float, slept: float = 0.0) -> float:
        clock.t += dt
        wall.t += dt + slept
        return s.tick()

    before = [tick(0.1) for _ in range(5)]
    assert before[-1] == pytest.approx(wall.t)
    energy = s.devices[0].energy_total_j
    after = [tick(0.1, slept=3600.0)] + [tick(0.1) for _ in range(5)]
    assert after[0] == pytest.approx(wall.t - 0.5) and after[-1] == pytest.approx(wall.t)
    assert s.devices[0].energy_total_j == pytest.approx(energy + 5 * 0.1 * 10.0)  # no bridge
    wall.t -= 30.0  # an NTP step back: the monotonic clock drives on
    stepped = tick(0.1)
    assert stepped == pytest.approx(after[-1] + 0.1)
    s.flush()
    s.stop()
    with store.read() as sess:
        samples = [
            (t, p, e)
            for t, p, e in sess.execute(
                select(PowerSample.t, PowerSample.power_w, PowerSample.energy_j).order_by(
                    PowerSample.t
                )
            )
        ]
    integral = EnergyCurve(samples, max_gap_s=1.0).integral(before[0], stepped)
    assert integral.gaps_s == pytest.approx(3600.1)
    assert integral.energy_j == pytest.approx(10.0 * (0.4 + 0.6))
