"""``h3d doctor``: every power backend, whether it works here, why not, and how to fix it."""

from __future__ import annotations

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
    width = max(len(r[0]) for r in rows)
    for family, ok, reason, fix in rows:
        print(f"{family:<{width}}  {'OK ' if ok else 'NO '} {reason}")
        if fix and not ok:
            print(f"{'':<{width}}      fix: {fix}")
    return 0
