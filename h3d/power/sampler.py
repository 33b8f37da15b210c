"""The sampler thread: reads every backend each period and stores the readings in batches.

Storage errors never stop it: readings wait in memory and are retried at every flush. After
every tick at most ``max_unstored_rows`` readings wait, counting the write in flight; beyond
that the oldest are given up (see ``_trim``), so an outage leaves one contiguous gap. What had
to be dropped is missing from the store, so the energy integration reports it as a gap, and
``storage()`` (shown in ``/v1/devices``) says what happened. Readings not stored yet are
visible to queries through ``unstored()`` (the store's read overlay), so reads never wait for
a write.

Time: each tick is stamped ``wall0 + (monotonic() - mono0)``: a Unix time that the
monotonic clock drives, so NTP steps do not bend the integration, and that still lines up
with the client's wall-clock batch timestamps. The monotonic clock stands still while the
machine sleeps (a laptop's lid, a suspend): when a tick finds the wall clock ahead by more
than a gap (``max_gap``), the stamps are re-anchored to it, so the time asleep is a gap in
every device's energy and the runs after it still find their readings.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from h3d.attribution import SPLIT_RANK, CpuShareTracker
from h3d.energy import max_gap
from h3d.power.base import PowerBackend, PowerBackendError, PowerReading
from h3d.power.early import EarlyReading
from h3d.storage import repository as repo
from h3d.storage.engine import Store
from h3d.storage.models import Device, Run

logger = logging.getLogger(__name__)


#: Power readings a device keeps from times without a run, for its idle baseline.
IDLE_KEPT = 3000


@dataclass
class DeviceState:
    backend: PowerBackend
    device_id: int
    status: str = "ok"  # ok | degraded
    reason: str | None = None
    last_t: float | None = None
    last_power_w: float | None = None
    last_energy_j: float | None = None
    errors: int = 0
    # Energy since the daemon started (Prometheus `_total`): counter deltas where the
    # device has a counter, else the trapezoid between consecutive readings.
    energy_total_j: float = 0.0
    recent: deque[tuple[float, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=600)
    )
    # Power readings taken while no run was active: the idle baseline is their median,
    # once ``idle_n`` (all such readings so far, kept or not) reaches H3D_IDLE_MIN_S of them.
    idle: deque[float] = field(default_factory=lambda: deque(maxlen=IDLE_KEPT))
    idle_n: int = 0
    idle_power_w: float | None = None


class Followed(NamedTuple):
    """The local processes a sampler follows (:meth:`PowerSampler.followed`)."""

    #: runs with a followed process that still runs (any rank's): the reaper takes each as
    #: the run's heartbeat
    live: set[str]
    #: active single-process runs whose followed process has exited, or was gone when the
    #: daemon started (a distributed run's ranks finish one by one; its rows say when)
    exited_runs: list[str]
    #: ranks of distributed runs whose followed process has exited (or was gone when the
    #: daemon started), as (run id, rank): a rank that ends without its "finished" (SIGTERM
    #: from torchrun after another rank failed, SIGKILL, the OOM killer)
    exited_ranks: list[tuple[str, int]]


@dataclass
class StorageHealth:
    """How storing the readings goes: ``ok``, or ``failing`` with the last error."""

    status: str = "ok"
    reason: str | None = None
    failures: int = 0
    dropped_rows: int = 0
    # the span of readings dropped for good (they show as gaps in energy figures)
    dropped_t0: float | None = None
    dropped_t1: float | None = None


class PowerSampler:
    def __init__(
        self,
        backends: Sequence[PowerBackend],
        store: Store,
        *,
        interval_s: float = 0.1,
        flush_interval_s: float = 1.0,
        idle_min_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] | None = None,
        full_resolution_s: float = 7 * 86400.0,
        downsample_s: float = 10.0,
        prune_every_s: float = 600.0,
        prune_first_s: float = 5.0,
        node: str = "",
        max_unstored_rows: int = 200_000,
    ) -> None:
        self.node = node  # stamped on this daemon's devices and run shares
        self.full_resolution_s = full_resolution_s
        self.downsample_s = downsample_s
        self.prune_every_s = prune_every_s
        self.prune_first_s = prune_first_s  # the first pass, after start
        self.prune_slice_rows = 5000  # samples of one device thinned per transaction
        self._pruned_to = float("-inf")  # the last complete pass's cutoff
        # the runs whose samples that pass kept at full resolution (id: start): once one is
        # no longer kept so, a pass thins from its start
        self._kept_runs: dict[str, float] = {}
        self._shares = CpuShareTracker()
        self._share_t: float | None = None
        self._pending_shares: list[dict[str, Any]] = []
        # (run id, rank or None): one process tree each; a run's ranks on this node together
        # make its share of this node's devices
        self._active_runs: set[tuple[str, int | None]] = set()
        self.interval_s = interval_s
        self.flush_interval_s = flush_interval_s
        # samples without a run before a device's idle baseline is set (at least 20); the
        # baseline is the median of the last IDLE_KEPT of them
        self._idle_min_samples = max(20, math.ceil(idle_min_s / interval_s))
        self._store = store
        self.max_unstored_rows = max_unstored_rows
        self.health = StorageHealth()
        self._inflight: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        # how many of the write in flight's first readings were given up on (see _trim)
        self._inflight_given_up = 0
        self._dropped_since_stored = 0  # readings dropped since the last write that worked
        self._settled = threading.Event()  # set while no write is in flight
        self._settled.set()
        # Energy attributed to each active run since this daemon began following it: the
        # running totals /metrics serves without re-integrating history. A run is in it
        # once a device measured energy while it ran (before that its energy is unknown).
        self.run_energy_j: dict[str, float] = {}
        # per (run, kind): energy a followed run drew before its first share of that kind
        # was measured, counted at that share once it is (the stored share is back-dated
        # to the run's start, so /metrics and the stored figure agree)
        self._held_j: dict[tuple[str, str], float] = {}
        # runs (or ranks) whose local process was gone when they were started here (a
        # daemon restarted after its training process died): no share, and the reaper's
        # exit grace rather than its timeout
        self._gone_at_start: set[tuple[str, int | None]] = set()
        self.run_followed_since: dict[str, float] = {}
        self._last_share: dict[tuple[str, str], float] = {}
        # per run: the CPU union rows stored for it here, newest last, [t0, t1, share before
        # the cap at 1]: a rank whose share is back-dated to before the last of them (its
        # create arrived late) is added to the rows it covers, which are stored again
        self._union_rows: dict[str, deque[list[float]]] = {}
        # per (run, kind): the open row of a run whose share of that kind is not measured
        # (not followed here, or a GPU without per-process figures), [t0, t1, share],
        # extended while its share holds: a few rows per run, one per change of the split
        self._split_rows: dict[tuple[str, str], list[float]] = {}
        self._split_start: dict[str, float] = {}  # where a run's first split row begins
        # (run, GPU kind): followed runs whose GPU share a sample could not measure (NVML
        # had no figure for its processes): until then their share is awaited, and their
        # split rows wait in _awaited_rows: a measured share (back-dated to the last sample)
        # drops them, a sample that cannot measure it stores them
        self._unmeasured: set[tuple[str, str]] = set()
        self._awaited_rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._clock = clock
        # the wall clock the stamps are re-anchored to after a suspend: time.time with the
        # monotonic clock; none with another clock (a test's, which is the time then)
        self._wall = wall if wall is not None or clock is not time.monotonic else time.time
        # (wall0, mono0), replaced as one (by _follow_wall_clock, under the tick lock)
        self._anchor = (time.time() if self._wall is None else self._wall(), clock())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._retention: threading.Thread | None = None
        self._intervals: deque[float] = deque(maxlen=1000)
        self._cpu_s = 0.0
        self._started_mono: float | None = None
        self.ticks = 0
        self.devices: list[DeviceState] = []
        now = self.now()

        def register(s: Session) -> list[int]:
            ids = []
            for b in backends:
                dev = repo.upsert_device(
                    s,
                    name=b.info.name,
                    kind=b.info.kind,
                    source=b.info.source,
                    model=b.info.model,
                    uuid_=b.info.uuid,
                    now=now,
                    # unknown stays unknown (None): never the sampling period in its place
                    granularity_s=b.info.granularity_s,
                    node=node,
                )
                # an idle baseline from an earlier session was the machine as it was then
                # (another load, another TDP setting): this session measures its own
                dev.idle_power_w = None
                ids.append(dev.id)
            return ids

        for b, dev_id in zip(backends, store.write(register), strict=True):
            self.devices.append(DeviceState(backend=b, device_id=dev_id))

    def now(self) -> float:
        """The sampler's clock: Unix seconds driven by the monotonic clock (re-anchored to
        the wall clock by the first tick after the machine slept: :meth:`_follow_wall_clock`)."""
        wall0, mono0 = self._anchor
        return wall0 + (self._clock() - mono0)

    def _follow_wall_clock(self) -> None:
        """Re-anchor the clock when the wall clock is ahead by more than a gap (the machine
        slept); once a tick, under the tick lock, not at every reading's stamp."""
        if self._wall is None:
            return
        wall, mono = self._wall(), self._clock()
        wall0, mono0 = self._anchor
        ahead = wall - (wall0 + (mono - mono0))
        if ahead > max_gap(self.interval_s):
            logger.info(
                "the wall clock is %.1f s ahead of the sampler's (the machine slept?): "
                "re-anchored; the time between is a gap in energy",
                ahead,
            )
            self._anchor = (wall, mono)

    def start(self) -> None:
        if self._thread is None and self.devices:
            self._thread = threading.Thread(target=self._run, name="h3d-sampler", daemon=True)
            self._thread.start()
            # retention on a thread of its own: a pass over a large store must not hold up
            # a single reading
            self._retention = threading.Thread(
                target=self._retain, name="h3d-retention", daemon=True
            )
            self._retention.start()

    def _retain(self) -> None:
        wait = self.prune_first_s  # the first pass soon after start
        while not self._stop.wait(wait):
            try:
                self.prune()
            except Exception:  # nothing may end the retention thread
                logger.exception("retention pass failed; will retry")
            wait = self.prune_every_s

    def _run(self) -> None:
        self._started_mono = self._clock()
        self.sample_shares()  # the first busy reading: a run that starts now can count from it
        next_tick = self._started_mono
        last_flush = next_tick
        prev: float | None = None
        while not self._stop.is_set():
            c0 = time.thread_time()
            mono = self._clock()
            if prev is not None:
                self._intervals.append(mono - prev)
            prev = mono
            try:
                self.tick()
                if mono - last_flush >= self.flush_interval_s:
                    self.sample_shares()
                    self.flush(wait=False)
                    last_flush = mono
            except Exception:  # nothing may end the sampling thread
                logger.exception("sampler step failed; sampling goes on")
            self._cpu_s += time.thread_time() - c0
            next_tick += self.interval_s
            delay = next_tick - self._clock()
            if delay < -self.interval_s:  # fell behind (suspend, overload): do not burst
                next_tick = self._clock()
                delay = 0.0
            self._stop.wait(max(0.0, delay))

    def mark(self) -> float:
        """Read every device now (off-schedule) and return the time stamped on the readings.

        Called when a run starts or ends: a counter read at the window's exact edge needs no
        interpolation, which is what makes counter-based energy exact to the counter's
        resolution rather than to the sampling period.
        """
        return self.tick()

    def tick(self) -> float:
        with self._tick_lock:
            return self._tick()

    def _tick(self) -> float:
        """Read every device; return the tick's start. Each reading is stamped at its own
        read (the middle of the call): a device read after a slow one (a busy driver, a GPU
        falling off the bus) is not back-dated to the tick's start, which put the power
        change between the two times into the wrong side of a run's edge."""
        self._follow_wall_clock()
        t_tick = self.now()
        rows = []
        for d in self.devices:
            before = self.now()
            try:
                r = d.backend.read()
            except PowerBackendError as exc:
                d.errors += 1
                if d.status != "degraded":
                    logger.warning("device %s degraded: %s", d.backend.info.name, exc)
                d.status, d.reason = "degraded", str(exc)
                continue
            except Exception as exc:  # a vendor library must not stop the sampler
                d.errors += 1
                if d.status != "degraded":
                    logger.exception("device %s raised; marked degraded", d.backend.info.name)
                d.status, d.reason = "degraded", f"{type(exc).__name__}: {exc}"
                continue
            t = 0.5 * (before + self.now())
            if d.status != "ok":
                logger.info("device %s recovered", d.backend.info.name)
            d.status, d.reason = "ok", None
            rows.append(self._take(d, t, r))
        self.ticks += 1
        with self._lock:
            self._pending.extend(rows)
            self._trim()
        return t_tick

    def _take(
        self, d: DeviceState, t: float, r: PowerReading, *, idle: bool = True
    ) -> dict[str, Any]:
        """Count device ``d``'s reading ``r`` at ``t``: its energy since the last one (the
        device's, the active runs'), the idle baseline's reading (``idle``, while no run is
        active); the row to store."""
        inc = self._increment(d, t, r.power_w, r.energy_j)
        if inc is not None:
            d.energy_total_j += inc
            if self._active_runs:
                self._add_to_runs(d, inc)
        if idle and not self._active_runs:
            idle_w = r.power_w
            if idle_w is None and inc is not None and r.energy_j is not None:
                # an energy-only device (RAPL, a GPU without instant power): its power
                # over the counter's step since the last reading (no gap: inc is set)
                dt = t - cast(float, d.last_t)
                idle_w = inc / dt if dt > 0 else None
            if idle_w is not None:
                d.idle.append(idle_w)
                d.idle_n += 1
        d.last_t, d.last_power_w, d.last_energy_j = t, r.power_w, r.energy_j
        d.recent.append((t, r.power_w, r.energy_j))
        return {"device_id": d.device_id, "t": t, "power_w": r.power_w, "energy_j": r.energy_j}

    def adopt(
        self, readings: Iterable[EarlyReading], busy: Iterable[tuple[float, float]] = ()
    ) -> int:
        """Take over the readings ``h3d serve`` took before this sampler existed
        (:mod:`h3d.power.early`: device index, monotonic time, reading), oldest first, as
        if this sampler had taken them: stored, and counted as energy, but not towards the
        idle baseline; and ``busy``, the machine's busy CPU seconds then (monotonic time,
        seconds), from which a run that began meanwhile gets its CPU share. Before
        :meth:`start`, on the monotonic clock. Returns how many readings."""
        wall0, mono0 = self._anchor
        rows = []
        with self._lock:
            self._shares.seed([(wall0 + (mono - mono0), b) for mono, b in busy])
        with self._tick_lock:
            for i, mono, r in readings:
                rows.append(self._take(self.devices[i], wall0 + (mono - mono0), r, idle=False))
        with self._lock:
            self._pending.extend(rows)
            self._trim()
        return len(rows)

    def _increment(
        self, d: DeviceState, t: float, power_w: float | None, energy_j: float | None
    ) -> float | None:
        """Energy since the device's last reading; None when nothing was measured."""
        if d.last_t is None or t - d.last_t > max(1.0, 10 * self.interval_s):
            return None  # first reading, or a gap: nothing is bridged
        if energy_j is not None and d.last_energy_j is not None:
            return max(0.0, energy_j - d.last_energy_j)
        if power_w is not None and d.last_power_w is not None:
            return 0.5 * (power_w + d.last_power_w) * (t - d.last_t)
        return None

    def _rest(self, runs: set[str], kind: str) -> float:
        """What a run with no share of ``kind`` gets (the lock is held): an even part of
        what the runs with one leave, so together they never take more than the device."""
        known = [self._last_share[(r, kind)] for r in runs if (r, kind) in self._last_share]
        unknown = len(runs) - len(known)
        return max(0.0, 1.0 - sum(known)) / unknown if unknown else 0.0

    def _add_to_runs(self, d: DeviceState, inc: float) -> None:
        info = d.backend.info
        kind = f"gpu:{info.name}" if info.kind == "gpu" else "cpu"
        with self._lock:
            runs = {r for r, _rank in self._active_runs}
            # a run followed here whose share of the device will be measured (its CPU, or a
            # GPU with per-process figures) but is not yet: its energy waits for that share
            measurable = kind == "cpu" or getattr(d.backend, "process_share", None) is not None
            awaiting = (
                {k[0] for k in cast(list[tuple[str, int | None]], self._shares.tracked)}
                if measurable
                else set()
            )
            # a run with no share yet and none to wait for (not followed here, or a GPU
            # without per-process figures) splits what the others leave
            rest = self._rest(runs, kind)
            for rid in runs:
                share = self._last_share.get((rid, kind))
                if share is None and rid in awaiting:
                    self._held_j[(rid, kind)] = self._held_j.get((rid, kind), 0.0) + inc
                    self.run_energy_j.setdefault(rid, 0.0)
                    continue
                share = rest if share is None else share
                self.run_energy_j[rid] = self.run_energy_j.get(rid, 0.0) + inc * share

    def _count_held(self) -> None:
        """Count the energy held for runs awaiting a share (the lock is held): at the share
        just measured, which the stored rows back-date to the run's start. A GPU that could
        not say this time splits as ``_add_to_runs`` does; a CPU share not measured yet (no
        busy time on the machine) keeps waiting."""
        runs = {r for r, _rank in self._active_runs}
        for (rid, kind), joules in list(self._held_j.items()):
            share = self._last_share.get((rid, kind))
            if share is None:
                if kind == "cpu":
                    continue
                share = self._rest(runs, kind)
            del self._held_j[(rid, kind)]
            self.run_energy_j[rid] = self.run_energy_j.get(rid, 0.0) + joules * share

    # --- runs: attribution and the idle baseline ----------------------------------------

    def run_started(
        self,
        run_id: str,
        pid: int | None,
        rank: int | None = None,
        *,
        cpu_s: float | None = None,
        since_t: float | None = None,
        split: bool = True,
    ) -> bool:
        """A run (or one rank of it) is active; follow its process tree if it runs here.
        True if followed. ``cpu_s`` at ``since_t``: its process's CPU time when it began
        (see :meth:`CpuShareTracker.track`). ``split`` False: the split rows the runs
        already active would get up to now are not written; for runs taken up together
        (the daemon's start, before sampling begins), so that the first share sample writes
        one split of all of them: n rows, not one split per run taken up (n(n+1)/2)."""
        with self._lock:
            self._gone_at_start.discard((run_id, rank))  # resumed by a new process
            now = self.now()
            new = all(rid != run_id for rid, _rank in self._active_runs)
            # where a split row of the run would begin: at its start (its window's), but
            # never before the rows already stored for the others (they hold to there)
            start = now if since_t is None else min(now, since_t)
            start = max([start, *(row[1] for row in self._split_rows.values())])
            if self._active_runs and split:  # the split changes: the rows so far end here
                self._pending_shares.extend(self._split(start if new else now, sharing=new))
            if new:
                self._split_start[run_id] = start
            self._active_runs.add((run_id, rank))
            self.run_followed_since.setdefault(run_id, now)
            key = (run_id, rank)
            return pid is not None and self._shares.track(key, pid, cpu_s=cpu_s, since_t=since_t)

    def run_gone(self, run_id: str, rank: int | None = None) -> None:
        """A running run of the store (or one rank of it) whose local process was gone when
        this daemon started (it died while no daemon ran): not active here, so it takes no
        share of a device, as a run followed here gets none once its process exits; and
        :meth:`followed` names it as exited, for the reaper's exit grace. Left active, unfollowed,
        it split every device with the runs that came after, up to all of it."""
        with self._lock:
            self._gone_at_start.add((run_id, rank))

    def run_ended(self, run_id: str, rank: int | None = None) -> None:
        """The run ended here: one rank of it, or (``rank`` None) all of it.

        Its share of each device is sampled once more first, up to now, while its processes
        live: otherwise the share of the last whole interval would stand for the time since,
        and a run shorter than an interval would get the share measured while it was still
        starting (nothing, often). A run whose process is gone (the reaper's case) keeps
        that extrapolation: its last CPU time cannot be read any more.
        """
        with self._lock:
            keys = cast(list[tuple[str, int | None]], self._shares.tracked)
            mine = {k for k in keys if k[0] == run_id and (rank is None or k[1] == rank)}
            # a process already gone cannot be read: its last interval would read as 0
            live = mine - set(self._shares.gone()) if mine else mine
        end = self._finished_at(run_id) if rank is None else None
        if live:
            self.sample_shares(split_until=end)
        with self._lock:
            # the split held to the run's end (its window's, before this call's latency)
            t = self.now() if end is None else min(self.now(), end)
            t = max([t, *(row[1] for row in self._split_rows.values())])
            self._pending_shares.extend(self._split(t))
            self._gone_at_start -= {
                k for k in self._gone_at_start if k[0] == run_id and rank in (None, k[1])
            }
            keys = [k for k in self._active_runs if k[0] == run_id]
            for key in keys if rank is None else [(run_id, rank)]:
                self._active_runs.discard(key)
                self._shares.untrack(key)
            if any(k[0] == run_id for k in self._active_runs):
                return  # other ranks of the run are still active here
            self.run_energy_j.pop(run_id, None)
            self.run_followed_since.pop(run_id, None)
            self._union_rows.pop(run_id, None)
            self._split_start.pop(run_id, None)
            for share_key in [k for k in self._last_share if k[0] == run_id]:
                del self._last_share[share_key]
            for held_key in [k for k in self._held_j if k[0] == run_id]:
                del self._held_j[held_key]
            for split_key in [k for k in self._split_rows if k[0] == run_id]:
                del self._split_rows[split_key]
            self._unmeasured -= {k for k in self._unmeasured if k[0] == run_id}
            # its share was never sampled (its process was gone): the split stands
            for awaited_key in [k for k in self._awaited_rows if k[0] == run_id]:
                self._pending_shares.extend(self._awaited_rows.pop(awaited_key))

    def _finished_at(self, run_id: str) -> float | None:
        """When the run ended, as stored; None if unknown. Read only where it splits a
        device with others (one indexed read per run that ends)."""
        with self._lock:
            if not self._split_rows and len({r for r, _rank in self._active_runs}) < 2:
                return None
        try:
            with self._store.read() as s:
                run = s.get(Run, run_id)
                return run.finished_at if run is not None else None
        except Exception:  # the figure is then cut at now: never fail a run's end for it
            logger.debug("cannot read when run %s ended", run_id, exc_info=True)
            return None

    @property
    def active_runs(self) -> set[str]:
        with self._lock:
            return {rid for rid, _rank in self._active_runs}

    def followed(self) -> Followed:
        """The local processes this sampler follows, as the reaper reads them once a pass
        (one look at each process, ``CpuShareTracker.gone``)."""
        with self._lock:
            tracked = cast(list[tuple[str, int | None]], self._shares.tracked)
            gone = cast(list[tuple[str, int | None]], self._shares.gone())
            gone_set = set(gone)
            exited = dict.fromkeys([*gone, *self._gone_at_start])
            return Followed(
                live={key[0] for key in tracked if key not in gone_set},
                exited_runs=[rid for rid, rank in exited if rank is None],
                exited_ranks=[(rid, rank) for rid, rank in exited if rank is not None],
            )

    def sample_shares(self, *, split_until: float | None = None) -> None:
        """Each tracked run's share since the last call, as stored intervals: of the CPU
        (process CPU time), and of each GPU whose backend reports per-process utilisation.

        Rank -1 rows hold the union of a run's processes on this node: a device is counted
        once per run however many of its ranks share it. A distributed run also gets one row
        per rank (its part of the union, over its own interval), for the per-rank breakdown.
        Runs whose share is not measured split what the measured ones leave (see ``_split``).
        """
        t = self.now()
        with self._lock:
            shares = self._shares.sample(t)
            starts = cast(dict[tuple[str, int | None], float], self._shares.starts)
            t0, self._share_t = self._share_t, t
            if t0 is None:
                return
            by_run: dict[str, dict[int | None, float]] = {}
            for key, share in shares.items():
                rid, rank = cast(tuple[str, int | None], key)
                by_run.setdefault(rid, {})[rank] = share
            pids: dict[str, dict[int | None, set[int]]] = {}
            for key in self._shares.tracked:
                rid, rank = cast(tuple[str, int | None], key)
                pids.setdefault(rid, {})[rank] = self._shares.pids(key)
            rows: list[dict[str, Any]] = []

            def row(rid: str, rank: int, kind: str, a: float, b: float, share: float) -> None:
                rows.append(
                    {"run_id": rid, "node": self.node, "rank": rank, "kind": kind}
                    | {"t0": a, "t1": b, "share": share}
                )

            for rid, per_rank in by_run.items():
                # a rank's first share runs from its start when its client said what it was
                own = {r: starts.get((rid, r), t0) for r in per_rank}
                for a, b, v in self._cpu_union(rid, per_rank, own, t0, t):
                    row(rid, -1, "cpu", a, b, v)
                for r, v in per_rank.items():
                    if r is not None:
                        row(rid, r, "cpu", own[r], t, v)
            since_us = int(t0 * 1e6)
            for d in self.devices:
                process_share = getattr(d.backend, "process_share", None)
                if process_share is None:
                    continue
                kind = f"gpu:{d.backend.info.name}"
                for rid, ranks in pids.items():
                    union = process_share(set().union(*ranks.values()), since_us)
                    if union is None:  # NVML cannot say: the run splits what others leave
                        self._unmeasured.add((rid, kind))
                        rows.extend(self._awaited_rows.pop((rid, kind), []))
                        continue
                    # the measured share covers the time its split rows waited for
                    self._awaited_rows.pop((rid, kind), None)
                    if (rid, kind) not in self._unmeasured:
                        self._split_rows.pop((rid, kind), None)  # never stored
                    self._last_share[(rid, kind)] = min(1.0, union)
                    row(rid, -1, kind, t0, t, min(1.0, union))
                    for r, p in ranks.items():
                        part = process_share(p, since_us) if r is not None else None
                        if r is not None and part is not None:
                            row(rid, r, kind, t0, t, part)
            self._pending_shares.extend(rows)
            self._pending_shares.extend(
                self._split(t if split_until is None else min(t, split_until))
            )
            self._count_held()

    def _cpu_union(
        self,
        rid: str,
        per_rank: dict[int | None, float],
        own: dict[int | None, float],
        t0: float,
        t: float,
    ) -> list[list[float]]:
        """The run's CPU union rows to store for this sample (the lock is held): the new one,
        and earlier ones a late rank's back-dated share was added to.

        Each rank's share is spread evenly over its own interval [start, t]. The new row
        follows the run's last one (the first from its earliest start); a rank that began
        before that row is added, pro rata of the overlap, to the rows it covers, so the
        union rows tile the run's time and none is dropped or counted twice.
        """
        self._last_share[(rid, "cpu")] = min(1.0, sum(per_rank.values()))
        hist = self._union_rows.setdefault(rid, deque(maxlen=CpuShareTracker.HISTORY))
        c0 = hist[-1][1] if hist else min(own.values())
        if t <= c0:
            return []
        new = sum(v * max(0.0, t - max(own[r], c0)) / (t - c0) for r, v in per_rank.items())
        late = {r: own[r] for r, v in per_rank.items() if own[r] < c0 and v > 0}
        changed: list[list[float]] = []
        if late and hist:
            first = min(late.values())
            if first < hist[0][0] and len(hist) < CpuShareTracker.HISTORY:
                hist.appendleft([first, hist[0][0], 0.0])
            for piece in hist:
                a, b = piece[0], piece[1]
                add = sum(
                    per_rank[r] * max(0.0, min(b, t) - max(a, s)) / (b - a)
                    for r, s in late.items()
                    if b > a
                )
                if add > 0:
                    piece[2] += add
                    changed.append(piece)
        hist.append([c0, t, new])
        return [[a, b, min(1.0, v)] for a, b, v in (*changed, hist[-1])]

    def _split(self, t: float, *, sharing: bool = False) -> list[dict[str, Any]]:
        """Rows up to ``t`` for the active runs whose share of a device is not measured (the
        lock is held): the rule ``_add_to_runs`` applies live. They split evenly what the
        measured runs leave of the device; a run alone gets all of it.

        A run that has only ever been alone needs no rows (no rows: the whole device); from
        the moment another run joins (``sharing``: one is about to) its rows cover its time
        from its start. A run followed here has a CPU share from its start once measured,
        so it gets no CPU split row. Its split rows of a GPU with per-process figures wait
        (``_awaited_rows``) until a sample says whether its share there is measured: the
        measured share is back-dated to the last sample, and a split row stored beside it
        made two rows of one time (the whole device on top of its share). A GPU without
        per-process figures is split between every run.
        """
        runs = {rid for rid, _rank in self._active_runs}
        if not runs:
            return []
        followed = {k[0] for k in cast(list[tuple[str, int | None]], self._shares.tracked)}
        kinds = {
            f"gpu:{d.backend.info.name}" if d.backend.info.kind == "gpu" else "cpu"
            for d in self.devices
        }
        # GPUs whose share of a followed run is measured (the rule of _add_to_runs)
        measurable = {
            f"gpu:{d.backend.info.name}"
            for d in self.devices
            if d.backend.info.kind == "gpu"
            and getattr(d.backend, "process_share", None) is not None
        }
        rows: list[dict[str, Any]] = []
        for kind in sorted(kinds):
            known = {r: self._last_share[(r, kind)] for r in runs if (r, kind) in self._last_share}
            unknown = runs - set(known)
            if not unknown:
                continue
            rest = max(0.0, 1.0 - sum(known.values())) / len(unknown)
            for rid in sorted(unknown):
                if kind == "cpu" and rid in followed:
                    continue  # its measured share will run from its start
                awaited = (
                    kind in measurable and rid in followed and (rid, kind) not in self._unmeasured
                )
                open_ = self._split_rows.get((rid, kind))
                if open_ is None and len(runs) == 1 and not sharing:
                    continue  # alone so far
                a = open_[1] if open_ is not None else self._split_start.get(rid, t)
                if t <= a:
                    continue
                if open_ is not None and abs(open_[2] - rest) <= 1e-9:
                    open_[1] = t  # the same split: the row is extended (stored again)
                else:
                    open_ = self._split_rows[(rid, kind)] = [a, t, rest]
                row = {"run_id": rid, "node": self.node, "rank": SPLIT_RANK, "kind": kind} | {
                    "t0": open_[0],
                    "t1": open_[1],
                    "share": open_[2],
                }
                if awaited:
                    self._awaited_rows.setdefault((rid, kind), []).append(row)
                else:
                    rows.append(row)
        return rows

    def _update_idle(self) -> list[tuple[int, float]]:
        changed = []
        for d in self.devices:
            if d.idle_n >= self._idle_min_samples:
                idle = statistics.median(d.idle)
                if d.idle_power_w is None or abs(idle - d.idle_power_w) > 0.01 * max(idle, 1e-9):
                    d.idle_power_w = idle
                    changed.append((d.device_id, idle))
        return changed

    def flush(self, *, wait: bool = True) -> None:
        """Hand pending readings to the store's writer (one write in flight at a time).

        ``wait``: block until that write is done (tests and shutdown). A failed write puts
        its rows back, less those given up on while it was in flight (see ``_trim``).
        """
        if self._inflight is not None:
            if not wait:
                return
            self._settled.wait()
        with self._lock:
            if self._inflight is not None:  # another thread's flush got in first
                return
            rows, self._pending = self._pending, []
            shares, self._pending_shares = self._pending_shares, []
            idle = self._update_idle()
            if not (rows or shares or idle):
                return
            self._inflight = (rows, shares)
            self._inflight_given_up = 0
            self._settled.clear()

        def write(s: Session) -> None:
            repo.add_power_samples(s, rows=rows)
            repo.add_run_shares(s, rows=shares)
            for device_id, watts in idle:
                repo.set_idle_power(s, device_id=device_id, idle_power_w=watts)

        try:
            fut = self._store.submit(write)
        except Exception as exc:  # the store is closed
            self._stored(exc)
            return
        fut.add_done_callback(lambda f: self._stored(f.exception()))
        if wait:
            self._settled.wait()

    def _stored(self, exc: BaseException | None) -> None:
        with self._lock:
            inflight, self._inflight = self._inflight, None
            given_up, self._inflight_given_up = self._inflight_given_up, 0
            self._settled.set()
            h = self.health
            if exc is None:  # readings given up on were stored after all: no gap
                if h.status != "ok" or self._dropped_since_stored:
                    logger.info(
                        "storing power readings works again (%d dropped meanwhile)",
                        self._dropped_since_stored,
                    )
                h.status, h.reason = "ok", None
                self._dropped_since_stored = 0
                return
            h.failures += 1
            if h.status == "ok":
                logger.warning("cannot store power readings (kept in memory, retried): %s", exc)
            h.status, h.reason = "failing", f"{type(exc).__name__}: {exc}"
            if inflight is None:
                return
            rows, shares = inflight
            self._dropped(rows[:given_up])
            self._pending[:0] = rows[given_up:]
            self._pending_shares[:0] = shares
            self._trim()

    def _unstored_rows(self) -> int:
        """Readings waiting: pending, and those of the write in flight not given up on."""
        inflight = len(self._inflight[0]) - self._inflight_given_up if self._inflight else 0
        return len(self._pending) + inflight

    def _trim(self) -> None:
        """Keep at most ``max_unstored_rows`` readings waiting (the lock is held).

        The oldest go first, and the write in flight holds the oldest: its first readings are
        given up on (counted as waiting no more, dropped if the write fails, stored if it
        succeeds) before any pending one is dropped. Dropping pending readings while older
        ones are in flight would leave those between two gaps if the write then failed. Two
        gaps remain possible only if a write outlasts ``max_unstored_rows`` readings (all of
        it given up on, then pending ones dropped) and then succeeds. Readings given up on
        stay in memory, held by the store's job, until the store answers.
        """
        excess = self._unstored_rows() - self.max_unstored_rows
        if excess > 0 and self._inflight is not None:
            give_up = min(excess, len(self._inflight[0]) - self._inflight_given_up)
            self._inflight_given_up += give_up
            excess -= give_up
        if excess > 0:
            self._dropped(self._pending[:excess])
            del self._pending[:excess]
        del self._pending_shares[: max(0, len(self._pending_shares) - self.max_unstored_rows)]

    def _dropped(self, lost: list[dict[str, Any]]) -> None:
        """Count readings lost for good; their span is a gap in energy (the lock is held)."""
        if not lost:
            return
        h = self.health
        h.dropped_rows += len(lost)
        t0, t1 = min(r["t"] for r in lost), max(r["t"] for r in lost)
        h.dropped_t0 = t0 if h.dropped_t0 is None else min(h.dropped_t0, t0)
        h.dropped_t1 = t1 if h.dropped_t1 is None else max(h.dropped_t1, t1)
        if not self._dropped_since_stored:  # once until a write works again, not every tick
            logger.warning(
                "more than %d power readings wait to be stored: dropping the oldest (a gap in "
                "energy)",
                self.max_unstored_rows,
            )
        self._dropped_since_stored += len(lost)

    def unstored(self) -> dict[str, Any]:
        """Readings and shares not stored yet, for the store's read overlay."""
        with self._lock:
            # the write in flight first: a pending row of the same key is newer and wins
            rows = list(self._inflight[0]) if self._inflight is not None else []
            shares = list(self._inflight[1]) if self._inflight is not None else []
            rows += self._pending
            shares += self._pending_shares
        power: dict[int, list[tuple[float, float | None, float | None]]] = {}
        for r in rows:
            power.setdefault(r["device_id"], []).append((r["t"], r["power_w"], r["energy_j"]))
        by_run: dict[str, list[tuple[str, int, str, float, float, float]]] = {}
        for r in shares:
            by_run.setdefault(r["run_id"], []).append(
                (r["node"], r["rank"], r["kind"], r["t0"], r["t1"], r["share"])
            )
        return {"unstored_power": power, "unstored_shares": by_run}

    def storage(self) -> dict[str, Any]:
        with self._lock:
            h = self.health
            return {
                "status": h.status,
                "reason": h.reason,
                "failures": h.failures,
                "unstored_rows": self._unstored_rows(),
                "dropped_rows": h.dropped_rows,
                "dropped_t0": h.dropped_t0,
                "dropped_t1": h.dropped_t1,
            }

    def prune(self) -> int:
        """One retention pass (the retention thread's, every ``prune_every_s``); returns the
        number of samples deleted.

        Each device is thinned in slices of about ``prune_slice_rows`` samples, each slice
        its own short write, so sampling and every other write go on between them; the
        slices thin as one pass would (:func:`repo.prune_power_slice`). A pass covers the
        time since the last one's cutoff and, of each run that was kept at full resolution
        then but no longer is (it has ended since, and its full-resolution time passed), the
        time since the run's start: not the whole history, and no run is skipped for good.
        A pass that fails or is stopped is taken up again by the next one.
        """
        cutoff = self.now() - self.full_resolution_s
        try:
            with self._store.read() as s:
                devices = list(s.scalars(select(Device.id).order_by(Device.id)))
            kept = self._kept_at(cutoff)
        except Exception:  # retention must never stop anything else
            logger.exception("pruning power samples failed; will retry")
            return 0
        # the runs the last pass kept that this one does not: their samples before its
        # cutoff were skipped (they ended since, or their end was set back, or they are gone)
        freed = [t0 for rid, t0 in self._kept_runs.items() if rid not in kept]
        since = min([self._pruned_to, *freed]) - self.downsample_s
        gap = max_gap(self.interval_s)
        deleted = 0
        for dev in devices:
            a = since
            while a < cutoff:
                if self._stop.is_set():
                    return deleted

                def thin(s: Session, dev: int = dev, a: float = a) -> tuple[int, float]:
                    return repo.prune_power_slice(
                        s,
                        device_id=dev,
                        since=a,
                        cutoff=cutoff,
                        bucket_s=self.downsample_s,
                        max_rows=self.prune_slice_rows,
                        max_gap_s=gap,
                    )

                try:
                    n, a = self._store.write(thin)
                except Exception:
                    logger.exception("pruning power samples failed; will retry")
                    return deleted
                deleted += n
        try:  # and those that became so while the pass ran
            kept |= self._kept_at(cutoff)
        except Exception:
            logger.exception("pruning power samples failed; will retry")
            return deleted
        self._pruned_to, self._kept_runs = cutoff, kept
        if deleted:
            logger.info(
                "retention: thinned %d power samples older than %.0f s",
                deleted,
                self.full_resolution_s,
            )
        return deleted

    def _kept_at(self, cutoff: float) -> dict[str, float]:
        """The runs whose samples a pass up to ``cutoff`` keeps at full resolution (see
        :func:`repo.prune_power_samples`), with their starts."""
        with self._store.read() as s:
            rows = s.execute(
                select(Run.id, Run.created_at).where(
                    or_(Run.finished_at.is_(None), Run.finished_at >= cutoff),
                    Run.created_at < cutoff,
                )
            )
            return {rid: t0 for rid, t0 in rows}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._retention is not None:  # it stops after the slice it is at
            self._retention.join(timeout=10)
        for _ in range(2):  # a write in flight, then what was left
            self.flush()
            with self._lock:
                left = len(self._pending)
        if left:
            logger.warning("%d power readings could not be stored before stopping", left)
        for d in self.devices:
            try:
                d.backend.close()
            except Exception:  # closing must not fail shutdown
                logger.exception("closing %s failed", d.backend.info.name)

    def stats(self) -> dict[str, Any]:
        iv = list(self._intervals)
        elapsed = (self._clock() - self._started_mono) if self._started_mono is not None else 0.0
        return {
            "interval_s": self.interval_s,
            "ticks": self.ticks,
            "achieved_hz": (1.0 / statistics.median(iv)) if iv else None,
            "jitter_ms": (statistics.pstdev(iv) * 1e3) if len(iv) > 1 else None,
            "cpu_fraction_of_core": (self._cpu_s / elapsed) if elapsed > 0 else None,
            "running": self._thread is not None and self._thread.is_alive(),
            "storage": self.storage(),
        }
