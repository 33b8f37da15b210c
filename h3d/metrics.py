"""Prometheus text exposition (format 0.0.4), base units, ``_total`` for counters.

Names after Kepler's: ``h3d_device_energy_joules_total``, ``h3d_device_power_watts``; runs
appear only while they are running, so finished runs do not grow the series set forever.

A scrape costs O(devices + running runs): device figures and each run's energy come from the
sampler's running totals (kept per tick), and η needs only the first and last few batches of
a single-process run (index seeks), never an integration over the run's history; a
distributed run's loss is over global steps, so its batches are read whole, as
``/v1/runs/{id}/eta`` reads them. Like every counter, a run's energy total starts over when
the daemon restarts; η is given only for runs this daemon followed from their start. A run
with no measured energy (no readable device) has no run series at all: unknown, never 0. A
run whose process is followed counts nothing until its first share is measured, then what it
drew since at that share (see ``PowerSampler``). The total runs to the sampler's last reading,
each tick at the share last measured, while REST's energy of a running run ends where its
last share interval does, each interval at the share measured over it: the two (and η over
them) differ by up to about one share interval's energy, either way. ``/metrics`` needs the
bearer token, as /v1 does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from h3d import analysis, carbon
from h3d import efficiency as eff
from h3d.power.sampler import PowerSampler
from h3d.storage import repository as repo
from h3d.storage.models import Run

if TYPE_CHECKING:
    from h3d.config import Settings


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: str | None) -> str:
    return ",".join(f'{k}="{_escape(v or "")}"' for k, v in kw.items())


def _family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if value is not None and math.isfinite(value):
            out.append(f"{name}{{{labels}}} {value!r}" if labels else f"{name} {value!r}")
    return out


class CarbonTotals:
    """Each running run's grams of CO2e, kept scrape by scrape: the energy added since the
    last scrape × the grid intensity now. O(running runs) per scrape, where re-integrating
    every run's history against the intensity series would grow with its age; the step
    between two scrapes (15-60 s) is far finer than any intensity series (hourly)."""

    def __init__(self) -> None:
        self._seen_j: dict[str, float] = {}
        self._grams: dict[str, float] = {}

    def update(
        self, settings: Settings, energy: list[tuple[str, float]]
    ) -> dict[str, tuple[float, str]]:
        now = time.time()
        intensity, _note = carbon.resolve(settings, now, now)
        live = {rid for rid, _e in energy}
        for gone in set(self._seen_j) - live:
            self._seen_j.pop(gone, None)
            self._grams.pop(gone, None)
        if intensity is None:
            return {}
        g_per_kwh = intensity.pieces(now, now + 1.0)[0][2]
        out = {}
        for rid, e in energy:
            delta = max(0.0, e - self._seen_j.get(rid, 0.0))
            self._seen_j[rid] = e
            self._grams[rid] = self._grams.get(rid, 0.0) + delta * g_per_kwh / carbon.J_PER_KWH
            out[rid] = (self._grams[rid], intensity.source)
        return out


def _eta(session: Session, run: Run, energy_j: float) -> float | None:
    """The run's η since its start over ``energy_j``, from the L₀ and Lₜ of
    ``/v1/runs/{id}/eta``: a single-process run's first and last few batches, by index seeks;
    a distributed run's global steps (the k-th batch of every rank is step k, its loss their
    mean: :func:`h3d.analysis.step_rows`), read whole."""
    if (run.world_size or 1) > 1:
        first = last = [
            (t, loss, n) for t, loss, n, _epoch, _phase in analysis.step_rows(session, run)
        ]
        b = len(first)
    else:
        b = (run.n_batches or 0) - (run.n_nonfinite or 0)
        first, last = repo.loss_ends(
            session, run_id=run.id, k0=eff.start_k(b), k=eff.smoothing_k(b)
        )
    if b < 2:
        return None
    # loss_at_start over the first start_k points picks what run_eta picks
    lt = eff.smoothed(last[-eff.smoothing_k(b) :])
    return eff.eta(eff.info_gain_bits(eff.loss_at_start_of(first, b), lt), energy_j)


def render(
    session: Session,
    sampler: PowerSampler | None,
    *,
    interval_s: float,
    settings: Settings | None = None,
    carbon_totals: CarbonTotals | None = None,
) -> str:
    devs = sampler.devices if sampler else []
    lines: list[str] = []
    lines += _family(
        "h3d_device_energy_joules_total",
        "counter",
        "Energy drawn by the device since the daemon started.",
        (
            (
                _labels(
                    device=d.backend.info.name,
                    uuid=d.backend.info.uuid,
                    source=d.backend.info.source,
                ),
                d.energy_total_j,
            )
            for d in devs
        ),
    )
    lines += _family(
        "h3d_device_power_watts",
        "gauge",
        "Last power reading of the device.",
        (
            (_labels(device=d.backend.info.name, source=d.backend.info.source), d.last_power_w)
            for d in devs
            if d.last_power_w is not None
        ),
    )
    lines += _family(
        "h3d_device_up",
        "gauge",
        "1 if the device's last read succeeded.",
        ((_labels(device=d.backend.info.name), 1.0 if d.status == "ok" else 0.0) for d in devs),
    )
    run_rows = []
    if sampler is not None:
        totals = dict(sampler.run_energy_j)
        since = dict(sampler.run_followed_since)
        for run in repo.running_runs(session):
            energy = totals.get(run.id)
            if energy is None:
                continue
            eta = None
            if since.get(run.id, float("inf")) - run.created_at < 5.0:  # followed from start
                eta = _eta(session, run, energy)
            run_rows.append((run, energy, eta))
    lines += _family(
        "h3d_run_energy_joules_total",
        "counter",
        "Energy attributed to a running run since this daemon began following it.",
        ((_labels(run=r.id, name=r.name), e) for r, e, _eta in run_rows),
    )
    lines += _family(
        "h3d_run_efficiency_bits_per_joule",
        "gauge",
        "Information gained per joule since the run started (eta).",
        ((_labels(run=r.id, name=r.name), eta) for r, _e, eta in run_rows if eta is not None),
    )
    if settings is not None and carbon_totals is not None and carbon.configured(settings):
        grams = carbon_totals.update(settings, [(r.id, e) for r, e, _eta in run_rows])
        lines += _family(
            "h3d_run_co2e_grams_total",
            "counter",
            "Grams of CO2e attributed to a running run (energy x grid intensity over time), "
            "since this daemon began following it.",
            (
                (_labels(run=r.id, name=r.name, source=grams[r.id][1]), grams[r.id][0])
                for r, _e, _eta in run_rows
                if r.id in grams
            ),
        )
    if sampler is not None:
        st = sampler.stats()
        lines += _family(
            "h3d_sampler_ticks_total", "counter", "Sampler ticks.", [("", float(st["ticks"]))]
        )
        store = st["storage"]
        lines += _family(
            "h3d_storage_up",
            "gauge",
            "1 if the last write of power readings succeeded.",
            [("", 1.0 if store["status"] == "ok" else 0.0)],
        )
        lines += _family(
            "h3d_storage_unstored_readings",
            "gauge",
            "Power readings held in memory, not stored yet.",
            [("", float(store["unstored_rows"]))],
        )
        lines += _family(
            "h3d_storage_dropped_readings_total",
            "counter",
            "Power readings dropped because they could not be stored (gaps).",
            [("", float(store["dropped_rows"]))],
        )
        if st["cpu_fraction_of_core"] is not None:
            lines += _family(
                "h3d_sampler_cpu_ratio",
                "gauge",
                "The sampler thread's CPU time over wall time (fraction of one core).",
                [("", st["cpu_fraction_of_core"])],
            )
    return "\n".join(lines) + "\n"
