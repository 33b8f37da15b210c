"""Intel discrete GPUs through the i915 / xe hwmon energy counters.

The kernel lays a GPU out as ``/sys/class/drm/cardN`` (a link into the PCI device's
``drm/`` directory) whose ``device`` links to the PCI function; the driver's hwmon
directory sits at ``cardN/device/hwmon/hwmonM`` with ``name`` = ``i915`` or ``xe`` and
``energy1_input`` in µJ. xe labels its counters (``energyK_label`` = ``card`` or ``pkg``);
the ``card`` counter is preferred because it covers the whole board. The drivers
accumulate the hardware's 32-bit register into 64 bits, so the file does not wrap; a value
that steps backwards (driver reload) is re-based, never counted negative.

Integrated GPUs (and i915 before Linux 6.2) have no hwmon energy: on those the GPU is part
of the CPU package that RAPL measures. The drm root is a constructor argument so tests
read a tree laid out as the kernel lays it out.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/drm")
DRIVERS = frozenset({"i915", "xe"})
PERMISSION_FIX = (
    "the hwmon energy file is not readable by this user: a udev rule like the RAPL one "
    '(`SUBSYSTEM=="hwmon", ATTR{name}=="i915|xe", RUN+="/bin/chmod g+r /sys%p/energy1_input"`)'
    " or run h3d as root"
)


def _read_uj(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise PowerBackendError(f"{path}: {PERMISSION_FIX}") from exc
    except (OSError, ValueError) as exc:
        raise PowerBackendError(f"{path}: unreadable ({exc})") from exc


def _energy_file(hwmon: Path) -> Path | None:
    """The board-wide counter: xe's ``card`` energy, else ``energy1_input``."""
    for label in sorted(hwmon.glob("energy*_label")):
        try:
            if label.read_text().strip() == "card":
                return hwmon / label.name.replace("_label", "_input")
        except OSError:
            continue
    f = hwmon / "energy1_input"
    return f if f.exists() else None


class IntelGpu:
    """One Intel GPU's hwmon energy counter."""

    def __init__(self, energy_file: Path, *, pci: str, driver: str, model: str) -> None:
        self.path = energy_file
        self._last = _read_uj(energy_file)
        self._total_uj = 0
        self.info = DeviceInfo(
            name=f"intel:{pci}", kind="gpu", source="intel_hwmon", model=model, uuid=None
        )
        self.driver = driver

    def read(self) -> PowerReading:
        cur = _read_uj(self.path)
        if cur >= self._last:
            self._total_uj += cur - self._last
        else:
            logger.warning("%s: energy counter went backwards; re-based", self.info.name)
        self._last = cur
        return PowerReading(energy_j=self._total_uj / 1e6)

    def close(self) -> None:
        pass


def discover(root: Path = DEFAULT_ROOT) -> list[IntelGpu]:
    """Every Intel GPU under ``root`` with an i915/xe hwmon energy counter."""
    if not root.is_dir():
        raise PowerBackendError(f"{root} does not exist (no DRM: not Linux, or no GPU driver)")
    gpus: list[IntelGpu] = []
    drivers_seen: list[str] = []
    errors: list[str] = []
    for card in sorted(root.iterdir(), key=lambda p: p.name):
        if not re.fullmatch(r"card\d+", card.name):
            continue  # connectors (card0-DP-1) and render nodes
        dev = card / "device"
        for hwmon in sorted((dev / "hwmon").glob("hwmon*")):
            try:
                driver = (hwmon / "name").read_text().strip()
            except OSError:
                continue
            if driver not in DRIVERS:
                continue
            drivers_seen.append(driver)
            energy = _energy_file(hwmon)
            if energy is None:
                continue
            pci = dev.resolve().name
            try:
                device_id = (dev / "device").read_text().strip()
            except OSError:
                device_id = "?"
            try:
                gpus.append(
                    IntelGpu(
                        energy,
                        pci=pci,
                        driver=driver,
                        model=f"Intel GPU {device_id} ({driver}, {card.name})",
                    )
                )
            except PowerBackendError as exc:
                errors.append(str(exc))
    if not gpus:
        if errors:
            raise PowerBackendError(errors[0])
        if drivers_seen:
            raise PowerBackendError(
                f"{'/'.join(sorted(set(drivers_seen)))} hwmon without an energy counter "
                "(an integrated GPU, measured with the CPU package by RAPL, or Linux < 6.2)"
            )
        raise PowerBackendError("no i915/xe GPU with a hwmon directory")
    return gpus
