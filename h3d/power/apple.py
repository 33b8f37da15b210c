"""Apple silicon: IOReport energy counters through ``zeus-apple-silicon`` (no sudo), else a
``powermetrics`` plist stream where passwordless sudo exists (``sudo -n``: never prompts).

Both paths yield one backend per SoC domain, so a GPU-heavy (MPS) run and a CPU-heavy one
are told apart and attributed separately:

=========  ======================================  ===================================
domain     IOReport (``AppleEnergyMetrics``, mJ)    powermetrics (``processor`` dict)
=========  ======================================  ===================================
``cpu``    ``cpu_total_mj``                        ``cpu_energy`` (mJ per sample)
``gpu``    ``gpu_mj`` + ``gpu_sram_mj``            ``gpu_energy`` (mJ per sample)
``ane``    ``ane_mj``                              ``ane_energy`` (mJ per sample)
``dram``   ``dram_mj``                             (not reported)
=========  ======================================  ===================================

Every domain is a cumulative counter (``energy_j``): IOReport's directly, powermetrics' as
the running sum of its per-sample energies (power × ``elapsed_ns`` where a macOS version
reports only power). A domain the SoC does not report (``None``, e.g. DRAM on some M1) is
left out rather than read as 0 J.
"""

from __future__ import annotations

import logging
import plistlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from h3d.power.base import DeviceInfo, PowerBackendError, PowerReading

logger = logging.getLogger(__name__)

DOMAINS = ("cpu", "gpu", "ane", "dram")
_KIND = {"cpu": "cpu", "gpu": "gpu", "ane": "soc", "dram": "dram"}
_MODEL = {
    "cpu": "Apple SoC CPU clusters",
    "gpu": "Apple SoC GPU (incl. GPU SRAM)",
    "ane": "Apple Neural Engine",
    "dram": "Apple SoC DRAM",
}
ZEUS_FIX = "`pip install zeus-apple-silicon` (no sudo at all)"
SUDOERS_FIX = (
    "allow it without a password: `sudo visudo -f /etc/sudoers.d/h3` with the line "
    f"`YOUR_USER ALL=(root) NOPASSWD: /usr/bin/powermetrics`; or {ZEUS_FIX}"
)
#: The refusal of :func:`powermetrics_refusal` that ``SUDOERS_FIX`` fixes.
NEEDS_PASSWORD = "`sudo -n powermetrics` needs a password"


def _metrics_mj(m: Any) -> dict[str, float]:
    """Domain energies (mJ) from an ``AppleEnergyMetrics``; unavailable domains left out."""
    out: dict[str, float] = {}
    cpu = getattr(m, "cpu_total_mj", None)
    if cpu is not None:
        out["cpu"] = float(cpu)
    gpu = [getattr(m, k, None) for k in ("gpu_mj", "gpu_sram_mj")]
    if any(v is not None for v in gpu):
        out["gpu"] = float(sum(v for v in gpu if v is not None))
    for domain, key in (("ane", "ane_mj"), ("dram", "dram_mj")):
        v = getattr(m, key, None)
        if v is not None:
            out[domain] = float(v)
    return out


class IOReportReader:
    """One ``AppleEnergyMonitor`` shared by the domain backends, as monotonic counters.

    ``get_cumulative_energy()`` is read where the installed version has it (no gap between
    readings); otherwise a measurement window is closed and reopened on every read, and
    each window's energy is added to every domain at once, so the order in which the
    domain backends read cannot lose or double count anything.
    """

    LABEL = "h3d"

    def __init__(self, monitor: Any = None) -> None:
        if monitor is None:
            try:
                from zeus_apple_silicon import AppleEnergyMonitor
            except (Exception, SystemExit) as exc:  # ImportError, a binding that fails to load
                raise PowerBackendError(
                    f"zeus-apple-silicon is not importable ({type(exc).__name__}: {exc}); "
                    "`pip install zeus-apple-silicon` on Apple silicon"
                ) from exc
            try:
                monitor = AppleEnergyMonitor()
            except Exception as exc:
                raise PowerBackendError(f"IOReport is not usable here: {exc}") from exc
        self.monitor = monitor
        self._lock = threading.Lock()
        self._cumulative = callable(getattr(monitor, "get_cumulative_energy", None))
        self._totals_mj: dict[str, float] = {}
        self._last_raw: dict[str, float] = {}
        if not self._cumulative:
            monitor.begin_window(self.LABEL)
        self.refresh()

    def refresh(self) -> dict[str, float]:
        """Bring the counters up to now; returns every domain's total in J."""
        with self._lock:
            try:
                if self._cumulative:
                    self._add_cumulative(_metrics_mj(self.monitor.get_cumulative_energy()))
                else:
                    m = self.monitor.end_window(self.LABEL)
                    self.monitor.begin_window(self.LABEL)
                    for d, mj in _metrics_mj(m).items():
                        self._totals_mj[d] = self._totals_mj.get(d, 0.0) + max(0.0, mj)
            except Exception as exc:
                raise PowerBackendError(f"IOReport read failed: {exc}") from exc
            return {d: mj / 1000.0 for d, mj in self._totals_mj.items()}

    def _add_cumulative(self, raw: dict[str, float]) -> None:
        for d, mj in raw.items():
            last = self._last_raw.get(d)
            if last is None:
                self._totals_mj.setdefault(d, 0.0)  # the counter starts at this backend
            elif mj >= last:
                self._totals_mj[d] += mj - last
            else:  # went backwards (reset): continue from where we were
                self._totals_mj[d] += mj
            self._last_raw[d] = mj

    def domains(self) -> list[str]:
        with self._lock:
            return [d for d in DOMAINS if d in self._totals_mj]


class IOReportDomain:
    """One SoC domain (``ioreport:cpu`` …) read through a shared :class:`IOReportReader`."""

    def __init__(self, reader: IOReportReader, domain: str) -> None:
        self.reader = reader
        self.domain = domain
        self.info = DeviceInfo(
            name=f"ioreport:{domain}", kind=_KIND[domain], source="ioreport", model=_MODEL[domain]
        )

    def read(self) -> PowerReading:
        totals = self.reader.refresh()
        if self.domain not in totals:
            raise PowerBackendError(f"IOReport no longer reports {self.domain}")
        return PowerReading(energy_j=totals[self.domain])

    def close(self) -> None:
        pass


def ioreport_backends(monitor: Any = None) -> list[IOReportDomain]:
    """A backend per domain the SoC reports. Raises PowerBackendError when IOReport is not
    usable (not installed, not Apple silicon, no domain)."""
    reader = IOReportReader(monitor)
    domains = reader.domains()
    if not domains:
        raise PowerBackendError("IOReport reports no CPU, GPU, ANE or DRAM energy here")
    return [IOReportDomain(reader, d) for d in domains]


# --- powermetrics -------------------------------------------------------------------------


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
    if buf.strip():  # the last document, when the stream ends without a trailing NUL
        try:
            yield plistlib.loads(buf.strip())
        except Exception:
            logger.debug("powermetrics: truncated last sample skipped")


def sample_power_w(sample: dict[str, Any]) -> float | None:
    """SoC power (W) from one powermetrics sample (its fields are in mW)."""
    proc = sample.get("processor", {})
    if "combined_power" in proc:
        return float(proc["combined_power"]) / 1000.0
    parts = [proc.get(k) for k in ("cpu_power", "gpu_power", "ane_power")]
    known = [float(p) for p in parts if p is not None]
    return sum(known) / 1000.0 if known else None


def sample_domains(sample: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Per domain, (energy in mJ over the sample, power in W) from one powermetrics sample.

    ``<d>_energy`` (mJ) is preferred; where only ``<d>_power`` (mW) is there, the energy is
    power × ``elapsed_ns``. GPU figures are looked up under ``processor`` and ``gpu``.
    """
    proc = sample.get("processor", {}) or {}
    gpu = sample.get("gpu", {}) or {}
    elapsed_s = float(sample.get("elapsed_ns", 0)) / 1e9
    out: dict[str, tuple[float, float | None]] = {}
    for d in ("cpu", "gpu", "ane"):
        where = (proc, gpu) if d == "gpu" else (proc,)
        energy = next((w[f"{d}_energy"] for w in where if f"{d}_energy" in w), None)
        power = next((w[f"{d}_power"] for w in where if f"{d}_power" in w), None)
        power_w = float(power) / 1000.0 if power is not None else None
        if energy is not None:
            mj = float(energy)
            if power_w is None and elapsed_s > 0:
                power_w = mj / 1000.0 / elapsed_s
        elif power_w is not None and elapsed_s > 0:
            mj = power_w * elapsed_s * 1000.0
        else:
            continue
        out[d] = (mj, power_w)
    return out


def powermetrics_refusal(run: Callable[..., Any] = subprocess.run) -> str | None:
    """Why ``sudo -n powermetrics`` (never prompts) does not run here; None when it does.

    Only sudo's own "a password is required" is :data:`NEEDS_PASSWORD`: a powermetrics
    that hangs or exits with its own error is named as such (a sudoers rule would not help).
    """
    cmd = ["sudo", "-n", "powermetrics", "-n", "1", "-i", "10", "--samplers", "cpu_power"]
    try:
        r = run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=10, check=False)
    except subprocess.TimeoutExpired as exc:
        return f"`sudo -n powermetrics` did not answer in {exc.timeout:g} s"
    except OSError as exc:
        return f"`sudo` cannot be run: {exc}"
    if r.returncode == 0:
        return None
    err = (r.stderr or b"").decode(errors="replace").strip()
    if "password is required" in err:
        return NEEDS_PASSWORD
    last = err.splitlines()[-1] if err else "no message"
    return f"`sudo -n powermetrics` failed (exit {r.returncode}): {last}"


class PowermetricsStream:
    """A ``sudo -n powermetrics -f plist`` stream, pumped by a thread into per-domain counters."""

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
                    "cpu_power,gpu_power",  # the ANE's figures come with cpu_power
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            assert self._proc.stdout is not None
            stream = self._proc.stdout
        self._stream = stream
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._totals_mj: dict[str, float] = {}
        self._power_w: dict[str, float | None] = {}
        self._last_sample: float | None = None
        self._thread = threading.Thread(target=self._pump, name="h3d-powermetrics", daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[bytes]:
        read = getattr(self._stream, "read1", self._stream.read)
        while True:
            chunk = read(65536)
            if not chunk:
                return
            yield chunk

    def _pump(self) -> None:
        try:
            for sample in parse_plists(self._chunks()):
                domains = sample_domains(sample)
                if not domains:
                    continue
                with self._lock:
                    for d, (mj, w) in domains.items():
                        self._totals_mj[d] = self._totals_mj.get(d, 0.0) + max(0.0, mj)
                        self._power_w[d] = w
                    self._last_sample = time.monotonic()
                self._first.set()
        except Exception:  # a dying pipe must not kill the daemon; reads go stale instead
            logger.exception("powermetrics stream failed")
        finally:
            self._first.set()

    def wait_first(self, timeout_s: float) -> list[str]:
        """Wait for the first sample; returns the domains it reported."""
        self._first.wait(timeout_s)
        with self._lock:
            return [d for d in DOMAINS if d in self._totals_mj]

    def wait_ended(self, timeout_s: float) -> bool:
        """Wait until the stream has ended and been read to its last sample (for tests)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def reading(self, domain: str) -> PowerReading:
        with self._lock:
            last = self._last_sample
            if last is None or time.monotonic() - last > max(2.0, 5 * self.interval_s):
                raise PowerBackendError("powermetrics: no fresh sample (stream stalled or ended)")
            if domain not in self._totals_mj:
                raise PowerBackendError(f"powermetrics no longer reports {domain}")
            return PowerReading(
                power_w=self._power_w.get(domain), energy_j=self._totals_mj[domain] / 1000.0
            )

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


class PowermetricsDomain:
    """One SoC domain (``powermetrics:cpu`` …) from a shared :class:`PowermetricsStream`."""

    def __init__(self, stream: PowermetricsStream, domain: str) -> None:
        self.stream = stream
        self.domain = domain
        self.info = DeviceInfo(
            name=f"powermetrics:{domain}",
            kind=_KIND[domain],
            source="powermetrics",
            model=_MODEL[domain],
            granularity_s=stream.interval_s,
        )

    def read(self) -> PowerReading:
        return self.stream.reading(self.domain)

    def close(self) -> None:
        self.stream.close()


def powermetrics_backends(
    interval_ms: int = 100, stream: IO[bytes] | None = None, first_sample_timeout_s: float = 5.0
) -> list[PowermetricsDomain]:
    """A backend per domain in the first powermetrics sample; PowerBackendError if none came."""
    pm = PowermetricsStream(interval_ms, stream)
    domains = pm.wait_first(first_sample_timeout_s)
    if not domains:
        pm.close()
        raise PowerBackendError(
            f"powermetrics gave no CPU/GPU/ANE figures within {first_sample_timeout_s:g} s"
        )
    return [PowermetricsDomain(pm, d) for d in domains]
