"""Backends with known output, for tests and demos on machines with nothing readable.

They are labelled ``estimated`` (they measure nothing) with a model string that says what
they are. ``constant:<watts>`` in ``H3D_POWER_BACKENDS`` selects :class:`ConstantBackend`.
"""

from __future__ import annotations

import time

from h3d.power.base import DeviceInfo, PowerReading


class ConstantBackend:
    """A device drawing exactly ``power_w``, with a matching cumulative energy counter."""

    def __init__(self, power_w: float, *, name: str = "constant:0", counter: bool = False) -> None:
        self.power_w = power_w
        self.counter = counter
        self._t0 = time.monotonic()
        self.info = DeviceInfo(
            name=name, kind="cpu", source="estimated", model=f"constant {power_w:g} W (test)"
        )

    def read(self) -> PowerReading:
        energy = self.power_w * (time.monotonic() - self._t0) if self.counter else None
        return PowerReading(power_w=self.power_w, energy_j=energy)

    def close(self) -> None:
        pass
