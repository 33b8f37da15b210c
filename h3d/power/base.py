"""The power-backend seam.

One backend object stands for one device (a GPU, a CPU package, a DRAM domain, an SoC).
It knows nothing of time, storage or runs: the sampler stamps each reading with its own
monotonic-derived clock, and the store integrates. Backends speak SI floats; raw units
(mJ, µJ, mW) stay inside them, and so does counter wrap-around: ``energy_j`` is a
cumulative counter that only ever grows for the life of the backend object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

logger = logging.getLogger(__name__)

#: No device H3 reads (a GPU, a CPU package) draws more than this: a counter step implying
#: more is a reset, not a wrap, and a polled figure above it is a "not available" marker.
MAX_PLAUSIBLE_W = 3000.0

#: Every provenance a figure can carry. ``none`` means "no device could be read".
SOURCES = (
    "nvml_counter",
    "nvml_power_instant",
    "nvml_power_average",  # nvmlDeviceGetPowerUsage: a 1 s average on newer GPUs
    "amdsmi_counter",
    "amdsmi_power_current",
    "amdsmi_power_average",
    "intel_hwmon",  # i915/xe hwmon energyN_input
    "level_zero",  # Level Zero Sysman energy counter (pyzes)
    "jetson_ina3221",  # polled rail power, integrated by trapezoid
    "rapl",
    "ioreport",
    "powermetrics",
    "estimated",
    "none",
)
MEASURED_SOURCES = frozenset(SOURCES) - {"estimated", "none"}


PART_TIME_CAVEAT = (
    "polled power: on A100/H100 the power field is refreshed from a sensor that covers about "
    "a quarter of the runtime (Yang et al., 'Part-time Power Measurements', SC'24), so this "
    "integral can miss or over-weight short phases; the energy counter would not"
)


def caveat(source: str, model: str) -> str | None:
    """The caveat an energy figure from this device must carry, if any."""
    if source.startswith("nvml_power") and any(m in model.upper() for m in ("A100", "H100")):
        return PART_TIME_CAVEAT
    return None


class PowerBackendError(Exception):
    """A device could not be read (vendor error translated at the boundary)."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a backend says about its device; stable for the backend's life."""

    name: str  # unique and stable across restarts: "estimated:cpu", "nvml:GPU-…", "rapl:package-0"
    kind: str  # "gpu" | "cpu" | "dram" | "soc"
    source: str  # one of SOURCES
    model: str = ""
    uuid: str | None = None
    index: int | None = None
    power_limit_w: float | None = None
    granularity_s: float | None = None  # update period of the counter/power field, if known
    note: str = ""  # a caveat or a fallback taken at start-up, for `h3d doctor` and the log


@dataclass(frozen=True, slots=True)
class PowerReading:
    """One reading. At least one field is set; a counter is preferred for integration."""

    power_w: float | None = None
    energy_j: float | None = None  # cumulative since the backend was opened, wrap handled


@runtime_checkable
class PowerBackend(Protocol):
    """One device. ``read`` raises :class:`PowerBackendError` when the device fails."""

    info: DeviceInfo

    def read(self) -> PowerReading: ...

    def close(self) -> None: ...


def read_sysfs_int(path: Path, permission_fix: str) -> int:
    """An integer sysfs file; a permission error carries ``permission_fix``."""
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise PowerBackendError(f"{path}: {permission_fix}") from exc
    except (OSError, ValueError) as exc:
        raise PowerBackendError(f"{path}: unreadable ({exc})") from exc


def counter_step(
    name: str, last: int, cur: int, *, wrap_at: int | None, uj_per_unit: float, dt_s: float
) -> int:
    """How far an energy counter moved from ``last`` to ``cur`` in ``dt_s``, in its units.

    A value that steps back is one wrap at ``wrap_at`` when the wrapped step is a plausible
    energy (at most :data:`MAX_PLAUSIBLE_W` over the interval, taken as at least 1 ms), and
    a reset otherwise (a driver reload, suspend/resume): 0 is counted, never a negative
    step nor a whole range of energy that was never used.
    """
    if cur >= last:
        return cur - last
    if wrap_at is not None and last < wrap_at:
        wrapped = wrap_at - last + cur
        if wrapped * uj_per_unit / 1e6 <= MAX_PLAUSIBLE_W * max(dt_s, 1e-3):
            return wrapped
    logger.warning(
        "%s: energy counter reset (it stepped back from %d to %d, too far for a wrap: a "
        "driver reload or suspend/resume); re-based, this interval's energy is not counted",
        name,
        last,
        cur,
    )
    return 0


class MicrojouleCounter:
    """A µJ counter as energy since it was opened. A value that steps back is a wrap at
    ``wrap_uj`` where that is plausible, else a reset, re-based (see :func:`counter_step`)."""

    def __init__(
        self,
        name: str,
        first_uj: int,
        *,
        wrap_uj: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.wrap_uj = wrap_uj
        self._clock = clock
        self._last = first_uj
        self._last_t = clock()
        self._total_uj = 0

    def energy_j(self, cur_uj: int) -> float:
        t = self._clock()
        self._total_uj += counter_step(
            self.name,
            self._last,
            cur_uj,
            wrap_at=self.wrap_uj,
            uj_per_unit=1.0,
            dt_s=t - self._last_t,
        )
        self._last, self._last_t = cur_uj, t
        return self._total_uj / 1e6
