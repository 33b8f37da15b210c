"""``h3d doctor``: every power backend, whether it works here, why not, and how to fix it."""

from __future__ import annotations

import time

from h3d import carbon
from h3d.config import Settings
from h3d.power import detect
from h3d.power.estimated import EstimatedCpuBackend


def main(settings: Settings) -> int:
    rows: list[tuple[str, bool, str, str]] = []
    for probe in detect.probe_all():
        rows.append((probe.family, probe.ok, probe.reason, probe.fix))
    est = EstimatedCpuBackend(settings.cpu_tdp_w)
    rows.append(
        (
            "estimated",
            True,
            f"always available: {est.info.model}; a model, not a measurement",
            "used only when nothing above works",
        )
    )
    if carbon.configured(settings):
        now = time.time()
        intensity, note = carbon.resolve(settings, now - 60.0, now)
        what = f"{intensity.source}: {intensity.detail}" if intensity else "unusable"
        rows.append(("carbon", intensity is not None, what + (f"; {note}" if note else ""), ""))
    else:
        rows.append(
            (
                "carbon",
                False,
                "no grid intensity configured: co2e_g is null (never guessed)",
                "set H3D_CARBON_INTENSITY_G_PER_KWH, H3D_CARBON_REGION, "
                "H3D_CARBON_TIMESERIES_CSV or H3D_ELECTRICITYMAPS_TOKEN (docs/power.md)",
            )
        )
    width = max(len(r[0]) for r in rows)
    for family, ok, reason, fix in rows:
        print(f"{family:<{width}}  {'OK ' if ok else 'NO '} {reason}")
        if fix and not ok:
            print(f"{'':<{width}}      fix: {fix}")
    return 0
