"""Apple silicon: IOReport counters through ``zeus-apple-silicon`` (no sudo), else
``powermetrics`` where passwordless sudo exists (never prompts).
"""

from __future__ import annotations

import logging
import plistlib
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading

logger = logging.getLogger(__name__)


class IOReportSoC:
    """The whole SoC (CPU + GPU + ANE + DRAM) as a counter, from AppleEnergyMonitor windows."""

    LABEL = "h3d"

    def __init__(self, monitor: Any = None) -> None:
        if monitor is None:
            try:
                from zeus_apple_silicon import AppleEnergyMonitor
            except Exception as exc:
                raise PowerBackendError(
                    f"zeus-apple-silicon is not importable ({type(exc).__name__}: {exc}); "
                    "`pip install zeus-apple-silicon` on Apple silicon"
                ) from exc
            monitor = AppleEnergyMonitor()
        self.monitor = monitor
        self.monitor.begin_window(self.LABEL)
        self._total_j = 0.0
        self.info = DeviceInfo(
            name="ioreport:soc", kind="soc", source="ioreport", model="Apple SoC"
        )

    def read(self) -> PowerReading:
        try:
            m = self.monitor.end_window(self.LABEL)
            self.monitor.begin_window(self.LABEL)
        except Exception as exc:
            raise PowerBackendError(f"IOReport read failed: {exc}") from exc
        parts = (m.cpu_total_mj, m.gpu_mj, getattr(m, "ane_mj", None), getattr(m, "dram_mj", None))
        self._total_j += sum(p for p in parts if p is not None) / 1000.0
        return PowerReading(energy_j=self._total_j)

    def close(self) -> None:
        pass


def parse_plists(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """powermetrics ``-f plist`` output: plist documents separated by NUL bytes."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while b"\0" in buf:
            doc, buf = buf.split(b"\0", 1)
            if doc.strip():
                try:
                    yield plistlib.loads(doc.strip())
                except Exception:
                    logger.debug("powermetrics: unparseable sample skipped")


def sample_power_w(sample: dict[str, Any]) -> float | None:
    """SoC power (W) from one powermetrics sample (its fields are in mW)."""
    proc = sample.get("processor", {})
    if "combined_power" in proc:
        return float(proc["combined_power"]) / 1000.0
    parts = [proc.get(k) for k in ("cpu_power", "gpu_power", "ane_power")]
    known = [float(p) for p in parts if p is not None]
    return sum(known) / 1000.0 if known else None


def sudo_allows_powermetrics() -> bool:
    try:
        r = subprocess.run(
            ["sudo", "-n", "powermetrics", "-n", "1", "-i", "10", "--samplers", "cpu_power"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class PowermetricsSoC:
    """SoC power from a ``sudo -n powermetrics -f plist`` stream, read by a thread."""

    def __init__(self, interval_ms: int = 100, stream: IO[bytes] | None = None) -> None:
        self.interval_s = interval_ms / 1000.0
        self._proc: subprocess.Popen[bytes] | None = None
        if stream is None:
            self._proc = subprocess.Popen(
                [
                    "sudo",
                    "-n",
                    "powermetrics",
                    "-f",
                    "plist",
                    "-i",
                    str(interval_ms),
                    "--samplers",
                    "cpu_power,gpu_power,ane_power",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            assert self._proc.stdout is not None
            stream = self._proc.stdout
        self._stream = stream
        self._latest: tuple[float, float] | None = None
        self._thread = threading.Thread(target=self._pump, name="h3d-powermetrics", daemon=True)
        self._thread.start()
        self.info = DeviceInfo(
            name="powermetrics:soc",
            kind="soc",
            source="powermetrics",
            model="Apple SoC",
            granularity_s=self.interval_s,
        )

    def _pump(self) -> None:
        for sample in parse_plists(
            iter(
                lambda: (
                    self._stream.read1(65536)
                    if hasattr(self._stream, "read1")
                    else self._stream.read(65536)
                ),
                b"",
            )
        ):
            w = sample_power_w(sample)
            if w is not None:
                self._latest = (time.monotonic(), w)

    def read(self) -> PowerReading:
        latest = self._latest
        if latest is None or time.monotonic() - latest[0] > max(2.0, 5 * self.interval_s):
            raise PowerBackendError("powermetrics: no fresh sample")
        return PowerReading(power_w=latest[1])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
