"""Energy of one device over any window, from its stored samples (pure functions, no I/O).

Two methods, chosen per device by what it reports:

- ``counter``: the device has a cumulative energy counter. Energy is the counter's
  difference, linearly interpolated at the window's edges. A counter that steps
  backwards (a restarted daemon, a driver reload) starts a new segment; nothing is
  counted across the reset.
- ``trapezoid``: power only. Energy is the integral of the piecewise-linear
  interpolant of the samples, clipped to the window, with the edges interpolated. Never a
  rectangle sum.

A device's samples may mix the two (retention gives the rows it keeps of a power-only
device the energy it integrated): each step between two samples takes the counter where both
carry one, else the trapezoid.

Gaps longer than ``max_gap_s`` between two samples (a stalled sampler, a suspended machine)
are not bridged, except a step retention thinned, which says so (:func:`thinned_step`): the time is reported in ``gaps_s`` and left out of ``energy_j``. A window
shorter than the device's update period is flagged ``below_granularity`` rather than
reported as if it were exact.

:class:`EnergyCurve` builds the cumulative energy once (O(n)); each window is then two
binary searches, so a report can ask for thousands of windows of one device cheaply.
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


def max_gap(interval_s: float) -> float:
    """The longest step between two samples of a device sampled every ``interval_s`` that
    is still bridged: longer is a gap (a stalled sampler, a suspended machine)."""
    return max(1.0, 10.0 * interval_s)


def thinned_step(first: Sample, second: Sample) -> bool:
    """Whether retention thinned the samples between ``first`` and ``second`` away.

    The retention pass marks what it keeps: the first row of a thinned step carries, as its
    power, the mean power over the step, exactly the cumulative energy's rise over the step's
    length (``energy_j`` being the counter, or the energy retention integrated for a device
    that reports power only). Such a step holds the energy of the samples it replaced, so it
    is bridged whatever its length.
    """
    t0, p0, e0 = first
    t1, _p1, e1 = second
    return (
        p0 is not None
        and e0 is not None
        and e1 is not None
        and t1 > t0
        and (p0 == (e1 - e0) / (t1 - t0))
    )


class EnergyCurve:
    """Cumulative energy E(t) of one device, from samples sorted by time.

    Between two samples: the counter's difference where both carry a cumulative energy,
    else the trapezoid of their power. A step longer than ``max_gap_s`` is a gap unless
    retention thinned it (:func:`thinned_step`); a counter that steps back is a reset.
    """

    def __init__(self, samples: Sequence[Sample], *, max_gap_s: float = 5.0) -> None:
        pts = [s for s in samples if s[1] is not None or s[2] is not None]
        self.n_samples = len(samples)
        self.max_gap_s = max_gap_s
        self._segments: tuple[list[float], list[float], list[float]] | None = None
        self.ts: list[float] = []
        self.vs: list[float | None] = []  # power, per point (trapezoid steps)
        self.linear: list[bool] = []  # step i -> i+1 interpolates E linearly (a counter)
        self.cum: list[float] = []  # energy from the first point to this one
        self.seg: list[int] = []  # segment id: a gap or a counter reset starts a new one
        kinds: set[str] = set()
        seg, cum = 0, 0.0
        for i, (t, p, e) in enumerate(pts):
            if i:
                tp, pp, ep = pts[i - 1]
                thinned = thinned_step(pts[i - 1], pts[i])
                linear = ep is not None and e is not None
                if (t - tp > max_gap_s and not thinned) or (linear and e < ep):  # type: ignore[operator]
                    seg += 1
                elif linear:
                    cum += e - ep  # type: ignore[operator]
                    kinds.add("thinned" if thinned and t - tp > max_gap_s else "counter")
                elif p is not None and pp is not None:
                    cum += 0.5 * (p + pp) * (t - tp)
                    kinds.add("trapezoid")
                else:
                    seg += 1
                self.linear.append(linear)
            self.ts.append(t)
            self.vs.append(p)
            self.cum.append(cum)
            self.seg.append(seg)
        # "thinned": some of the energy comes from steps retention thinned
        if "thinned" in kinds:
            self.method = "thinned"
        elif "counter" in kinds or (not kinds and all(e is not None for _t, _p, e in pts)):
            self.method = "counter" if len(pts) >= 2 else "none"
        else:
            self.method = "trapezoid" if len(pts) >= 2 else "none"
        self.is_counter = self.method in ("counter", "thinned")

    def at(self, t: float) -> float:
        """E(t): constant before the first sample, after the last, and across gaps."""
        ts = self.ts
        i = bisect.bisect_right(ts, t) - 1
        if i < 0:
            return 0.0
        if i >= len(ts) - 1 or self.seg[i] != self.seg[i + 1]:
            return self.cum[i]
        dt = ts[i + 1] - ts[i]
        frac = (t - ts[i]) / dt if dt > 0 else 1.0
        p0, p1 = self.vs[i], self.vs[i + 1]
        if self.linear[i] or p0 is None or p1 is None:
            return self.cum[i] + (self.cum[i + 1] - self.cum[i]) * frac
        p_t = p0 + (p1 - p0) * frac
        return self.cum[i] + 0.5 * (p0 + p_t) * (t - ts[i])

    def between(self, t0: float, t1: float) -> float:
        return max(0.0, self.at(t1) - self.at(t0)) if t1 > t0 else 0.0

    def _segs(self) -> tuple[list[float], list[float], list[float]]:
        """(first time, last time, prefix of lengths) of each segment, built once."""
        if self._segments is None:
            starts: list[float] = []
            ends: list[float] = []
            prefix = [0.0]
            start = 0
            for i in range(1, len(self.ts) + 1):
                if i == len(self.ts) or self.seg[i] != self.seg[i - 1]:
                    starts.append(self.ts[start])
                    ends.append(self.ts[i - 1])
                    prefix.append(prefix[-1] + self.ts[i - 1] - self.ts[start])
                    start = i
            self._segments = (starts, ends, prefix)
        return self._segments

    def covered(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] inside segments (backed by samples on both sides): two binary
        searches over the segments, built once."""
        starts, ends, prefix = self._segs()
        i = bisect.bisect_right(ends, t0)  # the first segment that ends after t0
        j = bisect.bisect_left(starts, t1)  # the segments that start before t1: [i, j)
        if i >= j:
            return 0.0
        total = prefix[j] - prefix[i] - max(0.0, t0 - starts[i]) - max(0.0, ends[j - 1] - t1)
        return max(0.0, total)

    def coverage(self, t0: float, t1: float) -> tuple[float, list[tuple[float, float]]]:
        """(seconds of [t0, t1] inside segments, the gaps inside [t0, t1]).

        A gap is time between two samples farther apart than ``max_gap_s``, and time at the
        window's edges that long before the first sample or after the last (a device that
        appeared during the window, or stopped answering before its end).

        Binary searches find the segments and the gaps that meet the window, so the cost is
        theirs, not the whole curve's: a series asks for hundreds of short windows of a day
        of samples. The seconds are summed segment by segment in time order, as a walk over
        every segment would (those outside the window add nothing), to the same float.
        """
        ts = self.ts
        covered = 0.0
        gaps: list[tuple[float, float]] = []
        if ts and ts[0] - t0 > self.max_gap_s and t1 > t0:
            gaps.append((t0, min(t1, ts[0])))
        starts, ends, _prefix = self._segs()
        # segments that end after t0 and start before t1
        for m in range(bisect.bisect_right(ends, t0), bisect.bisect_left(starts, t1)):
            covered += max(0.0, min(t1, ends[m]) - max(t0, starts[m]))
        # the gap after segment m, from ends[m] to starts[m + 1]: ends before t1, and the
        # next segment starts after t0
        first = max(0, bisect.bisect_right(starts, t0) - 1)
        for m in range(first, min(len(starts) - 1, bisect.bisect_left(ends, t1))):
            ga, gb = max(t0, ends[m]), min(t1, starts[m + 1])
            if gb > ga:
                gaps.append((ga, gb))
        if ts and t1 - ts[-1] > self.max_gap_s and t1 > t0:
            gaps.append((max(t0, ts[-1]), t1))
        return covered, gaps

    def integral(self, t0: float, t1: float, *, granularity_s: float | None = None) -> Integral:
        if t1 < t0:
            raise ValueError(f"window ends before it starts: [{t0}, {t1}]")
        if self.method == "none":
            return Integral(0.0, "none", 0.0, 0.0, self.n_samples, True)
        covered, gaps = self.coverage(t0, t1)
        return Integral(
            energy_j=self.between(t0, t1),
            method=self.method,
            covered_s=covered,
            gaps_s=sum(b - a for a, b in gaps),
            n_samples=self.n_samples,
            below_granularity=granularity_s is not None and (t1 - t0) < granularity_s,
            gaps=tuple(gaps),
        )


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
    return EnergyCurve(samples, max_gap_s=max_gap_s).integral(t0, t1, granularity_s=granularity_s)
