"""Per-run CPU attribution: a run's share of the machine's busy CPU time, per interval.

A run registers its process id; its children are followed (``children(recursive=True)``),
and the CPU time of children that already exited and were waited for is kept through the
parent's ``children_user``/``children_system``. The share of an interval is

    Δ(CPU time of the run's processes) / Δ(busy CPU time of the whole machine)

so the shares of all runs never add up to more than 1 (to measurement rounding, which is
clamped), and a run alone on an otherwise idle machine gets close to 1.
"""

from __future__ import annotations

import contextlib
import logging
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
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    last_s: dict[int, float] = field(default_factory=dict)


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


class CpuShareTracker:
    """Call :meth:`sample` once per interval; it returns each tracked run's share of it."""

    def __init__(self) -> None:
        self._runs: dict[str, _Tree] = {}
        self._last_busy: float | None = None

    def track(self, run_id: str, pid: int) -> bool:
        """Start following ``pid`` and its children for ``run_id``; False if it is gone."""
        try:
            root = psutil.Process(pid)
            tree = _Tree(root=root)
            self._refresh(tree)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        self._runs[run_id] = tree
        return True

    def untrack(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    @property
    def tracked(self) -> list[str]:
        return list(self._runs)

    def pids(self, run_id: str) -> set[int]:
        """The run's processes as of the last sample (root and children)."""
        tree = self._runs.get(run_id)
        return set(tree.procs) | {tree.root.pid} if tree is not None else set()

    def _refresh(self, tree: _Tree) -> float:
        """Add new children, drop dead ones; return the CPU seconds gained since last time."""
        gained = 0.0
        alive: list[psutil.Process] = [tree.root]
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            alive += tree.root.children(recursive=True)
        seen = set()
        for p in alive:
            pid = p.pid
            proc = tree.procs.setdefault(pid, p)
            try:
                now = _cpu_s(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            seen.add(pid)
            prev = tree.last_s.get(pid)
            if prev is not None:
                gained += max(0.0, now - prev)
            tree.last_s[pid] = now
        for pid in list(tree.procs):
            if pid not in seen:
                # Its last CPU time was counted; what it used after our last look is lost
                # unless its parent waited for it (then it shows in children_*).
                tree.procs.pop(pid)
                tree.last_s.pop(pid, None)
        return gained

    def sample(self) -> dict[str, float]:
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
