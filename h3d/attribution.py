"""Per-run CPU attribution: a run's share of the machine's busy CPU time, per interval.

A run registers its process id; its children are followed (``children(recursive=True)``),
and the CPU time of children that already exited and were waited for is kept through the
parent's ``children_user``/``children_system`` (counted once: the part already seen while
the child ran is taken off when it arrives there). The share of an interval is

    Δ(CPU time of the run's processes) / Δ(busy CPU time of the whole machine)

so the shares of all runs never add up to more than 1 (to measurement rounding, which is
clamped), and a run alone on an otherwise idle machine gets close to 1.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)

_IDLE_FIELDS = ("idle", "iowait")
_GUEST_FIELDS = ("guest", "guest_nice")  # already counted in user/nice on Linux


def busy_cpu_s() -> float:
    t = psutil.cpu_times()
    busy = (getattr(t, f) for f in t._fields if f not in _IDLE_FIELDS and f not in _GUEST_FIELDS)
    return float(sum(busy))


@dataclass
class _Tree:
    root: psutil.Process
    # per pid: CPU seconds (own + waited-for children) at the last look, and its parent pid
    last_s: dict[int, float] = field(default_factory=dict)
    ppid: dict[int, int] = field(default_factory=dict)
    counted_s: float = 0.0


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

    def __init__(self) -> None:
        self._runs: dict[Hashable, _Tree] = {}
        self._last_busy: float | None = None

    def track(self, run_id: Hashable, pid: int) -> bool:
        """Start following ``pid`` and its children for ``run_id``; False if it is gone."""
        try:
            root = psutil.Process(pid)
            tree = _Tree(root=root)
            self._refresh(tree, baseline=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        self._runs[run_id] = tree
        return True

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

    def sample(self) -> dict[Hashable, float]:
        busy = busy_cpu_s()
        gained = {rid: self._refresh(tree) for rid, tree in list(self._runs.items())}
        prev, self._last_busy = self._last_busy, busy
        if prev is None or busy - prev <= 0:
            return {}
        total = busy - prev
        shares = {rid: min(1.0, g / total) for rid, g in gained.items()}
        s = sum(shares.values())
        if s > 1.0:  # rounding between the per-process and the system counters
            shares = {rid: v / s for rid, v in shares.items()}
        return shares
