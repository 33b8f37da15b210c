"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported lazily).

Per device, in order of preference:

- ``nvml_counter``: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load; Volta
  and newer). A counter that steps backwards (driver reload) is re-based, never negative.
- ``nvml_power_instant``: the ``NVML_FI_DEV_POWER_INSTANT`` field through
  ``nvmlDeviceGetFieldValues``. ``nvmlDeviceGetPowerUsage`` averages over one second on
  recent GPUs, so it is the last resort, labelled ``nvml_power_average``.

``CUDA_VISIBLE_DEVICES`` is honoured (indices, ``GPU-`` and ``MIG-`` UUID prefixes). Every
NVML error is translated once, here, into :class:`PowerBackendError` with a human reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading, caveat

logger = logging.getLogger(__name__)

_REASONS = {
    "NVMLError_LibraryNotFound": "the NVIDIA driver library (libnvidia-ml.so) is not installed",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NVMLError_NoPermission": "no permission to query the GPU (run as a user in the video group)",
    "NVMLError_GpuIsLost": "the GPU fell off the bus (GPU is lost)",
    "NVMLError_NotSupported": "not supported by this GPU or driver",
    "NVMLError_Uninitialized": "NVML is not initialised",
    "NVMLError_FunctionNotFound": "the NVIDIA driver is too old for this query",
    "NVMLError_LibRmVersionMismatch": "driver/library version mismatch (reboot after a driver update)",
    "NVMLError_NotFound": "no such device (unplugged, or hidden by MIG or the container)",
}

# nvmlValue_t union member for each NVML_VALUE_TYPE_* (pynvml's constant names).
_VALUE_MEMBERS = (
    ("NVML_VALUE_TYPE_DOUBLE", "dVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_INT", "uiVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG", "ulVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", "ullVal"),
    ("NVML_VALUE_TYPE_SIGNED_LONG_LONG", "sllVal"),
    ("NVML_VALUE_TYPE_SIGNED_INT", "siVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_SHORT", "usVal"),  # nvidia-ml-py 12.560+
)


def driver_library_loads() -> bool:
    """Whether ``libnvidia-ml.so.1`` loads: the one name nvidia-ml-py's ``nvmlInit`` loads on
    Linux (``NVMLError_LibraryNotFound`` when it cannot)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _no_driver_library() -> bool:
    """Linux, an installed binding not imported yet, and no driver library for it: NVML is
    absent for the reason ``nvmlInit`` would give, known without importing nvidia-ml-py
    (~9 ms of every daemon start on a host without the NVIDIA driver). A binding already
    imported (or a stand-in in ``sys.modules``) is used as it is; one that is not installed
    says so on import."""
    if not sys.platform.startswith("linux") or "pynvml" in sys.modules:
        return False
    try:
        installed = importlib.util.find_spec("pynvml") is not None
    except (ImportError, ValueError):
        return False
    return installed and not driver_library_loads()


def import_pynvml() -> ModuleType:
    try:
        import pynvml
    except (Exception, SystemExit) as exc:  # any failure on import: "absent", never a crash
        raise PowerBackendError(
            f"nvidia-ml-py is not importable ({type(exc).__name__}: {exc}); "
            "install it with `pip install 'h3[nvidia]'`"
        ) from exc
    module: ModuleType = pynvml
    return module


def translate(nvml: ModuleType, exc: BaseException, what: str) -> PowerBackendError:
    """An NVMLError (or anything) as a PowerBackendError that says what went wrong."""
    name = type(exc).__name__
    reason = _REASONS.get(name, str(exc) or name)
    return PowerBackendError(f"{what}: {reason}")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def field_value(nvml: ModuleType, fv: Any) -> float:
    """The number in an ``nvmlFieldValue_t``, read through the union member its type names."""
    for const, member in _VALUE_MEMBERS:
        if hasattr(nvml, const) and fv.valueType == getattr(nvml, const):
            return float(getattr(fv.value, member))
    raise PowerBackendError(f"NVML field {fv.fieldId}: unknown value type {fv.valueType}")


def visible(env: Mapping[str, str]) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES selectors, or None when every GPU is visible.

    Parsed as CUDA does: entries up to the first invalid one (``-1`` hides every GPU).
    """
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    out: list[str] = []
    for s in (s.strip() for s in raw.split(",")):
        if s.isdigit() or s.startswith(("GPU-", "MIG-")):
            out.append(s)
        else:
            break  # CUDA ignores everything from an invalid entry on ("-1", "", "foo")
    return out


def _matches(selector: str, index: int, uuids: list[str]) -> bool:
    """Whether one CUDA_VISIBLE_DEVICES entry names GPU ``index``; ``uuids`` holds its UUID
    and its MIG devices' UUIDs (a MIG device selects its parent GPU: power and energy exist
    per physical GPU only)."""
    if selector.isdigit():
        return int(selector) == index
    return any(u.startswith(selector) for u in uuids)


def _selected(selectors: list[str] | None, gpus: list[tuple[int, list[str]]]) -> set[int]:
    """The indices of ``gpus`` ((index, UUIDs) each) the selectors make visible: as CUDA
    reads them, up to the first entry that names no GPU (an index out of range, a UUID
    prefix of none), which hides it and every entry after it."""
    if selectors is None:
        return {i for i, _ in gpus}
    chosen: set[int] = set()
    for sel in selectors:
        named = {i for i, uuids in gpus if _matches(sel, i, uuids)}
        if not named:
            break
        chosen |= named
    return chosen


def _mig_uuids(nvml: ModuleType, handle: Any) -> list[str]:
    """UUIDs of the MIG devices on a GPU ([] without MIG, or on an older driver)."""
    out: list[str] = []
    try:
        count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except Exception:  # NotSupported, FunctionNotFound, or an old nvidia-ml-py: no MIG
        return out
    for j in range(count):
        try:
            out.append(
                _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)))
            )
        except Exception:  # an empty MIG slot is NVMLError_NotFound
            continue
    return out


class NvmlGpu:
    """One NVIDIA GPU."""

    def __init__(
        self, nvml: ModuleType, handle: Any, index: int, *, probe_period: bool = True
    ) -> None:
        self.nvml = nvml
        self.handle = handle
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            name = _text(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError as exc:
            raise translate(nvml, exc, f"GPU {index}") from exc
        limit_w = None
        with contextlib.suppress(nvml.NVMLError):
            limit_w = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
        self._offset_j = 0.0
        self._last_raw_j: float | None = None
        self.has_counter = self._try(lambda: self._raw_counter_j()) is not None
        self.has_instant = self._try(lambda: self._instant_w()) is not None
        if self.has_counter:
            source = "nvml_counter"
        elif self.has_instant:
            source = "nvml_power_instant"
        elif self._try(lambda: nvml.nvmlDeviceGetPowerUsage(handle)) is not None:
            source = "nvml_power_average"
        else:
            raise PowerBackendError(f"GPU {index} ({name}): neither energy nor power is readable")
        period = self.measure_period() if probe_period else None
        self.info: DeviceInfo = DeviceInfo(
            name=f"nvml:{uuid}",
            kind="gpu",
            source=source,
            model=name,
            uuid=uuid,
            index=index,
            power_limit_w=limit_w,
            granularity_s=period,
            note=caveat(source, name) or "",
        )

    def _try(self, fn: Any) -> Any:
        """``fn()``, or None where NVML does not serve it (or serves a value type this code
        does not know: the GPU is kept with what does work)."""
        try:
            return fn()
        except (self.nvml.NVMLError, PowerBackendError):
            return None

    def _raw_counter_j(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0

    def _instant_w(self) -> float | None:
        (fv,) = self.nvml.nvmlDeviceGetFieldValues(
            self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT]
        )
        if fv.nvmlReturn != self.nvml.NVML_SUCCESS:
            return None
        return field_value(self.nvml, fv) / 1000.0  # mW

    def measure_period(self, budget_s: float = 0.3) -> float | None:
        """How often the counter (or power field) actually changes, measured, not assumed."""
        return measure_periods([self], budget_s)[0]

    def read(self) -> PowerReading:
        nvml = self.nvml
        power = None
        if self.has_instant and self.has_counter:
            # the counter is what energy comes from: an instant-power field that fails (a
            # driver that stops serving it) costs the power figure, not the reading
            power = self._try(self._instant_w)
        try:
            if self.has_instant and not self.has_counter:
                power = self._instant_w()
            if not self.has_counter:
                if power is None:
                    power = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
                return PowerReading(power_w=power)
            raw = self._raw_counter_j()
        except nvml.NVMLError as exc:
            raise translate(nvml, exc, self.info.name if hasattr(self, "info") else "GPU") from exc
        if self._last_raw_j is not None and raw < self._last_raw_j:
            # the counter went backwards (driver reload): continue from where we were
            logger.warning("%s: energy counter went backwards; re-based", self.info.name)
            self._offset_j += self._last_raw_j
        if self._last_raw_j is None:
            self._offset_j = -raw  # energy since this backend was opened
        self._last_raw_j = raw
        return PowerReading(power_w=power, energy_j=raw + self._offset_j)

    def process_share(self, pids: set[int], since_us: int = 0) -> float | None:
        """The pids' share of the GPU's SM utilisation since ``since_us``, where NVML says."""
        try:
            samples = self.nvml.nvmlDeviceGetProcessUtilization(self.handle, since_us)
        except self.nvml.NVMLError:
            return None
        total = sum(s.smUtil for s in samples)
        if total <= 0:
            return None
        share: float = min(1.0, float(sum(s.smUtil for s in samples if s.pid in pids)) / total)
        return share

    def close(self) -> None:
        pass


def measure_periods(gpus: list[NvmlGpu], budget_s: float = 0.3) -> list[float | None]:
    """Each GPU's update period (median gap between changes), all polled in one loop.

    One bounded loop for every GPU keeps start-up at ``budget_s`` however many GPUs there
    are. None where fewer than two changes were seen (a period longer than the budget allows).
    """
    readers = [g._raw_counter_j if g.has_counter else g._instant_w for g in gpus]
    last: list[Any] = [g._try(r) for g, r in zip(gpus, readers, strict=True)]
    changes: list[list[float]] = [[] for _ in gpus]
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline and any(len(c) < 5 for c in changes):
        for i, (g, r) in enumerate(zip(gpus, readers, strict=True)):
            if len(changes[i]) >= 5:
                continue
            v = g._try(r)
            if v is not None and v != last[i]:
                changes[i].append(time.monotonic())
                last[i] = v
        time.sleep(0.001)
    out: list[float | None] = []
    for c in changes:
        gaps = sorted(b - a for a, b in zip(c, c[1:], strict=False))
        out.append(gaps[len(gaps) // 2] if gaps else None)
    return out


def discover(env: Mapping[str, str] | None = None, *, probe_period: bool = True) -> list[NvmlGpu]:
    """Every visible GPU. Raises PowerBackendError with the reason when NVML is unusable."""
    if _no_driver_library():
        raise PowerBackendError(f"NVML: {_REASONS['NVMLError_LibraryNotFound']}")
    nvml = import_pynvml()
    try:
        nvml.nvmlInit()
    except Exception as exc:
        raise translate(nvml, exc, "NVML") from exc
    selectors = visible(os.environ if env is None else env)
    gpus = []
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        raise translate(nvml, exc, "NVML") from exc
    found: list[tuple[int, Any, list[str]]] = []  # (index, handle, its UUIDs)
    for i in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            logger.warning("GPU %d skipped: %s", i, translate(nvml, exc, f"GPU {i}"))
            continue
        found.append((i, handle, [uuid, *(_mig_uuids(nvml, handle) if selectors else [])]))
    chosen = _selected(selectors, [(i, uuids) for i, _h, uuids in found])
    for i, handle, _uuids in found:
        if i not in chosen:
            continue
        try:
            gpus.append(NvmlGpu(nvml, handle, i, probe_period=False))
        except PowerBackendError as exc:
            logger.warning("%s", exc)
    if probe_period and gpus:
        for g, period in zip(gpus, measure_periods(gpus), strict=True):
            g.info = dataclasses.replace(g.info, granularity_s=period)
    return gpus
