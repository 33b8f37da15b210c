"""NVIDIA Jetson: the on-module INA3221 power monitors, read through hwmon.

The ``ina3221`` hwmon driver (JetPack >= 5) exposes three channels per chip: ``inK_label``
(the rail: ``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``, …), ``inK_input`` (bus voltage, mV)
and ``currK_input`` (current, mA). A rail's power is V × I. The module's total is the
input rail (``VDD_IN``; ``POM_5V_IN`` on the Nano), which the other rails are parts of, so
only the input rail is read when there is one; without it, the rails are summed and the
device says so. There is no energy counter: the sampler polls power and the store
integrates it by trapezoid, labelled ``jetson_ina3221``.

A rail whose files vanish while running (a driver unbind, an I2C error) raises, so the
sampler marks the device degraded instead of reporting a smaller sum.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/hwmon")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class Rail:
    label: str
    volts_file: Path  # inK_input, mV
    amps_file: Path  # currK_input, mA

    def power_w(self) -> float:
        try:
            mv = int(self.volts_file.read_text().strip())
            ma = int(self.amps_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise PowerBackendError(f"INA3221 rail {self.label}: unreadable ({exc})") from exc
        return mv * ma / 1e6


def rails(root: Path = DEFAULT_ROOT) -> list[Rail]:
    """Every labelled INA3221 channel under ``root`` (the hwmon class directory)."""
    out: list[Rail] = []
    for hwmon in sorted(root.glob("hwmon*")):
        try:
            if (hwmon / "name").read_text().strip() != "ina3221":
                continue
        except OSError:
            continue
        for label_file in sorted(hwmon.glob("in*_label")):
            m = re.fullmatch(r"in(\d+)_label", label_file.name)
            if m is None:
                continue
            k = m.group(1)
            volts, amps = hwmon / f"in{k}_input", hwmon / f"curr{k}_input"
            if not (volts.exists() and amps.exists()):
                continue  # a shunt-only or disabled channel
            try:
                label = label_file.read_text().strip()
            except OSError:
                continue
            out.append(Rail(label, volts, amps))
    return out


class JetsonBoard:
    """The module's power: the input rail, or (without one) the sum of the rails."""

    def __init__(self, measured: list[Rail]) -> None:
        if not measured:
            raise PowerBackendError("no INA3221 rail")
        self.rails = measured
        labels = "+".join(r.label for r in measured)
        note = (
            ""
            if len(measured) == 1
            else "no input rail: the sum of the monitored rails, which misses what is not on one"
        )
        for r in measured:
            r.power_w()  # readable now, or absent with the reason
        self.info = DeviceInfo(
            name=f"jetson:{labels}",
            kind="soc",
            source="jetson_ina3221",
            model=f"Jetson INA3221 {labels}",
            note=note,
        )

    def read(self) -> PowerReading:
        return PowerReading(power_w=sum(r.power_w() for r in self.rails))

    def close(self) -> None:
        pass


def discover(root: Path = DEFAULT_ROOT) -> list[JetsonBoard]:
    found = rails(root)
    if not found:
        raise PowerBackendError(f"no ina3221 hwmon under {root} (not a Jetson, or JetPack < 5)")
    inputs = [r for r in found if r.label in INPUT_RAILS]
    return [JetsonBoard(inputs[:1] if inputs else found)]
