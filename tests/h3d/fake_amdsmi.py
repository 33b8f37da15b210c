"""A stand-in for the ``amdsmi`` module (ROCm's Python bindings) at the hardware seam.

Same function names, dict keys, units (W, µJ per tick), enum and exception names as the
real bindings (checked against the PyPI package's source in test_amdsmi.py), backed by a
scriptable list of GPU dies. Energy accumulates from ``power_w`` on the die's own clock.

``version`` picks the bindings' release, whose surfaces differ (amdsmi_interface.py of the
PyPI wheels 6.1.2, 6.2.1, 6.3.3 and 7.0.2): ``amdsmi_get_energy_count`` returns the
accumulator as ``'power'`` before 6.3, as both ``'power'`` and ``'energy_accumulator'`` in
6.3, and as ``'energy_accumulator'`` only in 7.0; ``amdsmi_get_power_info`` has no
``socket_power`` before 6.4, nor do ``amdsmi_get_gpu_virtualization_mode`` and
``amdsmi_get_gpu_enumeration_info`` exist. Every release turns only 0xFFFF into "N/A": the
library's UINT32_MAX for an unsupported field (amdsmi.h: "Unsupported struct members are set
to UINT32_MAX") reaches Python as 4294967295.
"""

from __future__ import annotations

import enum
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

AMDSMI_STATUS_SUCCESS = 0
AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_NO_PERM = 10
AMDSMI_STATUS_INIT_ERROR = 18
AMDSMI_STATUS_NOT_FOUND = 31
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34
UINT16_NA = 0xFFFF  # a power field the library cannot read; the bindings make it "N/A"
UINT32_NA = 0xFFFFFFFF  # an unsupported field (amdsmi.h); the bindings pass it through


class AmdSmiException(Exception):  # noqa: N818 (the real library's name)
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code: int) -> None:
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | AMDSMI error"


class AmdSmiInitFlags(enum.IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1 << 0
    INIT_AMD_GPUS = 1 << 1
    INIT_NON_AMD_CPUS = 1 << 2
    INIT_NON_AMD_GPUS = 1 << 3
    INIT_AMD_APUS = INIT_AMD_CPUS | INIT_AMD_GPUS


class AmdSmiVirtualizationMode(enum.IntEnum):
    UNKNOWN = 0
    BAREMETAL = 1
    HOST = 2
    GUEST = 3
    PASSTHROUGH = 4


@dataclass
class FakeAmdGpu:
    """One GPU handle (a whole GPU, or one die of an MI250)."""

    uuid: str
    market_name: str = "AMD Instinct MI210"
    serial: str = "0x4C6E4C0B8B7E0A1C"
    oam_id: int | str = "N/A"
    product_serial: str = "N/A"
    power_w: float = 100.0
    power_limit_w: int = 300
    current: bool = False  # current_socket_power readable (MI300); else ``unsupported``
    average: bool = True  # average_socket_power readable (MI200); else ``unsupported``
    unsupported: int = UINT16_NA  # what the library puts in a field it cannot read
    counter: bool = True
    resolution_uj: float = 15.259  # what amdsmi_get_energy_count reports
    true_resolution_uj: float | None = None  # what the firmware really counts in, if different
    acc_bits: int = 64  # the accumulator's width (32 on some firmware)
    silent: bool = False  # the second die of an MI250: 0 W and a counter stuck at 0
    mode: AmdSmiVirtualizationMode = AmdSmiVirtualizationMode.BAREMETAL
    hip_id: int | str = "N/A"
    procs: list[tuple[int, int]] = field(default_factory=list)  # (pid, gfx engine ns)
    clock: Callable[[], float] = time.monotonic
    lost: bool = False
    _ticks: float = 0.0
    _t: float | None = None

    def ticks(self) -> int:
        now = self.clock()
        if self._t is not None and not self.silent:
            res = self.true_resolution_uj or self.resolution_uj
            self._ticks += self.power_w * (now - self._t) * 1e6 / res
        self._t = now
        return int(self._ticks) % (2**self.acc_bits)

    def set_ticks(self, ticks: int) -> None:
        self.ticks()
        self._ticks = float(ticks)


VERSIONS = ((6, 1), (6, 2), (6, 3), (7, 0))


def make_module(
    gpus: list[FakeAmdGpu],
    *,
    init_error: int | None = None,
    version: tuple[int, int] = (7, 0),
) -> types.ModuleType:
    """The bindings of release ``version`` (one of :data:`VERSIONS`) over ``gpus``."""
    assert version in VERSIONS, version
    old = version < (6, 4)
    m = types.ModuleType("amdsmi")
    m.AmdSmiException = AmdSmiException
    m.AmdSmiLibraryException = AmdSmiLibraryException
    m.AmdSmiInitFlags = AmdSmiInitFlags
    state = {"init": False}

    def check(h: FakeAmdGpu) -> FakeAmdGpu:
        if not state["init"]:
            raise AmdSmiLibraryException(AMDSMI_STATUS_INIT_ERROR)
        if h.lost:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_FOUND)
        return h

    def amdsmi_init(flag: AmdSmiInitFlags = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
        if init_error is not None:
            raise AmdSmiLibraryException(init_error)
        state["init"] = True

    def amdsmi_get_processor_handles() -> list[FakeAmdGpu]:
        if not state["init"]:
            raise AmdSmiLibraryException(AMDSMI_STATUS_INIT_ERROR)
        return list(gpus)

    def amdsmi_get_gpu_asic_info(h: FakeAmdGpu) -> dict[str, Any]:
        check(h)
        return {
            "market_name": h.market_name,
            "vendor_id": "0x1002",
            "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
            "subvendor_id": "0x1002",
            "device_id": "0x740f",
            "rev_id": "0x02",
            "asic_serial": h.serial,
            "oam_id": h.oam_id,
            "num_compute_units": 104,
            "target_graphics_version": "gfx90a",
            "subsystem_id": "0x0c34",
        }

    def amdsmi_get_gpu_board_info(h: FakeAmdGpu) -> dict[str, Any]:
        check(h)
        return {
            "model_number": "102-D65209-00",
            "product_serial": h.product_serial,
            "fru_id": "N/A",
            "product_name": h.market_name,
            "manufacturer_name": "AMD",
        }

    def amdsmi_get_power_info(h: FakeAmdGpu) -> dict[str, Any]:
        check(h)
        w = 0 if h.silent else int(round(h.power_w))
        info: dict[str, Any] = {} if old else {"socket_power": w}
        info |= {
            "current_socket_power": w if h.current else h.unsupported,
            "average_socket_power": w if h.average else h.unsupported,
            "gfx_voltage": 800,
            "soc_voltage": 900,
            "mem_voltage": 1200,
            "power_limit": h.power_limit_w,
        }
        return {k: ("N/A" if v == UINT16_NA else v) for k, v in info.items()}

    def amdsmi_get_energy_count(h: FakeAmdGpu) -> dict[str, Any]:
        if not check(h).counter or h.mode == AmdSmiVirtualizationMode.GUEST:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        ticks = h.ticks()
        out: dict[str, Any] = {"power": ticks} if version <= (6, 3) else {}
        if version >= (6, 3):
            out["energy_accumulator"] = ticks
        return out | {"counter_resolution": h.resolution_uj, "timestamp": int(h.clock() * 1e9)}

    def amdsmi_get_gpu_process_list(h: FakeAmdGpu) -> list[dict[str, Any]]:
        check(h)
        return [
            {
                "name": f"python{pid}",
                "pid": pid,
                "mem": 0,
                "engine_usage": {"gfx": gfx, "enc": 0},
                "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 0},
                "cu_occupancy": "N/A",
            }
            for pid, gfx in h.procs
        ]

    def amdsmi_get_gpu_virtualization_mode(h: FakeAmdGpu) -> dict[str, Any]:
        return {"mode": check(h).mode}

    def amdsmi_get_gpu_enumeration_info(h: FakeAmdGpu) -> dict[str, Any]:
        check(h)
        return {"drm_render": 128, "drm_card": 0, "hsa_id": 1, "hip_id": h.hip_id, "hip_uuid": ""}

    m.amdsmi_init = amdsmi_init
    m.amdsmi_shut_down = lambda: state.update(init=False)
    m.amdsmi_get_processor_handles = amdsmi_get_processor_handles
    m.amdsmi_get_gpu_device_uuid = lambda h: check(h).uuid
    m.amdsmi_get_gpu_asic_info = amdsmi_get_gpu_asic_info
    m.amdsmi_get_gpu_board_info = amdsmi_get_gpu_board_info
    m.amdsmi_get_power_info = amdsmi_get_power_info
    m.amdsmi_get_energy_count = amdsmi_get_energy_count
    m.amdsmi_get_gpu_process_list = amdsmi_get_gpu_process_list
    if not old:
        m.AmdSmiVirtualizationMode = AmdSmiVirtualizationMode
        m.amdsmi_get_gpu_virtualization_mode = amdsmi_get_gpu_virtualization_mode
        m.amdsmi_get_gpu_enumeration_info = amdsmi_get_gpu_enumeration_info
    return m
