"""Turn ``H3D_POWER_BACKENDS`` into backend objects (probing is isolated per family)."""

from __future__ import annotations

import logging

from h3d.power.base import PowerBackend
from h3d.power.estimated import MIN_WINDOW_S, EstimatedCpuBackend
from h3d.power.fake import ConstantBackend

logger = logging.getLogger(__name__)


def _hardware() -> list[PowerBackend]:
    """Every readable device (NVML, RAPL, Apple), or [] where nothing can be read."""
    from h3d.power import detect

    try:
        return list(detect.detect_backends())
    except Exception:  # probing must never take the daemon down
        logger.exception("device detection failed; continuing without hardware backends")
        return []


def build_backends(
    spec: str, *, cpu_tdp_w: float | None, sample_interval_s: float | None = None
) -> list[PowerBackend]:
    """``auto`` | ``estimated`` | ``constant:<W>`` | ``none``, comma-separated.

    ``sample_interval_s``: the sampler's period. The estimated model's shortest window is
    kept under half of it, so that every scheduled read measures (a 50 ms period with a 50 ms
    shortest window would skip about every other read, by the wake-ups' jitter); only a read
    off the schedule that close to a scheduled one repeats the last figure."""
    min_window_s = (
        MIN_WINDOW_S if sample_interval_s is None else min(MIN_WINDOW_S, sample_interval_s / 2)
    )

    def estimated() -> EstimatedCpuBackend:
        return EstimatedCpuBackend(cpu_tdp_w, min_window_s=min_window_s)

    out: list[PowerBackend] = []
    for i, item in enumerate(p.strip() for p in spec.split(",") if p.strip()):
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
        elif item.startswith("constant:"):
            watts = float(item.split(":", 1)[1])
            out.append(ConstantBackend(watts, name=f"constant:{i}"))
        elif item == "none":
            continue
        else:
            raise ValueError(f"unknown power backend {item!r} in H3D_POWER_BACKENDS")
    if not out:
        logger.warning("no power backend: energy and η will be reported as unknown (source=none)")
    for b in out:
        logger.info("power device %s (%s)", b.info.name, b.info.source)
    return out
