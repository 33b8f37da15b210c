"""Turn ``H3D_POWER_BACKENDS`` into backend objects (probing is isolated per family)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the backends are imported when built: Settings checks a spec without them
    from h3d.config import Settings
    from h3d.power.base import PowerBackend

logger = logging.getLogger(__name__)

KNOWN = "auto, estimated, constant:<W>, none"


def parse_backends(spec: str) -> list[tuple[str, float | None]]:
    """``H3D_POWER_BACKENDS`` as (family, watts of ``constant:<W>`` else None) items, in
    order; a ValueError names the first item that is none of them (Settings checks the
    variable with it, so a bad one is one line at start, before anything is created)."""
    out: list[tuple[str, float | None]] = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        if item in ("auto", "estimated", "none"):
            out.append((item, None))
        elif item.startswith("constant:"):
            try:
                watts = float(item.split(":", 1)[1])
            except ValueError:
                watts = math.nan
            if not (math.isfinite(watts) and watts >= 0):
                raise ValueError(
                    f"{item!r}: the watts of constant:<W> must be a finite number >= 0"
                )
            out.append(("constant", watts))
        else:
            raise ValueError(f"unknown power backend {item!r} (known: {KNOWN})")
    return out


def _hardware() -> list[PowerBackend]:
    """Every readable device (NVML, RAPL, Apple), or [] where nothing can be read."""
    from h3d.power import detect

    try:
        return list(detect.detect_backends())
    except Exception:  # probing must never take the daemon down
        logger.exception("device detection failed; continuing without hardware backends")
        return []


def settings_backends(settings: Settings) -> list[PowerBackend]:
    """The daemon's backends, as its settings name them (``H3D_POWER_BACKENDS``, the CPU's
    TDP, the sampling period)."""
    return build_backends(
        settings.power_backends,
        cpu_tdp_w=settings.cpu_tdp_w,
        sample_interval_s=settings.sample_interval_s,
    )


def build_backends(
    spec: str, *, cpu_tdp_w: float | None, sample_interval_s: float | None = None
) -> list[PowerBackend]:
    """``auto`` | ``estimated`` | ``constant:<W>`` | ``none``, comma-separated.

    ``sample_interval_s``: the sampler's period. The estimated model's shortest window is
    kept under half of it, so that every scheduled read measures (a 50 ms period with a 50 ms
    shortest window would skip about every other read, by the wake-ups' jitter); only a read
    off the schedule that close to a scheduled one repeats the last figure."""
    from h3d.power.estimated import MIN_WINDOW_S, EstimatedCpuBackend
    from h3d.power.fake import ConstantBackend

    min_window_s = (
        MIN_WINDOW_S if sample_interval_s is None else min(MIN_WINDOW_S, sample_interval_s / 2)
    )

    def estimated() -> EstimatedCpuBackend:
        return EstimatedCpuBackend(cpu_tdp_w, min_window_s=min_window_s)

    out: list[PowerBackend] = []
    for i, (item, watts) in enumerate(parse_backends(spec)):
        if item == "auto":
            hw = _hardware()
            if not hw:
                logger.warning(
                    "no power device is readable (NVML, RAPL, Apple): using the ESTIMATED "
                    "CPU model (utilisation x TDP); `h3d doctor` says how to enable one"
                )
                hw = [estimated()]
            out.extend(hw)
        elif item == "estimated":
            out.append(estimated())
        elif item == "constant":
            assert watts is not None
            out.append(ConstantBackend(watts, name=f"constant:{i}"))
    if not out:
        logger.warning("no power backend: energy and η will be reported as unknown (source=none)")
    for b in out:
        logger.info("power device %s (%s)", b.info.name, b.info.source)
    return out
