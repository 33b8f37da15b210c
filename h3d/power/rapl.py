"""CPU package and DRAM energy through the Linux powercap tree (Intel and AMD RAPL).

Each ``<root>/intel-rapl:N`` is a package (``name`` = ``package-N``); its ``dram`` subzone is
read too. ``core``/``uncore`` subzones are parts of the package and are skipped so nothing
is counted twice; the ``intel-rapl-mmio`` duplicate of the package is skipped as well, and
so is ``psys`` (a top-level ``intel-rapl:N`` on client Intel CPUs that measures the whole
platform, packages included, so adding it to the packages would count them twice). AMD Zen
CPUs expose the same ``intel-rapl`` tree (``intel_rapl_msr`` with AMD Fam17h/19h support,
Linux ≥ 5.11): ``package-N`` and a ``core`` subzone, no ``dram``.

``energy_uj`` wraps at ``max_energy_range_uj``; the wrap is handled here, so ``energy_j``
only grows. A counter that restarts near 0 (suspend/resume, a reload of ``intel_rapl_msr``)
is not a wrap: a step back too large for the interval's plausible energy is re-based,
never counted as a whole range. Since CVE-2020-8694 most kernels make ``energy_uj``
root-only: that is reported with the fix, not hidden.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from h3d.power.base import (
    DeviceInfo,
    MicrojouleCounter,
    PowerBackendError,
    PowerReading,
    read_sysfs_int,
)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
PERMISSION_FIX = (
    "energy_uj is root-only (CVE-2020-8694): `h3d setup-rapl` prints a udev rule that gives "
    "one group read access and a systemd unit running h3d in that group; until reboot, "
    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*:*/energy_uj`; for good, a udev rule "
    '(`SUBSYSTEM=="powercap", ACTION=="add", RUN+="/bin/chmod a+r /sys%p/energy_uj"` in '
    "/etc/udev/rules.d/90-h3-rapl.rules); or run h3d as root. See docs/power.md for the "
    "side-channel trade-off"
)
#: Top-level zones that are not a CPU package: counted with the packages, they double count.
PLATFORM_ZONES = frozenset({"psys"})


def _read_int(path: Path) -> int:
    return read_sysfs_int(path, PERMISSION_FIX)


class RaplZone:
    """One powercap zone (a package or its DRAM), as a cumulative energy counter."""

    def __init__(self, zone: Path, *, package: str, measure: bool = True) -> None:
        self.zone = zone
        name = (zone / "name").read_text().strip()
        self.max_range_uj = _read_int(zone / "max_energy_range_uj")
        kind = "dram" if name == "dram" else "cpu"
        label = name if kind == "cpu" else f"{package}-dram"
        self._counter = MicrojouleCounter(
            f"rapl:{label}", _read_int(zone / "energy_uj"), wrap_uj=self.max_range_uj
        )
        self.period_s = measure_periods([zone / "energy_uj"])[0] if measure else None
        self.info = DeviceInfo(
            name=f"rapl:{label}",
            kind=kind,
            source="rapl",
            model=f"RAPL {name} ({zone.name})",
            granularity_s=self.period_s,
        )

    def read(self) -> PowerReading:
        return PowerReading(energy_j=self._counter.energy_j(_read_int(self.zone / "energy_uj")))

    def close(self) -> None:
        pass


def measure_periods(paths: list[Path], budget_s: float = 0.05) -> list[float | None]:
    """How often each ``energy_uj`` changes (about 1 ms on Intel and AMD), all polled in one
    loop of at most ``budget_s``.

    None where a file did not change twice in the budget (an idle or frozen domain):
    unknown, not assumed.
    """
    changes: list[list[float]] = [[] for _ in paths]
    last: list[str | None] = []
    for p in paths:
        try:
            last.append(p.read_text())
        except OSError:
            last.append(None)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline and any(
        len(c) < 6 and v is not None for c, v in zip(changes, last, strict=True)
    ):
        for i, p in enumerate(paths):
            if last[i] is None or len(changes[i]) >= 6:
                continue
            try:
                v = p.read_text()
            except OSError:
                last[i] = None
                continue
            if v != last[i]:
                changes[i].append(time.monotonic())
                last[i] = v
    out: list[float | None] = []
    for c in changes:
        gaps = sorted(b - a for a, b in zip(c, c[1:], strict=False))
        out.append(gaps[len(gaps) // 2] if gaps else None)
    return out


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
            if pname in PLATFORM_ZONES:
                logger.info("%s (%s) skipped: it includes the packages", pkg.name, pname)
                continue
            zones.append(RaplZone(pkg, package=pname, measure=False))
        except (OSError, PowerBackendError) as exc:
            errors.append(str(exc))
            continue
        for sub in sorted(pkg.glob(f"{pkg.name}:*")):
            try:
                if (sub / "name").read_text().strip() == "dram":
                    zones.append(RaplZone(sub, package=pname, measure=False))
            except (OSError, PowerBackendError) as exc:
                errors.append(str(exc))
    if not zones:
        raise PowerBackendError(errors[0] if errors else f"no readable RAPL zone under {root}")
    periods = measure_periods([z.zone / "energy_uj" for z in zones])
    for z, period in zip(zones, periods, strict=True):
        z.period_s = period
        z.info = dataclasses.replace(z.info, granularity_s=period)
    for err in errors:  # some zones work: the rest is worth one line each, not a failure
        logger.warning("RAPL zone skipped: %s", err)
    return zones
