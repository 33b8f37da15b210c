"""Run figures against docs/daemon.md "Definitions", on a store with a known power trace: one
device read every 0.5 s at a constant draw, so any window's energy is known by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from h3d import analysis
from h3d.config import Settings
from h3d.storage import repository as repo
from h3d.storage.models import Run

T0 = 1_000.0  # the runs' start
INTERVAL_S = 0.5


def device_reads(s: Session, *, spans: list[tuple[float, float]], power_w: float = 100.0) -> None:
    """One device, read every 0.5 s (relative to T0) over each span: between spans, a gap."""
    dev = repo.upsert_device(s, name="cpu", kind="cpu", source="rapl", model="", uuid_=None, now=T0)
    times = sorted({a + 0.5 * i for a, b in spans for i in range(int((b - a) / 0.5) + 1)})
    repo.add_power_samples(
        s,
        rows=[
            {"device_id": dev.id, "t": T0 + t, "power_w": power_w, "energy_j": None} for t in times
        ],
    )


def finished_run(
    s: Session,
    batches: Sequence[tuple[float, float, int | None, int | None, str | None]],
    *,
    duration_s: float,
    epochs: list[dict[str, object]] | None = None,
) -> Run:
    """A run from T0 to T0 + duration_s with ``batches`` (t from T0, loss, n, epoch, phase)."""
    run = repo.create_run(
        s, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=T0
    )
    rows = [
        repo.BatchRow(seq, T0 + t, loss, n, epoch, None, phase, None, None)
        for seq, (t, loss, n, epoch, phase) in enumerate(batches)
    ]
    repo.add_batches(s, run_id=run.id, batches=rows)
    if epochs:
        keys: dict[str, object] = {
            "phase": None,
            "accuracy": None,
            "loss": None,
            "val_loss": None,
            "metrics": {},
        }
        repo.add_epochs(s, run_id=run.id, epochs=[{**keys, **e} for e in epochs])
    repo.update_run(s, run_id=run.id, status="finished", name=None, tags=None, now=T0 + duration_s)
    return repo.get_run(s, run_id=run.id)


def report(s: Session, run: Run, settings: Settings | None = None) -> dict[str, Any]:
    return analysis.run_report(s, run=run, interval_s=INTERVAL_S, settings=settings)


def test_an_epoch_stamped_before_the_previous_ones_end_charges_no_time_twice(
    session: Session,
) -> None:
    """Epoch rows 0 at 20 s, 1 at 10 s, 2 at 30 s: epoch 2 was charged from 10 s, re-counting
    10-20 s of epoch 0 (the epochs summed to 4000 J of a 3000 J run, epoch 2's η halved)."""
    device_reads(session, spans=[(-2.0, 32.0)])
    batches = [(t + 0.5, 3.0 - 0.05 * t, 32, int(t) // 10, None) for t in range(30)]
    ends = {0: 20.0, 1: 10.0, 2: 30.0}
    run = finished_run(
        session,
        batches,
        duration_s=30.0,
        epochs=[{"epoch": e, "t": T0 + t} for e, t in ends.items()],
    )
    rep = report(session, run)
    epochs = {e["epoch"]: e for e in rep["epochs"]}
    assert epochs[0]["energy_j"] == pytest.approx(2000.0)
    assert epochs[1]["energy_j"] == 0.0 and epochs[1]["eta_bits_per_j"] is None
    assert epochs[2]["energy_j"] == pytest.approx(1000.0)  # 20-30 s, not 10-30 s
    assert epochs[2]["eta_bits_per_j"] == pytest.approx(epochs[2]["info_gain_bits"] / 1000.0)
    total = sum(e["energy_j"] for e in epochs.values())
    assert total == pytest.approx(rep["energy"]["energy_j"])


def test_marginal_eta_of_a_window_before_the_first_batch_starts_from_l0(
    session: Session,
) -> None:
    """A 40 s run whose first batch came 31 s in (data loading): its last 20 s are not the
    whole run. It was flagged "whole run, shorter than the window", over all 4000 J."""
    device_reads(session, spans=[(-2.0, 42.0)])
    batches = [(31.0 + 0.5 * i, 3.0 - 0.1 * i, 32, None, None) for i in range(18)]
    run = finished_run(session, batches, duration_s=40.0)
    eta = analysis.run_eta(session, run=run, window_s=20.0, interval_s=INTERVAL_S)
    assert eta["window_is_whole_run"] is False
    assert eta["window_energy_j"] == pytest.approx(2000.0)  # 20-40 s at 100 W
    bits = (eta["loss_start"] - eta["loss_now"]) / math.log(2)  # L_{t-w} = L0: no update yet
    assert eta["marginal_eta_bits_per_j"] == pytest.approx(bits / 2000.0)
    assert eta["eta_bits_per_j"] == pytest.approx(bits / 4000.0)


def test_marginal_eta_of_a_run_shorter_than_the_window_is_its_eta(session: Session) -> None:
    """Batches stamped from 5 s before the run's start (the API takes them): a 25 s run
    against a 28 s window is the whole run, so its marginal η is η. L_{t-w} came from the
    batches before t-w, not L0: 0.001096 against η 0.001356."""
    device_reads(session, spans=[(-7.0, 27.0)])
    batches = [(-5.0 + i, 3.0 - 0.05 * i, 32, None, None) for i in range(30)]
    run = finished_run(session, batches, duration_s=25.0)
    eta = analysis.run_eta(session, run=run, window_s=28.0, interval_s=INTERVAL_S)
    assert eta["window_is_whole_run"] is True
    assert eta["window_energy_j"] == pytest.approx(eta["energy_j"])
    assert eta["marginal_eta_bits_per_j"] == pytest.approx(eta["eta_bits_per_j"])


def test_a_batch_of_no_samples_has_no_weight_in_the_loss(session: Session) -> None:
    """19 batches of 32 samples at 2.0, then one of n = 0 at 0.0: the sample-weighted mean
    is 2.0 (it read (32·2 + 1·0)/33 = 1.94: n = 0 weighed as 1)."""
    device_reads(session, spans=[(-2.0, 22.0)])
    batches = [(1.0 + i, 2.0, 32, None, None) for i in range(19)] + [(20.0, 0.0, 0, None, None)]
    run = finished_run(session, batches, duration_s=20.0)
    eta = analysis.run_eta(session, run=run, window_s=60.0, interval_s=INTERVAL_S)
    assert eta["loss_now"] == 2.0 and eta["info_gain_bits"] == 0.0
    # /metrics' read of the first and last points weighs them alike
    first, last = repo.loss_ends(session, run_id=run.id, k0=1, k=2)
    assert first == [(T0 + 1.0, 2.0, 32.0)] and last == [(T0 + 19.0, 2.0, 32.0)]


def test_an_epochs_logged_loss_is_returned_beside_its_batches_mean(session: Session) -> None:
    device_reads(session, spans=[(-2.0, 12.0)])
    batches = [(1.0 + i, 2.0 - 0.01 * i, 32, 0, None) for i in range(10)]
    run = finished_run(
        session, batches, duration_s=10.0, epochs=[{"epoch": 0, "t": T0 + 10.0, "loss": 9.9}]
    )
    (ep,) = report(session, run)["epochs"]
    assert ep["logged_loss"] == 9.9
    assert ep["loss"] == pytest.approx(sum(b[1] for b in batches) / 10)


def test_a_phase_that_recurs_has_a_row_each_time_and_the_rows_tile_the_run(
    session: Session,
) -> None:
    """Phases a, b, a, ten 1 s batches each: b was shown ending before it started, with 0 J,
    and a charged all 3000 J (b's 10 s among them)."""
    device_reads(session, spans=[(-2.0, 32.0)])
    names = ["a"] * 10 + ["b"] * 10 + ["a"] * 10
    batches = [(1.0 + i, 3.0 - 0.05 * i, 32, None, p) for i, p in enumerate(names)]
    run = finished_run(session, batches, duration_s=30.0)
    phases = report(session, run)["phases"]
    got = [(p["phase"], p["t_start"] - T0, p["t_end"] - T0, p["batches"]) for p in phases]
    assert got == [("a", 0.0, 10.0, 10), ("b", 10.0, 20.0, 10), ("a", 20.0, 30.0, 10)]
    for p in phases:
        assert p["energy_j"] == pytest.approx(1000.0)
        assert p["info_gain_bits"] == pytest.approx(0.45 / math.log(2))  # 9 batches of 0.05
        assert p["eta_bits_per_j"] == pytest.approx(p["info_gain_bits"] / 1000.0)


def test_a_run_no_device_read_has_unknown_energy_not_0_j(session: Session, tmp_path: Path) -> None:
    """A run inside a gap of the readings (the daemon down or restarting) read 0 J, 0 J above
    idle and 0 g CO2e, as though measured."""
    device_reads(session, spans=[(-20.0, -10.0), (40.0, 50.0)])
    repo.set_idle_power(session, device_id=repo.devices(session)[0].id, idle_power_w=50.0)
    batches = [(0.5 + 0.5 * i, 2.0 - 0.01 * i, 32, 0, None) for i in range(14)]
    run = finished_run(session, batches, duration_s=7.8)
    settings = Settings(data_dir=tmp_path, carbon_intensity_g_per_kwh=400.0)
    rep = report(session, run, settings=settings)
    e = rep["energy"]
    assert e["by_device"][0]["covered_s"] == 0.0
    assert e["energy_j"] is None and e["device_energy_j"] is None
    assert e["active_energy_j"] is None
    assert e["active_energy_note"] == analysis.UNREAD_NOTE
    assert rep["co2e_g"] is None and e["co2e_g"] is None
    assert rep["eta"]["eta_bits_per_j"] is None
    assert rep["epochs"][0]["energy_j"] is None
    for metric in ("energy", "eta"):
        series = analysis.cumulative_series(
            session, run=run, points=100, interval_s=INTERVAL_S, metric=metric
        )
        assert series == [], metric


def test_a_device_read_while_it_drew_nothing_reads_0_j(session: Session, tmp_path: Path) -> None:
    device_reads(session, spans=[(-2.0, 12.0)], power_w=0.0)
    run = finished_run(session, [(1.0, 2.0, 32, None, None)], duration_s=10.0)
    settings = Settings(data_dir=tmp_path, carbon_intensity_g_per_kwh=400.0)
    e = analysis.run_energy(session, run=run, interval_s=INTERVAL_S, settings=settings)
    assert e["energy_j"] == 0.0 and e["co2e_g"] == 0.0


def test_a_run_across_a_gap_counts_what_was_read(session: Session, tmp_path: Path) -> None:
    """Readings stop from 10 s to 20 s (a restart): the gap adds nothing, the rest counts;
    the cumulative energy goes on past the gap, and an hourly carbon series' piece no device
    read adds no grams."""
    device_reads(session, spans=[(-2.0, 10.0), (20.0, 32.0)])
    batches = [(1.0 + i, 3.0 - 0.05 * i, 32, None, None) for i in range(30)]
    run = finished_run(session, batches, duration_s=30.0)
    csv = tmp_path / "carbon.csv"
    csv.write_text(f"time,g_per_kwh\n{T0 - 3600},400\n{T0 + 12},800\n{T0 + 18},400\n")
    settings = Settings(data_dir=tmp_path, carbon_timeseries_csv=csv)
    e = analysis.run_energy(session, run=run, interval_s=INTERVAL_S, settings=settings)
    assert e["energy_j"] == pytest.approx(2000.0)
    assert e["co2e_g"] == pytest.approx(2000.0 * 400 / 3.6e6)
    series = analysis.cumulative_series(
        session, run=run, points=100, interval_s=INTERVAL_S, metric="energy"
    )
    assert series[-1][0] == T0 + 30.0 and series[-1][1] == pytest.approx(2000.0)


def test_cumulative_energy_starts_at_the_first_batch(session: Session) -> None:
    """The dashboard places each loss point on this curve: a curve from the k-th batch (the
    η smoothing window, up to 50 batches) left the run's first, steepest batches off its
    loss-against-energy chart, energy the devices had read. η still starts at the k-th."""
    device_reads(session, spans=[(-2.0, 62.0)])  # 100 W over the whole run
    batches = [(0.1 * (i + 1), 3.0 - 1e-3 * i, 32, None, None) for i in range(600)]
    run = finished_run(session, batches, duration_s=60.0)
    energy = analysis.cumulative_series(
        session, run=run, points=600, interval_s=INTERVAL_S, metric="energy"
    )
    assert len(energy) == 600
    assert energy[0][0] == pytest.approx(T0 + 0.1)  # the first batch's time
    assert energy[0][1] == pytest.approx(10.0)  # 0.1 s at 100 W since the run's start
    assert energy[-1][1] == pytest.approx(6000.0)
    eta = analysis.cumulative_series(
        session, run=run, points=600, interval_s=INTERVAL_S, metric="eta"
    )
    k = 50  # smoothing_k(600)
    assert len(eta) == 600 - k and eta[0][0] == pytest.approx(T0 + 0.1 * (k + 1))


@pytest.mark.parametrize("points", [1, 3, 100, 500])
def test_cumulative_series_has_at_most_points_ending_at_the_last_batch(
    session: Session, points: int
) -> None:
    """1156 finite batches gave 4 points for 3, 554 for 500."""
    device_reads(session, spans=[(-2.0, 122.0)])
    batches = [(0.1 * (i + 1), 3.0 - 1e-3 * i, 32, None, None) for i in range(1156)]
    run = finished_run(session, batches, duration_s=120.0)
    for metric in ("energy", "eta"):
        got = analysis.cumulative_series(
            session, run=run, points=points, interval_s=INTERVAL_S, metric=metric
        )
        assert len(got) == points, metric  # as many as asked: the run has more batches
        assert got[-1][0] == pytest.approx(T0 + 115.6), metric
