"""Intel discrete GPUs through the i915 / xe hwmon energy counters.

The kernel lays a GPU out as ``/sys/class/drm/cardN`` (a link into the PCI device's
``drm/`` directory) whose ``device`` links to the PCI function; the driver's hwmon
directory sits at ``cardN/device/hwmon/hwmonM`` with ``name`` = ``i915`` or ``xe`` and
``energyK_input`` in µJ. xe labels its counters (``energyK_label`` = ``card`` or ``pkg``);
the ``card`` counter is preferred because it covers the whole board. On DG2 (Arc) and PVC
xe has only the ``pkg`` one (``energy2_input``; the card channel is hidden): it is read,
and the device's note says it is the GPU package, not the board. i915 has one unlabelled
``energy1_input``. The drivers accumulate the hardware's 32-bit register into 64 bits, so
the file does not wrap; a value that steps backwards (driver reload) is re-based, never
counted negative.

Where ``pyzes`` (Level Zero Sysman) is installed, GPUs that hwmon does not cover are read
through ``zesPowerGetEnergyCounter`` (``level_zero``): the device-level power domain, or
the sum of the tiles' domains. A GPU read by hwmon is never read again through Level Zero.

i915 and xe register hwmon for discrete GPUs only, so an integrated GPU (or any GPU on i915
before Linux 6.2) has no i915/xe hwmon at all: it is part of the CPU package that RAPL
measures. The drm root is a constructor argument so tests read a tree laid out as the
kernel lays it out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from pathlib import Path
from typing import Any

from h3d.power.base import (
    DeviceInfo,
    MicrojouleCounter,
    PowerBackendError,
    PowerReading,
    read_sysfs_int,
)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/drm")
DRIVERS = frozenset({"i915", "xe"})
PERMISSION_FIX = (
    "the hwmon energy file is not readable by this user: a udev rule like the RAPL one "
    '(`SUBSYSTEM=="hwmon", ATTR{name}=="i915|xe", RUN+="/bin/chmod g+r /sys%p/energy1_input"`)'
    " or run h3d as root"
)


def _read_uj(path: Path) -> int:
    return read_sysfs_int(path, PERMISSION_FIX)


PKG_NOTE = "xe 'pkg' counter: the GPU package, not the whole board (no 'card' counter here)"


def _energy_file(hwmon: Path) -> tuple[Path, str] | None:
    """The widest counter and its label: xe's ``card`` (the board), else ``pkg`` (all xe
    has on DG2 and PVC), else the first ``energyK_input`` (i915: unlabelled)."""
    inputs = sorted(
        (f for f in hwmon.glob("energy*_input") if re.fullmatch(r"energy\d+_input", f.name)),
        key=lambda f: int(f.name[6:].removesuffix("_input")),
    )
    by_label: dict[str, Path] = {}
    for f in inputs:
        with contextlib.suppress(OSError):
            label = (hwmon / f.name.replace("_input", "_label")).read_text().strip()
            by_label.setdefault(label, f)
    for want in ("card", "pkg"):
        if want in by_label:
            return by_label[want], want
    return (inputs[0], "") if inputs else None


class IntelGpu:
    """One Intel GPU's hwmon energy counter."""

    def __init__(
        self, energy_file: Path, *, pci: str, driver: str, model: str, note: str = ""
    ) -> None:
        self.path = energy_file
        self.info = DeviceInfo(
            name=f"intel:{pci}", kind="gpu", source="intel_hwmon", model=model, note=note
        )
        self._counter = MicrojouleCounter(self.info.name, _read_uj(energy_file))
        self.driver = driver

    def read(self) -> PowerReading:
        return PowerReading(energy_j=self._counter.energy_j(_read_uj(self.path)))

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
            found = _energy_file(hwmon)
            if found is None:
                continue
            energy, label = found
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
                        note=PKG_NOTE if label == "pkg" else "",
                    )
                )
            except PowerBackendError as exc:
                errors.append(str(exc))
    if not gpus:
        if errors:
            raise PowerBackendError(errors[0])
        if drivers_seen:  # a discrete GPU: the drivers register hwmon for no other kind
            raise PowerBackendError(
                f"{'/'.join(sorted(set(drivers_seen)))} hwmon without an energy counter "
                "(this kernel exposes no energyN_input for the GPU)"
            )
        raise PowerBackendError(
            "no i915/xe GPU with a hwmon directory (an integrated GPU has none: it is "
            "measured with the CPU package by RAPL; a discrete one on i915 needs Linux >= 6.2)"
        )
    return gpus


# --- Level Zero Sysman (pyzes), where it is installed ------------------------------------

ZE_RESULT_SUCCESS = 0
_ZE_REASONS = {
    0x70010000: "insufficient permissions (ZE_RESULT_ERROR_INSUFFICIENT_PERMISSIONS)",
    0x70020000: "a dependency is unavailable (is the GPU driver loaded?)",
    0x78000001: "Sysman is not initialised (ZE_RESULT_ERROR_UNINITIALIZED)",
    0x78000003: "not supported by this GPU or driver",
}


def import_pyzes() -> Any:
    try:
        import pyzes
    except (Exception, SystemExit) as exc:
        if "ze_loader" in str(exc) or isinstance(exc, OSError):
            raise PowerBackendError(
                "the Level Zero loader (libze_loader.so) is not installed: install "
                "level-zero and the Intel compute runtime"
            ) from exc
        raise PowerBackendError(
            f"pyzes is not importable ({type(exc).__name__}: {exc}); `pip install pyzes`"
        ) from exc
    return pyzes


def _check(rc: int, what: str) -> None:
    if rc != ZE_RESULT_SUCCESS:
        raise PowerBackendError(f"Level Zero {what}: {_ZE_REASONS.get(rc, f'error {rc:#x}')}")


class LevelZeroGpu:
    """One Intel GPU's Sysman energy counter (µJ, 64-bit): the device-level power domain,
    or the sum of its tiles' domains when it has no device-level one."""

    def __init__(self, zes: Any, domains: list[Any], *, pci: str, tiles: bool) -> None:
        self.zes = zes
        self.domains = domains
        self.info = DeviceInfo(
            name=f"intel:{pci}",
            kind="gpu",
            source="level_zero",
            model=f"Intel GPU {pci} (Level Zero Sysman)",
            note="sum of the tiles' power domains" if tiles else "",
        )
        self._counter = MicrojouleCounter(self.info.name, self._raw_uj())

    def _raw_uj(self) -> int:
        total = 0
        for h in self.domains:
            counter = self.zes.zes_power_energy_counter_t()
            _check(self.zes.zesPowerGetEnergyCounter(h, ctypes.byref(counter)), "energy")
            total += int(counter.energy)
        return total

    def read(self) -> PowerReading:
        return PowerReading(energy_j=self._counter.energy_j(self._raw_uj()))

    def close(self) -> None:
        pass


def _handles(zes: Any, fn: Any, kind: Any, *args: Any) -> list[Any]:
    count = ctypes.c_uint32(0)
    _check(fn(*args, ctypes.byref(count), None), fn.__name__)
    arr = (kind * count.value)()
    if count.value:
        _check(fn(*args, ctypes.byref(count), arr), fn.__name__)
    return [arr[i] for i in range(count.value)]


def level_zero_discover(skip_pci: frozenset[str] = frozenset()) -> list[LevelZeroGpu]:
    """Every Intel GPU Sysman sees, except those at ``skip_pci`` (already read by hwmon:
    the same joules must not be counted twice)."""
    zes = import_pyzes()
    _check(zes.zesInit(0), "zesInit")
    gpus: list[LevelZeroGpu] = []
    for drv in _handles(zes, zes.zesDriverGet, zes.zes_driver_handle_t):
        for dev in _handles(zes, zes.zesDeviceGet, zes.zes_device_handle_t, drv):
            pci_props = zes.zes_pci_properties_t()
            pci_props.stype = zes.ZES_STRUCTURE_TYPE_PCI_PROPERTIES
            _check(zes.zesDevicePciGetProperties(dev, ctypes.byref(pci_props)), "PCI")
            a = pci_props.address
            pci = f"{a.domain:04x}:{a.bus:02x}:{a.device:02x}.{a.function:x}"
            if pci in skip_pci:
                continue
            whole: list[Any] = []
            tiles: list[Any] = []
            for h in _handles(zes, zes.zesDeviceEnumPowerDomains, zes.zes_pwr_handle_t, dev):
                props = zes.zes_power_properties_t()
                props.stype = zes.ZES_STRUCTURE_TYPE_POWER_PROPERTIES
                _check(zes.zesPowerGetProperties(h, ctypes.byref(props)), "power properties")
                (tiles if props.onSubdevice else whole).append(h)
            domains = whole[:1] or tiles
            if not domains:
                logger.info("Level Zero GPU %s has no power domain", pci)
                continue
            try:
                gpus.append(LevelZeroGpu(zes, domains, pci=pci, tiles=not whole))
            except PowerBackendError as exc:
                logger.warning("Level Zero GPU %s: %s", pci, exc)
    return gpus


def discover_all(root: Path = DEFAULT_ROOT) -> list[IntelGpu | LevelZeroGpu]:
    """hwmon counters first; Level Zero Sysman for the GPUs hwmon does not cover."""
    found: list[IntelGpu | LevelZeroGpu] = []
    reasons: list[str] = []
    try:
        found.extend(discover(root))
    except PowerBackendError as exc:
        reasons.append(f"hwmon: {exc}")
    skip = frozenset(g.info.name.removeprefix("intel:") for g in found)
    try:
        found.extend(level_zero_discover(skip))
    except PowerBackendError as exc:
        reasons.append(f"Level Zero: {exc}")
    if not found:
        raise PowerBackendError("; ".join(reasons))
    return found
