"""Which power backends work here: each family probed in isolation, in a fixed order.

A probe that raises anything (a vendor library that fails on import, a driver that is half
installed) means "absent, because …": the daemon starts with whatever works, even nothing.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from h3d.power import amdsmi, apple, intel, jetson, nvml, rapl
from h3d.power.base import PowerBackend

logger = logging.getLogger(__name__)


@dataclass
class Probe:
    family: str
    ok: bool
    reason: str
    fix: str = ""
    backends: list[PowerBackend] = field(default_factory=list)

    def render(self) -> str:
        """One line (two with a fix) for ``h3d doctor``."""
        line = f"{self.family:<10} {'OK' if self.ok else 'NO':<3} {self.reason}"
        return f"{line}\n{'':<14}fix: {self.fix}" if self.fix and not self.ok else line


def _probe(
    family: str, fix: Callable[[str], str], make: Callable[[], Sequence[PowerBackend]]
) -> Probe:
    try:
        backends = list(make())
    except (Exception, SystemExit) as exc:  # isolation: any failure is a reason, not a crash
        reason = str(exc) or type(exc).__name__
        return Probe(family, False, reason, fix(reason))
    if not backends:
        return Probe(family, False, "no device found", fix("no device found"))
    names = ", ".join(
        f"{b.info.name} ({b.info.source}{'; ' + b.info.note if b.info.note else ''})"
        for b in backends
    )
    return Probe(family, True, names, "", backends)


def _apple() -> list[PowerBackend]:
    if platform.system() != "Darwin":
        raise RuntimeError("not macOS")
    try:
        return list(apple.ioreport_backends())
    except Exception as exc:
        refusal = apple.powermetrics_refusal()
        if refusal is None:
            return list(apple.powermetrics_backends())
        raise RuntimeError(f"{exc}; and {refusal}") from exc


def probe_all(
    *,
    powercap_root: Path = rapl.DEFAULT_ROOT,
    drm_root: Path = intel.DEFAULT_ROOT,
    hwmon_root: Path = jetson.DEFAULT_ROOT,
    nvml_period: bool = True,
) -> list[Probe]:
    def nvml_fix(reason: str) -> str:
        if "not importable" in reason:
            return "`pip install 'h3[nvidia]'` (and the NVIDIA driver)"
        if "libnvidia-ml.so" in reason or "not loaded" in reason:
            return "install or load the NVIDIA driver; `nvidia-smi` must work"
        if "permission" in reason:
            return "run h3d as a user who may open /dev/nvidia* (e.g. the video group)"
        if "mismatch" in reason:
            return "reboot (or reload the nvidia modules) after the driver update"
        return "" if "no device" in reason else "check that `nvidia-smi` works for this user"

    def amd_fix(reason: str) -> str:
        if "not importable" in reason:
            return "`pip install 'h3[amd]'` (and ROCm >= 6 with the amdgpu driver)"
        if "libamd_smi.so" in reason:
            return "install ROCm's amd-smi-lib (`amd-smi` must work), or set ROCM_PATH"
        if "permission" in reason:
            return "run h3d as a user in the render and video groups"
        if "VM guest" in reason:
            return "measure on the host: a guest cannot read the GPU's energy counter"
        if "N/A" in reason or "neither die reports" in reason:
            return (
                "`amd-smi metric --power --energy` shows what the GPU reports; a newer ROCm "
                "(amdgpu and its firmware) may report the counter or the socket power"
            )
        if "unexpected amdsmi output" in reason:
            return "install the amdsmi bindings of the installed ROCm release (`amd-smi version`)"
        if "driver" in reason or "initialise" in reason:
            return "load the amdgpu driver (`sudo modprobe amdgpu`); `amd-smi list` must work"
        return ""

    def intel_fix(reason: str) -> str:
        if "not readable" in reason:
            return "`sudo h3d setup-rapl` shows the udev pattern; adapt it to the hwmon file"
        if "without an energy counter" in reason:
            return (
                "a newer kernel may expose the counter; or read it through Level Zero: install "
                "level-zero and the compute runtime, `pip install 'h3[intel]'`"
            )
        if "does not exist" in reason or "no i915/xe" in reason:
            return ""  # no Intel GPU here
        return "Level Zero: install level-zero and the compute runtime, `pip install 'h3[intel]'`"

    def rapl_fix(reason: str) -> str:
        if "root-only" in reason:
            return "`h3d setup-rapl` prints a udev rule and a systemd unit (`--apply` as root)"
        if "does not exist" in reason:
            return ""  # nothing to fix
        return (
            "load the driver: `sudo modprobe intel_rapl_msr` (Intel, and AMD Zen on Linux >= 5.11)"
        )

    def apple_fix(reason: str) -> str:
        if reason == "not macOS":
            return ""
        return apple.SUDOERS_FIX if apple.NEEDS_PASSWORD in reason else apple.ZEUS_FIX

    return [
        _probe("nvml", nvml_fix, lambda: nvml.discover(probe_period=nvml_period)),
        _probe("amdsmi", amd_fix, lambda: amdsmi.discover(check_s=0.25 if nvml_period else 0)),
        _probe("intel", intel_fix, lambda: intel.discover_all(drm_root)),
        _probe("jetson", lambda r: "", lambda: jetson.discover(hwmon_root)),
        _probe("rapl", rapl_fix, lambda: rapl.discover(powercap_root)),
        _probe("apple", apple_fix, _apple),
    ]


def detect_backends(
    *,
    powercap_root: Path = rapl.DEFAULT_ROOT,
    drm_root: Path = intel.DEFAULT_ROOT,
    hwmon_root: Path = jetson.DEFAULT_ROOT,
) -> list[PowerBackend]:
    """GPUs (NVIDIA, AMD, Intel), Jetson, then CPU packages, then Apple SoCs: every device
    that can be read."""
    out: list[PowerBackend] = []
    for p in probe_all(powercap_root=powercap_root, drm_root=drm_root, hwmon_root=hwmon_root):
        if p.ok:
            out.extend(p.backends)
        else:
            logger.info("power backend %s absent: %s", p.family, p.reason)
    return out
