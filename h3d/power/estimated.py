"""The last-resort CPU model: utilisation × TDP, always labelled ``estimated``.

It is a model, not a measurement: a CPU draws power at 0 % utilisation and the TDP is a
thermal design figure, not a power reading. The daemon uses it only when no device can be
read, says so in ``/v1/devices`` and ``h3d status``, and every figure built on it carries
``source="estimated"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil

from h3d.attribution import cpu_s
from h3d.power.base import DeviceInfo, PowerReading

#: The shortest window a utilisation is read over. The kernel counts busy time in clock
#: ticks (10 ms at the usual USER_HZ=100), so a window of a few ticks reads anywhere from
#: 0 to 100 % of a busy machine; the sampler's reads off its schedule (at a run's start and
#: end) come that close to a scheduled one.
MIN_WINDOW_S = 0.05


def default_tdp_w() -> float:
    """10 W per logical core, at least 15 W: a deliberate, documented guess."""
    return max(15.0, 10.0 * (psutil.cpu_count(logical=True) or 1))


class EstimatedCpuBackend:
    """CPU power as ``tdp_w × system CPU utilisation`` over the window since the last read.

    A read less than ``min_window_s`` after the last one does not close the window: it
    gives the last window's figure again, and the next read measures from where that window
    ended. So a run's edge never draws a spurious dip (or spike) in the power curve, and
    the energy integrated over it stays that of whole windows.
    """

    def __init__(
        self,
        tdp_w: float | None = None,
        *,
        min_window_s: float = MIN_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        cpu_times: Callable[[], tuple[float, float]] = cpu_s,
    ) -> None:
        self.tdp_w = tdp_w if tdp_w is not None else default_tdp_w()
        self.info = DeviceInfo(
            name="estimated:cpu",
            kind="cpu",
            source="estimated",
            model=f"utilisation x {self.tdp_w:g} W TDP (set H3D_CPU_TDP_W)",
        )
        self.min_window_s = min_window_s
        self._clock, self._cpu_times = clock, cpu_times
        self._t, (self._busy, self._total) = clock(), cpu_times()  # the first window opens
        self._power_w: float | None = None

    def read(self) -> PowerReading:
        t = self._clock()
        if self._power_w is not None and t - self._t < self.min_window_s:
            return PowerReading(power_w=self._power_w)
        busy, total = self._cpu_times()
        d_total = total - self._total
        if d_total <= 0:  # no tick counted yet: the window stays open
            return PowerReading(power_w=self._power_w if self._power_w is not None else 0.0)
        util = min(1.0, max(0.0, (busy - self._busy) / d_total))
        self._t, self._busy, self._total = t, busy, total
        self._power_w = self.tdp_w * util
        return PowerReading(power_w=self._power_w)

    def close(self) -> None:
        pass
