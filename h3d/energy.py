"""Energy of one device over a window, from its stored samples (pure functions, no I/O).

Two methods, chosen per device by what it reports:

- ``counter``: the device has a cumulative energy counter. Energy is the counter's
  difference, linearly interpolated at the window's edges. A counter that steps
  backwards (a restarted daemon, a driver reload) starts a new segment; nothing is
  counted across the reset.
- ``trapezoid``: power only. Energy is the integral of the piecewise-linear
  interpolant of the samples, clipped to the window, with the edges interpolated. Never a
  rectangle sum.

Gaps longer than ``max_gap_s`` between two samples (a stalled sampler, a suspended machine)
are not bridged: the time is reported in ``gaps_s`` and left out of ``energy_j``. A window
shorter than the device's update period is flagged ``below_granularity`` rather than
reported as if it were exact.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

Sample = tuple[float, float | None, float | None]  # (t_s, power_w, energy_j)


@dataclass(frozen=True, slots=True)
class Integral:
    energy_j: float
    method: str  # "counter" | "trapezoid" | "none"
    covered_s: float  # window time backed by samples on both sides
    gaps_s: float  # window time inside unbridged gaps
    n_samples: int
    below_granularity: bool = False
    gaps: tuple[tuple[float, float], ...] = field(default=())


def _interp(t: float, t0: float, v0: float, t1: float, v1: float) -> float:
    if t1 == t0:
        return v1
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def _segments(
    points: Sequence[tuple[float, float]], max_gap_s: float, resets: bool
) -> list[list[tuple[float, float]]]:
    """Split (t, v) points where the gap is too long or (for counters) v steps back."""
    segs: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    for p in points:
        if cur and (p[0] - cur[-1][0] > max_gap_s or (resets and p[1] < cur[-1][1])):
            segs.append(cur)
            cur = []
        cur.append(p)
    if cur:
        segs.append(cur)
    return segs


def _clip_counter(seg: list[tuple[float, float]], t0: float, t1: float) -> float:
    ts = [p[0] for p in seg]

    def at(t: float) -> float:
        i = bisect.bisect_right(ts, t)
        if i == 0:
            return seg[0][1]
        if i >= len(seg):
            return seg[-1][1]
        return _interp(t, *seg[i - 1], *seg[i])

    a, b = max(t0, seg[0][0]), min(t1, seg[-1][0])
    return max(0.0, at(b) - at(a)) if b > a else 0.0


def _clip_trapezoid(seg: list[tuple[float, float]], t0: float, t1: float) -> float:
    total = 0.0
    for (ta, pa), (tb, pb) in zip(seg, seg[1:], strict=False):
        a, b = max(ta, t0), min(tb, t1)
        if b <= a:
            continue
        total += 0.5 * (_interp(a, ta, pa, tb, pb) + _interp(b, ta, pa, tb, pb)) * (b - a)
    return total


def integrate(
    samples: Sequence[Sample],
    t0: float,
    t1: float,
    *,
    max_gap_s: float = 5.0,
    granularity_s: float | None = None,
) -> Integral:
    """Energy in joules over ``[t0, t1]`` from samples sorted by time.

    Pass the samples that straddle the window (one before ``t0`` and one after ``t1`` where
    they exist) so that the edges can be interpolated.
    """
    if t1 < t0:
        raise ValueError(f"window ends before it starts: [{t0}, {t1}]")
    counter = [(t, e) for t, _p, e in samples if e is not None]
    power = [(t, p) for t, p, _e in samples if p is not None]
    use_counter = len(counter) >= 2 and len(counter) * 2 >= len(samples)
    points = counter if use_counter else power
    if len(points) < 2:
        return Integral(0.0, "none", 0.0, 0.0, len(samples), True)
    segs = _segments(points, max_gap_s, resets=use_counter)
    energy = covered = 0.0
    for seg in segs:
        if len(seg) < 2:
            continue
        a, b = max(t0, seg[0][0]), min(t1, seg[-1][0])
        if b <= a:
            continue
        covered += b - a
        energy += _clip_counter(seg, t0, t1) if use_counter else _clip_trapezoid(seg, t0, t1)
    gaps: list[tuple[float, float]] = []
    for s0, s1 in zip(segs, segs[1:], strict=False):
        a, b = max(t0, s0[-1][0]), min(t1, s1[0][0])
        if b > a:
            gaps.append((a, b))
    below = granularity_s is not None and (t1 - t0) < granularity_s
    return Integral(
        energy_j=energy,
        method="counter" if use_counter else "trapezoid",
        covered_s=covered,
        gaps_s=sum(b - a for a, b in gaps),
        n_samples=len(samples),
        below_granularity=below,
        gaps=tuple(gaps),
    )


def cumulative(
    samples: Sequence[Sample], grid: Sequence[float], *, max_gap_s: float = 5.0
) -> list[float]:
    """Energy from ``grid[0]`` to each grid time (for η curves); one pass per grid point."""
    if not grid:
        return []
    return [integrate(samples, grid[0], g, max_gap_s=max_gap_s).energy_j for g in grid]
