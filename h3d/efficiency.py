"""Information gain and η (pure functions, no I/O). DESIGN.md §3.

- L is the smoothed mean cross-entropy in nats: the sample-weighted mean of K batch losses,
  K = clamp(B // 10, 1, 50) for a run of B finite batches.
- L₀ is the loss at the initial parameters: the first logged batch, whose forward pass ran
  before any update, so it does not depend on the learning rate (a wider window there gave a
  run with a higher learning rate a lower L₀ and so a smaller ΔI for a better model). Only
  when that batch holds fewer than ``START_SAMPLES`` samples are the next ones averaged in,
  up to k₀ = clamp(B // 100, 1, 5) batches, to tame the noise of tiny batches.
- ΔI (bits per sample) = (L₀ − Lₜ) / ln 2; ΔI_total = N_train · ΔI.
- η = ΔI / E (bits/J); the marginal η over a window w is (L_{t−w} − Lₜ)/ln 2 / E_w.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LN2 = math.log(2.0)
LANDAUER_BITS_PER_J_300K = 1.0 / (1.380649e-23 * 300.0 * LN2)

BatchPoint = tuple[float, float, float]  # (t_s, loss_nats, weight n)


def smoothing_k(n_batches: int) -> int:
    return max(1, min(50, n_batches // 10))


def start_k(n_batches: int) -> int:
    return max(1, min(5, n_batches // 100))


def smoothed(points: Sequence[BatchPoint]) -> float | None:
    """Weighted mean loss of ``points``; None when there are none.

    Taken as the first loss plus the weighted mean of the others' differences from it, summed
    exactly (``math.fsum``): equal losses give that loss exactly, so two windows of the same
    loss give ΔI = 0, not ±1e-17 bits of rounding (Σ lᵢwᵢ / Σ wᵢ of 100 losses of 0.1 is not
    0.1, and a run whose loss stood still showed η = −7.5e-17 bits/J).
    """
    if not points:
        return None
    w = math.fsum(p[2] for p in points)
    if w <= 0:
        return None
    ref = points[0][1]
    return ref + math.fsum((p[1] - ref) * p[2] for p in points) / w


START_SAMPLES = 32.0


def loss_at_start(points: Sequence[BatchPoint]) -> float | None:
    """L₀: the first batch's loss, widened over up to ``start_k`` batches only while fewer
    than ``START_SAMPLES`` samples (batch weights) have been seen."""
    return loss_at_start_of(points, len(points))


def loss_at_start_of(points: Sequence[BatchPoint], n_batches: int) -> float | None:
    """:func:`loss_at_start` of a run of ``n_batches`` of which ``points`` are the first."""
    k_max = start_k(n_batches)
    weight, k = 0.0, 0
    while k < min(k_max, len(points)) and (k == 0 or weight < START_SAMPLES):
        weight += points[k][2]
        k += 1
    return smoothed(points[:k])


def loss_before(points: Sequence[BatchPoint], t: float, k: int) -> float | None:
    """Smoothed loss of the ``k`` batches that ended at or before ``t``."""
    upto = [p for p in points if p[0] <= t]
    return smoothed(upto[-k:]) if upto else None


def info_gain_bits(l0: float | None, lt: float | None) -> float | None:
    if l0 is None or lt is None:
        return None
    return (l0 - lt) / LN2


def eta(bits: float | None, energy_j: float | None) -> float | None:
    """Bits per joule, or None when either is unknown or no energy was measured."""
    if bits is None or energy_j is None or energy_j <= 0.0:
        return None
    return bits / energy_j
