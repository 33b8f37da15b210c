"""Prometheus text exposition (format 0.0.4), base units, ``_total`` for counters.

Names after Kepler's: ``h3d_device_energy_joules_total``, ``h3d_device_power_watts``; runs
appear only while they are running, so finished runs do not grow the series set forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from h3d import analysis, carbon
from h3d.power.sampler import PowerSampler
from h3d.storage import repository as repo

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


def render(
    session: Session,
    sampler: PowerSampler | None,
    *,
    interval_s: float,
    settings: Settings | None = None,
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
    runs, _count, _next = repo.list_runs(session, status="running", limit=1000)
    run_rows = []
    for run in runs:
        eta = analysis.run_eta(session, run=run, window_s=60.0, interval_s=interval_s)
        run_rows.append((run, eta))
    lines += _family(
        "h3d_run_energy_joules_total",
        "counter",
        "Energy attributed to a running run.",
        (
            (_labels(run=r.id, name=r.name), e["energy_j"])
            for r, e in run_rows
            if e["energy_j"] is not None
        ),
    )
    lines += _family(
        "h3d_run_efficiency_bits_per_joule",
        "gauge",
        "Information gained per joule since the run started (eta).",
        (
            (_labels(run=r.id, name=r.name), e["eta_bits_per_j"])
            for r, e in run_rows
            if e["eta_bits_per_j"] is not None
        ),
    )
    if settings is not None and carbon.configured(settings):
        grams = []
        for r, _e in run_rows:
            c = analysis.run_energy(session, run=r, interval_s=interval_s, settings=settings)
            if c["co2e_g"] is not None:
                grams.append(
                    (_labels(run=r.id, name=r.name, source=c["carbon_source"]), c["co2e_g"])
                )
        lines += _family(
            "h3d_run_co2e_grams_total",
            "counter",
            "Grams of CO2e attributed to a running run (energy x grid intensity over time).",
            grams,
        )
    if sampler is not None:
        st = sampler.stats()
        lines += _family(
            "h3d_sampler_ticks_total", "counter", "Sampler ticks.", [("", float(st["ticks"]))]
        )
        if st["cpu_fraction_of_core"] is not None:
            lines += _family(
                "h3d_sampler_cpu_ratio",
                "gauge",
                "The sampler thread's CPU time over wall time (fraction of one core).",
                [("", st["cpu_fraction_of_core"])],
            )
    return "\n".join(lines) + "\n"
