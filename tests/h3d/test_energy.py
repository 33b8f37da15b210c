"""Energy integration and η on traces with known answers."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest

from h3d import efficiency as eff
from h3d.downsample import lttb
from h3d.energy import EnergyCurve, Sample, integrate


def ramp(t0: float, t1: float, dt: float, f) -> list[tuple[float, float | None, float | None]]:
    n = int(round((t1 - t0) / dt))
    return [(t0 + i * dt, f(t0 + i * dt), None) for i in range(n + 1)]


def test_trapezoid_is_exact_on_piecewise_linear_power_with_interpolated_edges() -> None:
    s = ramp(0.0, 10.0, 1.0, lambda t: 10.0 + 2.0 * t)
    # window edges between samples: ∫_{2.5}^{7.25} (10 + 2t) dt
    exact = (10 * 7.25 + 7.25**2) - (10 * 2.5 + 2.5**2)
    r = integrate(s, 2.5, 7.25)
    assert r.method == "trapezoid" and r.energy_j == pytest.approx(exact, rel=1e-12)
    assert r.covered_s == pytest.approx(4.75) and r.gaps_s == 0.0


def test_not_a_rectangle_sum() -> None:
    s = [(0.0, 0.0, None), (1.0, 100.0, None)]
    assert integrate(s, 0.0, 1.0).energy_j == pytest.approx(50.0)


def test_counter_difference_interpolated_at_edges_and_resets_not_counted() -> None:
    # a 20 W counter sampled every 0.5 s, reset to 0 at t=5 (daemon restart)
    s = [(t * 0.5, None, 20.0 * t * 0.5) for t in range(11)]
    s += [(5.0 + t * 0.5, None, 20.0 * t * 0.5) for t in range(1, 11)]
    r = integrate(s, 1.25, 9.75)
    assert r.method == "counter"
    # the reset falls between t=5.0 (last old sample) and t=5.5 (first new): 0.5 s unbridged
    assert r.energy_j == pytest.approx(20.0 * (9.75 - 1.25 - 0.5))
    assert r.gaps_s == pytest.approx(0.5)


def test_gaps_are_reported_not_bridged() -> None:
    s = ramp(0.0, 2.0, 0.1, lambda t: 10.0) + ramp(12.0, 14.0, 0.1, lambda t: 10.0)
    r = integrate(s, 0.0, 14.0, max_gap_s=1.0)
    assert r.energy_j == pytest.approx(40.0)
    assert r.gaps == ((2.0, 12.0),) and r.gaps_s == pytest.approx(10.0)


def test_short_window_is_flagged_and_no_samples_is_none() -> None:
    s = ramp(0.0, 10.0, 1.0, lambda t: 5.0)
    assert integrate(s, 3.0, 3.2, granularity_s=1.0).below_granularity
    r = integrate([], 0.0, 1.0)
    assert r.method == "none" and r.energy_j == 0.0
    with pytest.raises(ValueError):
        integrate(s, 2.0, 1.0)


def test_eta_definitions() -> None:
    pts = [(float(i), 2.0 if i < 10 else 1.0, 1.0) for i in range(100)]
    k = eff.smoothing_k(len(pts))
    assert k == 10
    assert eff.start_k(len(pts)) == 1 and eff.start_k(10_000) == 5
    bits = eff.info_gain_bits(eff.loss_at_start(pts), eff.smoothed(pts[-k:]))
    assert bits == pytest.approx(1.0 / math.log(2))
    assert eff.eta(bits, 10.0) == pytest.approx(bits / 10.0)
    assert eff.eta(bits, 0.0) is None and eff.eta(None, 5.0) is None
    assert eff.loss_before(pts, -1.0, k) is None
    # L₀ is the first batch when it holds enough samples, whatever comes next ...
    big = [(0.0, 2.30, 64.0), (1.0, 1.50, 64.0), (2.0, 1.20, 64.0)] + [
        (3.0 + i, 1.0, 64.0) for i in range(1000)
    ]
    assert eff.loss_at_start(big) == pytest.approx(2.30)
    # ... so a faster-falling run (higher learning rate) does not start lower
    fast = [(0.0, 2.30, 64.0), (1.0, 0.90, 64.0), (2.0, 0.50, 64.0)] + big[3:]
    assert eff.loss_at_start(fast) == eff.loss_at_start(big)
    # tiny batches are averaged up to 32 samples (at most start_k batches)
    tiny = [(float(i), 2.0 + i, 8.0) for i in range(1000)]
    assert eff.loss_at_start(tiny) == pytest.approx(3.5)  # batches 0..3: 32 samples
    assert pytest.approx(3.48e20, rel=0.01) == eff.LANDAUER_BITS_PER_J_300K


def test_lttb_keeps_extremes_and_ends() -> None:
    pts = [(float(i), math.sin(i / 10.0) + (5.0 if i == 537 else 0.0)) for i in range(2000)]
    out = lttb(pts, 100)
    assert len(out) == 100 and out[0] == pts[0] and out[-1] == pts[-1]
    assert (537.0, pts[537][1]) in out  # the spike survives
    assert lttb(pts[:50], 100) == pts[:50]


def test_curve_windows_agree_with_integrate_and_flag_short_windows() -> None:
    from h3d.energy import EnergyCurve

    s = ramp(0.0, 10.0, 0.5, lambda t: 3.0 + t)
    curve = EnergyCurve(s)
    for a, b in ((0.0, 10.0), (0.25, 0.3), (2.1, 7.9)):
        assert curve.between(a, b) == pytest.approx(integrate(s, a, b).energy_j)
    assert curve.integral(1.0, 1.2, granularity_s=0.5).below_granularity
    assert not curve.integral(1.0, 2.0, granularity_s=0.5).below_granularity


def test_covered_seconds_agree_with_the_segment_walk_on_random_curves() -> None:
    import random

    from h3d.energy import EnergyCurve

    rng = random.Random(1)
    for _ in range(200):
        t, samples = 0.0, []
        for _k in range(rng.randint(0, 40)):
            t += rng.choice([0.1, 0.2, 0.5, 7.0, 12.0])
            samples.append((t, 100.0, None))
        curve = EnergyCurve(samples, max_gap_s=5.0)
        for _w in range(20):
            a = rng.uniform(-5, t + 5)
            b = a + rng.uniform(0, 30)
            assert curve.covered(a, b) == pytest.approx(curve.coverage(a, b)[0], abs=1e-9)


def test_a_device_gone_before_the_window_ends_or_come_after_it_began_is_a_gap() -> None:
    """Time at a window's edges farther than max_gap_s from any sample holds no energy
    either: it is reported as a gap, as time between two samples is."""
    samples = [(t / 10, 300.0, None) for t in range(200, 501)]  # samples over [20, 50] only
    got = integrate(samples, 0.0, 100.0, max_gap_s=1.0)
    assert got.energy_j == pytest.approx(300.0 * 30.0)
    assert got.covered_s == pytest.approx(30.0) and got.gaps_s == pytest.approx(70.0)
    assert [tuple(round(x, 6) for x in g) for g in got.gaps] == [(0.0, 20.0), (50.0, 100.0)]
    # an edge closer than max_gap_s to its sample is the sampler's period, not a gap
    edges = integrate(samples, 19.95, 50.05, max_gap_s=1.0)
    assert edges.gaps_s == 0.0


def test_energy_above_idle_takes_idle_off_only_where_there_is_energy() -> None:
    """A 200 W device with a 100 W idle baseline and a 50 s sampler stall in a 100 s window:
    50 s of energy (10 000 J), so 5 000 J above idle, not 10 000 − 100 × 100 ≈ 0."""
    from h3d.analysis import _DeviceModel
    from h3d.energy import EnergyCurve

    samples = [(t / 10, 200.0, None) for t in range(0, 251)]
    samples += [(t / 10, 200.0, None) for t in range(750, 1001)]
    model = _DeviceModel(None, EnergyCurve(samples, max_gap_s=1.0), [], [], 100.0)  # type: ignore[arg-type]
    energy, active = model.attributed(0.0, 100.0, 100.0)
    assert energy == pytest.approx(10_000.0) and active == pytest.approx(5_000.0)
    shared = _DeviceModel(
        None,  # type: ignore[arg-type]
        EnergyCurve(samples, max_gap_s=1.0),
        [0.0, 50.0],
        [0.5, 1.0],
        100.0,
    )
    energy, active = shared.attributed(0.0, 100.0, 100.0)
    assert energy == pytest.approx(0.5 * 5_000 + 5_000) and active == pytest.approx(
        0.5 * 2_500 + 2_500
    )


def _walk_coverage(
    curve: EnergyCurve, t0: float, t1: float
) -> tuple[float, list[tuple[float, float]]]:
    """Coverage as a walk over every sample (the reference the binary searches must match)."""
    ts, seg = curve.ts, curve.seg
    covered = 0.0
    gaps: list[tuple[float, float]] = []
    if ts and ts[0] - t0 > curve.max_gap_s and t1 > t0:
        gaps.append((t0, min(t1, ts[0])))
    start = 0
    for i in range(1, len(ts) + 1):
        if i == len(ts) or seg[i] != seg[i - 1]:
            covered += max(0.0, min(t1, ts[i - 1]) - max(t0, ts[start]))
            if i < len(ts):
                ga, gb = max(t0, ts[i - 1]), min(t1, ts[i])
                if gb > ga:
                    gaps.append((ga, gb))
            start = i
    if ts and t1 - ts[-1] > curve.max_gap_s and t1 > t0:
        gaps.append((max(t0, ts[-1]), t1))
    return covered, gaps


def _random_trace(rng: random.Random) -> list[Sample]:
    """Samples with stalls, counter resets, steps retention thinned, rows without a power or
    a counter, and repeated times."""
    counter = rng.random() < 0.6
    t, e = rng.uniform(-20, 20), 0.0
    rows: list[Sample] = []
    for _k in range(rng.randint(0, 60)):
        step = rng.choice([0.0, 0.1, 0.1, 0.2, 0.5, 3.0, 7.0, 12.0, 40.0])
        p = rng.uniform(0, 300)
        if rows and step > 5.0 and rng.random() < 0.4:  # a thinned step: it says so
            t_prev, _p, e_prev = rows[-1]
            e_prev = e if e_prev is None else e_prev
            e_next = e_prev + rng.uniform(0, 300) * step
            rows[-1] = (t_prev, (e_next - e_prev) / (t + step - t_prev), e_prev)
            t, e = t + step, e_next
            rows.append((t, p, e))
            continue
        t += step
        e += p * step
        if counter and rng.random() < 0.05:
            e = rng.uniform(0, 10)  # a reset
        r = rng.random()
        rows.append((t, None if r < 0.05 else p, e if counter and r > 0.1 else None))
    return rows


def test_coverage_agrees_with_a_walk_over_every_sample_on_random_traces() -> None:
    from h3d.energy import thinned_step

    rng = random.Random(7)
    thinned = resets = 0
    for _ in range(400):
        rows = _random_trace(rng)
        thinned += sum(
            thinned_step(a, b) and b[0] - a[0] > 5.0 for a, b in itertools.pairwise(rows)
        )
        curve = EnergyCurve(rows, max_gap_s=5.0)
        resets += len(set(curve.seg)) - 1
        end = curve.ts[-1] if curve.ts else 0.0
        windows = [(-100.0, end + 100.0), (end, end), (-30.0, -30.0)]
        for _w in range(30):
            a = rng.uniform(-40, end + 40)
            windows.append((a, a + rng.choice([0.0, 0.05, rng.uniform(0, 5), rng.uniform(0, 80)])))
        windows += [(t, t + 1.0) for t in curve.ts[:5]] + [(t - 1.0, t) for t in curve.ts[-5:]]
        for a, b in windows:
            covered, gaps = curve.coverage(a, b)
            want_covered, want_gaps = _walk_coverage(curve, a, b)
            assert covered == pytest.approx(want_covered, rel=1e-12, abs=0.0)
            assert len(gaps) == len(want_gaps)
            for got, want in zip(gaps, want_gaps, strict=True):
                assert got == pytest.approx(want, rel=1e-12, abs=0.0)
            if curve.method != "none":
                r = curve.integral(a, b)
                assert r.covered_s == covered and r.gaps == tuple(gaps)
    assert thinned > 100 and resets > 1000  # the traces had what they are meant to have


class _CountingList(list[Any]):
    """A list that counts the reads of its items."""

    reads = 0

    def __getitem__(self, i: Any) -> Any:
        _CountingList.reads += 1
        return super().__getitem__(i)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]


def test_coverage_of_a_short_window_reads_a_few_samples_not_all_of_them() -> None:
    """A day at 10 Hz with a stall an hour: the energy series asks for hundreds of short
    windows, each read all 864 000 samples (3.6 s for an hour's run, 85 s for a day's)."""
    n = 864_000
    rows = [(k * 0.1 + (60.0 if k >= n // 2 else 0.0), 200.0, None) for k in range(n)]
    curve = EnergyCurve(rows, max_gap_s=1.0)
    want = [_walk_coverage(curve, a, a + 170.0) for a in (0.0, 43_150.0, 86_000.0)]
    curve.coverage(0.0, 1.0)  # the segments are built once, on the first window
    curve.ts, curve.seg = _CountingList(curve.ts), _CountingList(curve.seg)
    _CountingList.reads = 0
    got = [curve.coverage(a, a + 170.0) for a in (0.0, 43_150.0, 86_000.0)]
    # a walk over every sample read 2 × 864 000 a window; binary searches read about 2 × 20
    assert _CountingList.reads <= 3 * 100
    assert got == want and want[1][1] == [(43_199.9, 43_260.0)]
    _CountingList.reads = 0
    for _ in range(200):
        curve.integral(40_000.0, 40_010.0)
    assert _CountingList.reads <= 200 * 100


def test_rank_weights_by_binary_search_match_the_sum_over_every_row() -> None:
    """A rank's share-seconds in each union piece, found by binary search over its rows, are
    the sums over all its rows (a late rank's first row spans several pieces)."""
    from h3d.analysis import _weigh, _weights

    rng = random.Random(3)
    for _ in range(300):
        rows, t = [], rng.uniform(0, 5)
        for _k in range(rng.randint(0, 40)):
            length = rng.choice([0.0, 0.5, 1.0, 1.0, 7.5])
            rows.append((t, t + length, rng.choice([0.0, 0.25, rng.random()])))
            t += rng.choice([0.0, 0.5, 1.0, 1.0, 2.0])
        rows.sort()
        cuts = sorted(rng.uniform(-2, t + 2) for _c in range(rng.randint(1, 30)))
        pieces = list(itertools.pairwise(cuts)) + [(c, c) for c in cuts]
        pieces += [(r[0], r[1]) for r in rows[:5]] + [(r[1], r[1]) for r in rows[:5]]
        got = _weights(rows, pieces)
        assert got == [_weigh(rows, a, b) for a, b in pieces]
