"""A stand-in for ``pyzes`` (Level Zero Sysman bindings) at the hardware seam.

The same function names, return codes, structure and field names as the real package
(checked against its source in test_intel_jetson.py). Functions fill the ctypes objects they
are passed by reference, as the C API does.
"""

from __future__ import annotations

import ctypes
import types
from ctypes import c_int32, c_int64, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass, field
from typing import Any

ZE_RESULT_SUCCESS = 0
ZE_RESULT_ERROR_DEPENDENCY_UNAVAILABLE = 0x70020000
ZE_RESULT_ERROR_UNSUPPORTED_FEATURE = 0x78000003
ZES_STRUCTURE_TYPE_PCI_PROPERTIES = 0x2
ZES_STRUCTURE_TYPE_POWER_PROPERTIES = 0xD
ze_bool_t = ctypes.c_uint8


class zes_driver_handle_t(c_void_p):  # noqa: N801 (the real names)
    pass


class zes_device_handle_t(c_void_p):  # noqa: N801
    pass


class zes_pwr_handle_t(c_void_p):  # noqa: N801
    pass


class zes_power_energy_counter_t(ctypes.Structure):  # noqa: N801
    _fields_ = [("energy", c_uint64), ("timestamp", c_uint64)]


class zes_power_properties_t(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("stype", c_int32),
        ("pNext", c_void_p),
        ("onSubdevice", ze_bool_t),
        ("subdeviceId", c_uint32),
        ("canControl", ze_bool_t),
        ("isEnergyThresholdSupported", ze_bool_t),
        ("defaultLimit", c_int32),
        ("minLimit", c_int32),
        ("maxLimit", c_int32),
    ]


class zes_pci_address_t(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("domain", c_uint32),
        ("bus", c_uint32),
        ("device", c_uint32),
        ("function", c_uint32),
    ]


class zes_pci_speed_t(ctypes.Structure):  # noqa: N801
    _fields_ = [("gen", c_int32), ("width", c_int32), ("maxBandwidth", c_int64)]


class zes_pci_properties_t(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("stype", c_int32),
        ("pNext", c_void_p),
        ("address", zes_pci_address_t),
        ("maxSpeed", zes_pci_speed_t),
        ("haveBandwidthCounters", ze_bool_t),
        ("havePacketCounters", ze_bool_t),
        ("haveReplayCounters", ze_bool_t),
    ]


@dataclass
class Domain:
    energy_uj: int = 0
    on_subdevice: bool = False
    supported: bool = True


@dataclass
class FakeZeGpu:
    bus: int
    domains: list[Domain] = field(default_factory=lambda: [Domain()])


def make_module(gpus: list[FakeZeGpu], *, init_rc: int = ZE_RESULT_SUCCESS) -> types.ModuleType:
    m = types.ModuleType("pyzes")
    for k, v in globals().items():
        if k.startswith(("ZE", "zes_", "ze_")):
            setattr(m, k, v)
    # handle values: 1 = the driver; 100 + i = GPU i; 1000 * (i + 1) + j = its domain j
    domains = {1000 * (i + 1) + j: d for i, g in enumerate(gpus) for j, d in enumerate(g.domains)}

    def fill(p_count: Any, out: Any, values: list[int], kind: type[c_void_p]) -> int:
        count = p_count._obj
        if out is not None:
            for i, v in enumerate(values[: count.value]):
                out[i] = kind(v)
        count.value = len(values)
        return ZE_RESULT_SUCCESS

    def zesInit(flags: int) -> int:  # noqa: N802
        return init_rc

    def zesDriverGet(pCount: Any, phDrivers: Any) -> int:  # noqa: N802, N803
        return fill(pCount, phDrivers, [1], zes_driver_handle_t)

    def zesDeviceGet(hDriver: Any, pCount: Any, phDevices: Any) -> int:  # noqa: N802, N803
        return fill(pCount, phDevices, [100 + i for i in range(len(gpus))], zes_device_handle_t)

    def zesDevicePciGetProperties(hDevice: Any, pProperties: Any) -> int:  # noqa: N802, N803
        g = gpus[hDevice.value - 100]
        pProperties._obj.address.bus = g.bus
        return ZE_RESULT_SUCCESS

    def zesDeviceEnumPowerDomains(hDevice: Any, pCount: Any, phPower: Any) -> int:  # noqa: N802, N803
        i = hDevice.value - 100
        hs = [1000 * (i + 1) + j for j in range(len(gpus[i].domains))]
        return fill(pCount, phPower, hs, zes_pwr_handle_t)

    def zesPowerGetProperties(hPower: Any, pProperties: Any) -> int:  # noqa: N802, N803
        pProperties._obj.onSubdevice = domains[hPower.value].on_subdevice
        return ZE_RESULT_SUCCESS

    def zesPowerGetEnergyCounter(hPower: Any, pEnergy: Any) -> int:  # noqa: N802, N803
        d = domains[hPower.value]
        if not d.supported:
            return ZE_RESULT_ERROR_UNSUPPORTED_FEATURE
        pEnergy._obj.energy = d.energy_uj
        return ZE_RESULT_SUCCESS

    for fn in (
        zesInit,
        zesDriverGet,
        zesDeviceGet,
        zesDevicePciGetProperties,
        zesDeviceEnumPowerDomains,
        zesPowerGetProperties,
        zesPowerGetEnergyCounter,
    ):
        setattr(m, fn.__name__, fn)
    return m
