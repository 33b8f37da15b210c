"""The last-resort CPU model: utilisation × TDP, always labelled ``estimated``.

It is a model, not a measurement: a CPU draws power at 0 % utilisation and the TDP is a
thermal design figure, not a power reading. The daemon uses it only when no device can be
read, says so in ``/v1/devices`` and ``h3d status``, and every figure built on it carries
``source="estimated"``.
"""

from __future__ import annotations

import psutil

from h3d.power.base import DeviceInfo, PowerReading


def default_tdp_w() -> float:
    """10 W per logical core, at least 15 W: a deliberate, documented guess."""
    return max(15.0, 10.0 * (psutil.cpu_count(logical=True) or 1))


class EstimatedCpuBackend:
    """CPU power as ``tdp_w × system CPU utilisation`` since the previous read."""

    def __init__(self, tdp_w: float | None = None) -> None:
        self.tdp_w = tdp_w if tdp_w is not None else default_tdp_w()
        self.info = DeviceInfo(
            name="estimated:cpu",
            kind="cpu",
            source="estimated",
            model=f"utilisation x {self.tdp_w:g} W TDP (set H3D_CPU_TDP_W)",
        )
        psutil.cpu_percent(interval=None)  # prime: the first call has no interval

    def read(self) -> PowerReading:
        return PowerReading(power_w=self.tdp_w * psutil.cpu_percent(interval=None) / 100.0)

    def close(self) -> None:
        pass
