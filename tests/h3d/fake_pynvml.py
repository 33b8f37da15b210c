"""A stand-in for the ``pynvml`` module (nvidia-ml-py) at the hardware seam.

Same function names, constants, units (mW, mJ), structure fields and NVMLError subclass
names as the real library, backed by a scriptable list of GPUs.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6
NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186


class NVMLError(Exception):
    value = -1

    def __str__(self) -> str:
        return f"NVML error {self.value}"


def _err(name: str, value: int) -> type[NVMLError]:
    return type(name, (NVMLError,), {"value": value})


NVMLError_Uninitialized = _err("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _err("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _err("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _err("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _err("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _err("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _err("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    power_mw: int = 250_000
    energy_mj: int = 1_000_000
    limit_mw: int = 400_000
    counter: bool = True
    instant: bool = True
    lost: bool = False
    procs: list[tuple[int, int]] = field(default_factory=list)  # (pid, smUtil)
    migs: list[str] = field(default_factory=list)  # UUIDs of MIG devices ("MIG-...")
    max_migs: int | None = None  # None: MIG not supported (NVMLError_NotSupported)
    value_type: int = NVML_VALUE_TYPE_UNSIGNED_INT  # how the instant power field comes back

    def advance(self, seconds: float) -> None:
        self.energy_mj += int(self.power_mw * seconds)


def make_module(
    gpus: list[FakeGpu], *, init_error: type[NVMLError] | None = None
) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    for k, v in globals().items():
        if k.startswith("NVML") or k == "NVMLError":
            setattr(m, k, v)
    state = {"init": False}

    def check(h: FakeGpu) -> FakeGpu:
        if not state["init"]:
            raise NVMLError_Uninitialized()
        if h.lost:
            raise NVMLError_GpuIsLost()
        return h

    def nvmlInit() -> None:
        if init_error is not None:
            raise init_error()
        state["init"] = True

    def nvmlDeviceGetFieldValues(h: FakeGpu, ids: list[int]) -> list[Any]:
        check(h)
        out = []
        for fid in ids:
            ok = fid == NVML_FI_DEV_POWER_INSTANT and h.instant
            # a c_nvmlValue_t union: only the member the value type names is meaningful
            value = types.SimpleNamespace(
                dVal=-1.0, uiVal=0, ulVal=0, ullVal=0, sllVal=0, siVal=0, usVal=0
            )
            member = {
                0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"
            }  # fmt: skip
            if ok:
                setattr(value, member[h.value_type], h.power_mw)
            out.append(
                types.SimpleNamespace(
                    fieldId=fid,
                    valueType=h.value_type,
                    nvmlReturn=NVML_SUCCESS if ok else NVML_ERROR_NOT_SUPPORTED,
                    value=value,
                )
            )
        return out

    def nvmlDeviceGetTotalEnergyConsumption(h: FakeGpu) -> int:
        if not check(h).counter:
            raise NVMLError_NotSupported()
        return h.energy_mj

    def nvmlDeviceGetProcessUtilization(h: FakeGpu, ts: int) -> list[Any]:
        check(h)
        return [types.SimpleNamespace(pid=p, smUtil=u, timeStamp=ts, memUtil=0) for p, u in h.procs]

    def nvmlDeviceGetMaxMigDeviceCount(h: FakeGpu) -> int:
        if check(h).max_migs is None:
            raise NVMLError_NotSupported()
        return h.max_migs

    def nvmlDeviceGetMigDeviceHandleByIndex(h: FakeGpu, j: int) -> FakeGpu:
        if j >= len(check(h).migs):
            raise NVMLError_NotFound()  # an empty MIG slot
        return FakeGpu(uuid=h.migs[j], name=f"{h.name} MIG")

    m.nvmlInit = nvmlInit
    m.nvmlDeviceGetMaxMigDeviceCount = nvmlDeviceGetMaxMigDeviceCount
    m.nvmlDeviceGetMigDeviceHandleByIndex = nvmlDeviceGetMigDeviceHandleByIndex
    m.nvmlShutdown = lambda: state.update(init=False)
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetUUID = lambda h: check(h).uuid
    m.nvmlDeviceGetName = lambda h: check(h).name
    m.nvmlDeviceGetPowerManagementLimit = lambda h: check(h).limit_mw
    m.nvmlDeviceGetPowerUsage = lambda h: check(h).power_mw
    m.nvmlDeviceGetTotalEnergyConsumption = nvmlDeviceGetTotalEnergyConsumption
    m.nvmlDeviceGetFieldValues = nvmlDeviceGetFieldValues
    m.nvmlDeviceGetProcessUtilization = nvmlDeviceGetProcessUtilization
    return m
