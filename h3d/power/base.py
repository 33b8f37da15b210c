"""The power-backend seam.

One backend object stands for one device (a GPU, a CPU package, a DRAM domain, an SoC).
It knows nothing of time, storage or runs: the sampler stamps each reading with its own
monotonic-derived clock, and the store integrates. Backends speak SI floats; raw units
(mJ, µJ, mW) stay inside them, and so does counter wrap-around: ``energy_j`` is a
cumulative counter that only ever grows for the life of the backend object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

logger = logging.getLogger(__name__)

#: Every provenance a figure can carry. ``none`` means "no device could be read".
SOURCES = (
    "nvml_counter",
    "nvml_power_instant",
    "nvml_power_average",  # nvmlDeviceGetPowerUsage: a 1 s average on newer GPUs
    "amdsmi_counter",
    "amdsmi_power_current",
    "amdsmi_power_average",
    "intel_hwmon",  # i915/xe hwmon energy1_input
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


class MicrojouleCounter:
    """A 64-bit µJ counter as energy since it was opened: a value that steps back (a driver
    reload) is re-based, never counted negative."""

    def __init__(self, name: str, first_uj: int) -> None:
        self.name = name
        self._last = first_uj
        self._total_uj = 0

    def energy_j(self, cur_uj: int) -> float:
        if cur_uj >= self._last:
            self._total_uj += cur_uj - self._last
        else:
            logger.warning("%s: energy counter went backwards; re-based", self.name)
        self._last = cur_uj
        return self._total_uj / 1e6
