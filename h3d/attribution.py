"""Per-run CPU attribution: a run's share of the machine's busy CPU time, per interval.

A run registers its process id; its children are followed (``children(recursive=True)``),
and the CPU time of children that already exited and were waited for is kept through the
parent's ``children_user``/``children_system`` (counted once: the part already seen while
the child ran is taken off when it arrives there). The share of an interval is

    Δ(CPU time of the run's processes) / Δ(busy CPU time of the whole machine)

so the shares of all runs never add up to more than 1 (to measurement rounding, which is
clamped), and a run alone on an otherwise idle machine gets close to 1.

A run is followed from when its create request arrives, which a client sends from its own
thread some time after the run began (its HTTP stack is imported there first). A client
that says what its process's CPU time was when the run began (``cpu_s`` at ``since_t``)
has its first interval start there instead: its CPU since then over the machine's busy time
since then, read off the busy readings of earlier intervals. Without that, a run shorter
than the delay would be seen doing nothing and get no energy.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)

#: The rank of a run's stored share rows on a node whose share was not measured there (a
#: run not followed here, a GPU without per-process figures): its split of what the measured
#: runs leave. Rank -1 rows are measured shares of the union of its processes; the two never
#: cover the same time, and together they are what the node's devices are attributed by.
SPLIT_RANK = -2

_IDLE_FIELDS = ("idle", "iowait")
_GUEST_FIELDS = ("guest", "guest_nice")  # already counted in user/nice on Linux


def cpu_s() -> tuple[float, float]:
    """The whole machine's (busy, total) CPU seconds since boot, summed over its CPUs, from
    one read of ``/proc/stat`` (as ``psutil.cpu_percent`` counts them: busy is all but idle
    and iowait; guest time is already in user and nice)."""
    t = psutil.cpu_times()
    total = sum(getattr(t, f) for f in t._fields if f not in _GUEST_FIELDS)
    idle = sum(getattr(t, f) for f in _IDLE_FIELDS if hasattr(t, f))
    return float(total - idle), float(total)


def busy_cpu_s() -> float:
    return cpu_s()[0]


@dataclass
class _Tree:
    root: psutil.Process
    # per pid: CPU seconds (own + waited-for children) at the last look, and its parent pid
    last_s: dict[int, float] = field(default_factory=dict)
    ppid: dict[int, int] = field(default_factory=dict)
    counted_s: float = 0.0
    # the run began before it was tracked: (when, its root's CPU seconds from then to now)
    since: tuple[float, float] | None = None


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


class CpuShareTracker:
    """Call :meth:`sample` once per interval; it returns each tracked run's share of it.

    A tree's CPU time is the sum over its live processes of own + waited-for children's
    time. When a tracked process is reaped its final time moves into its parent's
    ``children_*`` fields, so the part already counted while it lived is taken off again:
    a process's CPU time is counted once, whether it is seen alive, reaped, or both.

    Keys are whatever names a run's process tree: a run id, or (run id, rank) when several
    ranks of one run share the machine.
    """

    #: busy readings kept for runs that began before they were tracked (one per sample)
    HISTORY = 256

    def __init__(self) -> None:
        self._runs: dict[Hashable, _Tree] = {}
        self._last_busy: float | None = None
        self._busy: deque[tuple[float, float]] = deque(maxlen=self.HISTORY)  # (t, busy CPU s)
        #: keys whose share in the last :meth:`sample` runs from their start, and that start
        self.starts: dict[Hashable, float] = {}

    def track(
        self,
        run_id: Hashable,
        pid: int,
        *,
        cpu_s: float | None = None,
        since_t: float | None = None,
    ) -> bool:
        """Start following ``pid`` and its children for ``run_id``; False if it is gone.

        ``cpu_s``: the process's CPU seconds (user + system, waited-for children included,
        as ``os.times()`` reads them) at ``since_t``, when the run began; its first share is
        then counted from there, if :meth:`sample` (given times) has busy readings that old.
        """
        try:
            root = psutil.Process(pid)
            tree = _Tree(root=root)
            self._refresh(tree, baseline=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        now_s = tree.last_s.get(pid)
        # a cpu_s above the process's CPU time now is not its reading (a reused pid): ignored
        if cpu_s is not None and since_t is not None and now_s is not None and cpu_s <= now_s:
            tree.since = (since_t, now_s - cpu_s)
        self._runs[run_id] = tree
        return True

    def seed(self, busy: list[tuple[float, float]]) -> None:
        """Busy readings (time, busy CPU seconds) taken before the first :meth:`sample`,
        oldest first (a starting daemon's: :mod:`h3d.power.early`): the first sample
        measures from the last of them, and a run tracked with an older start finds them."""
        if busy and self._last_busy is None:
            self._busy.extend(busy)
            self._last_busy = busy[-1][1]

    def _busy_at(self, t: float) -> float | None:
        """The machine's busy CPU seconds at ``t``, interpolated; None before the readings."""
        h = self._busy
        i = bisect.bisect_right(h, t, key=lambda r: r[0])
        if i == 0:
            return None
        (ta, ba), (tb, bb) = h[i - 1], h[min(i, len(h) - 1)]
        return ba if tb <= ta else ba + (bb - ba) * (t - ta) / (tb - ta)

    def untrack(self, run_id: Hashable) -> None:
        self._runs.pop(run_id, None)

    @property
    def tracked(self) -> list[Hashable]:
        return list(self._runs)

    def gone(self) -> list[Hashable]:
        """Tracked keys whose root process has exited (psutil checks the start time, so a
        reused pid does not count as the run's process)."""
        out: list[Hashable] = []
        for rid, tree in list(self._runs.items()):
            try:
                alive = tree.root.is_running() and tree.root.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            except psutil.AccessDenied:  # another user's process: it exists
                alive = True
            if not alive:
                out.append(rid)
        return out

    def pids(self, run_id: Hashable) -> set[int]:
        """The run's processes as of the last sample (root and children)."""
        tree = self._runs.get(run_id)
        return set(tree.last_s) | {tree.root.pid} if tree is not None else set()

    def cpu_s(self, run_id: Hashable) -> float:
        """CPU seconds counted for the run since it was tracked (0.0 if unknown)."""
        tree = self._runs.get(run_id)
        return tree.counted_s if tree is not None else 0.0

    def _refresh(self, tree: _Tree, *, baseline: bool = False) -> float:
        """Follow new children, account for reaped ones; CPU seconds gained since last time."""
        procs: list[psutil.Process] = [tree.root]
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            procs += tree.root.children(recursive=True)
        now: dict[int, float] = {}
        for p in procs:
            try:
                now[p.pid] = _cpu_s(p)
                if p.pid not in tree.ppid:
                    tree.ppid[p.pid] = p.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        gained = 0.0
        for pid, c in now.items():
            prev = tree.last_s.get(pid)
            if prev is None or c < prev:  # new since the last look (or a reused pid)
                gained += 0.0 if baseline else c
            else:
                gained += c - prev
        for pid in [p for p in tree.last_s if p not in now]:
            # Reaped by a tracked ancestor: its whole time just arrived in that ancestor's
            # children_* fields, so the part counted while it lived is taken off. Reaped
            # by anyone else (orphaned): whatever it used after our last look is lost.
            if self._has_live_ancestor(tree, pid, now):
                gained -= tree.last_s[pid]
            del tree.last_s[pid]
        tree.ppid = {p: q for p, q in tree.ppid.items() if p in now}
        tree.last_s.update(now)
        gained = max(0.0, gained)  # an orphan's earlier time can make it dip: never negative
        tree.counted_s += gained
        return gained

    @staticmethod
    def _has_live_ancestor(tree: _Tree, pid: int, live: dict[int, float]) -> bool:
        seen: set[int] = set()
        parent = tree.ppid.get(pid)
        while parent is not None and parent not in seen:
            if parent in live:
                return True
            seen.add(parent)
            parent = tree.ppid.get(parent)
        return False

    def sample(self, t: float | None = None) -> dict[Hashable, float]:
        """Each run's share since the last call. ``t``: now, on the caller's clock; with it,
        a run tracked with its start gets its first share from that start (see
        :attr:`starts`)."""
        busy = busy_cpu_s()
        gained = {rid: self._refresh(tree) for rid, tree in list(self._runs.items())}
        prev, self._last_busy = self._last_busy, busy
        if t is not None:
            self._busy.append((t, busy))
        self.starts = {}
        since_total: dict[Hashable, float] = {}
        for rid, tree in self._runs.items():
            if tree.since is None:
                continue
            (t0, before), tree.since = tree.since, None
            busy0 = self._busy_at(t0) if t is not None else None
            if busy0 is not None and busy - busy0 > 0:
                # its CPU from its start to when it was tracked, and the machine's since then
                gained[rid] += before
                tree.counted_s += before
                since_total[rid] = busy - busy0
                self.starts[rid] = t0
        total = busy - prev if prev is not None else 0.0
        shares = {
            rid: min(1.0, g / d)
            for rid, g in gained.items()
            if (d := since_total.get(rid, total)) > 0
        }
        s = sum(shares.values())
        if s > 1.0:  # rounding between the per-process and the system counters
            shares = {rid: v / s for rid, v in shares.items()}
        return shares
