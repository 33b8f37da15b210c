"""CPU package and DRAM energy through the Linux powercap tree (Intel and AMD RAPL).

Each ``<root>/intel-rapl:N`` is a package (``name`` = ``package-N``); its ``dram`` subzone is
read too. ``core``/``uncore`` subzones are parts of the package and are skipped so nothing
is counted twice; the ``intel-rapl-mmio`` duplicate of the package is skipped as well. AMD
CPUs expose the same tree (driver ``intel-rapl`` with AMD support) on Linux ≥ 5.8.

``energy_uj`` wraps at ``max_energy_range_uj``; the wrap is handled here, so ``energy_j``
only grows. Since CVE-2020-8694 most kernels make ``energy_uj`` root-only: that is reported
with the fix, not hidden.
"""

from __future__ import annotations

import logging
from pathlib import Path

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
PERMISSION_FIX = (
    "energy_uj is root-only (CVE-2020-8694): run `sudo chmod -R a+r /sys/class/powercap/intel-rapl*` "
    "(until reboot) or add a udev rule, or run h3d as root"
)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise PowerBackendError(f"{path}: {PERMISSION_FIX}") from exc
    except (OSError, ValueError) as exc:
        raise PowerBackendError(f"{path}: unreadable ({exc})") from exc


class RaplZone:
    """One powercap zone (a package or its DRAM), as a cumulative energy counter."""

    def __init__(self, zone: Path, *, package: str) -> None:
        self.zone = zone
        name = (zone / "name").read_text().strip()
        self.max_range_uj = _read_int(zone / "max_energy_range_uj")
        self._last_uj = _read_int(zone / "energy_uj")
        self._total_uj = 0
        kind = "dram" if name == "dram" else "cpu"
        label = name if kind == "cpu" else f"{package}-dram"
        self.info = DeviceInfo(
            name=f"rapl:{label}",
            kind=kind,
            source="rapl",
            model=f"RAPL {name} ({zone.name})",
            granularity_s=0.001,  # RAPL updates about every millisecond
        )

    def read(self) -> PowerReading:
        cur = _read_int(self.zone / "energy_uj")
        if cur >= self._last_uj:
            self._total_uj += cur - self._last_uj
        else:  # wrapped around
            self._total_uj += self.max_range_uj - self._last_uj + cur
        self._last_uj = cur
        return PowerReading(energy_j=self._total_uj / 1e6)

    def close(self) -> None:
        pass


def discover(root: Path = DEFAULT_ROOT) -> list[RaplZone]:
    """Package and DRAM zones under ``root``. Raises PowerBackendError when none is usable."""
    if not root.is_dir():
        raise PowerBackendError(
            f"{root} does not exist (no powercap: not Linux, or no RAPL driver)"
        )
    packages = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not packages:
        raise PowerBackendError(f"no intel-rapl:N package zone under {root}")
    zones: list[RaplZone] = []
    errors: list[str] = []
    for pkg in packages:
        try:
            pname = (pkg / "name").read_text().strip()
            zones.append(RaplZone(pkg, package=pname))
        except (OSError, PowerBackendError) as exc:
            errors.append(str(exc))
            continue
        for sub in sorted(pkg.glob(f"{pkg.name}:*")):
            try:
                if (sub / "name").read_text().strip() == "dram":
                    zones.append(RaplZone(sub, package=pname))
            except (OSError, PowerBackendError) as exc:
                errors.append(str(exc))
    if not zones:
        raise PowerBackendError(errors[0] if errors else f"no readable RAPL zone under {root}")
    return zones
