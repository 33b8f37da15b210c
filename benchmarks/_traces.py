"""Synthetic power traces with known integrals, for the energy benchmarks.

Each trace is ``(power(t) in W, energy from 0 to t in J)``, t in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

Trace = tuple[Callable[[float], float], Callable[[float], float]]


def steps(period: float, lo: float = 50.0, hi: float = 250.0) -> Trace:
    """A square wave: ``hi`` for the first half of each period, ``lo`` for the second."""
    half = period / 2

    def p(t: float) -> float:
        return hi if (t % period) < half else lo

    def e(t: float) -> float:
        n, r = divmod(t, period)
        return n * (hi + lo) * half + (hi * r if r < half else hi * half + lo * (r - half))

    return p, e


def ramp(start: float = 20.0, slope: float = 30.0) -> Trace:
    return (lambda t: start + slope * t), (lambda t: start * t + slope * t * t / 2)


def bursts(period: float, width: float = 0.03, base: float = 40.0, peak: float = 300.0) -> Trace:
    """``peak`` for ``width`` seconds at the start of each period, ``base`` otherwise."""

    def p(t: float) -> float:
        return peak if (t % period) < width else base

    def e(t: float) -> float:
        n, r = divmod(t, period)
        return (
            n * (base * period + (peak - base) * width) + base * r + (peak - base) * min(r, width)
        )

    return p, e
