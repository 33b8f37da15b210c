"""Apple silicon backends through fakes at the seam: an ``AppleEnergyMonitor`` with the real
surface of ``zeus_apple_silicon`` and a powermetrics ``-f plist`` stream in the shape macOS
writes (NUL-separated documents)."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from h3d.power import apple, detect
from h3d.power.base import PowerBackendError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STREAM = FIXTURES / "powermetrics_m1pro.plist.stream"


def metrics(**mj: int | None) -> types.SimpleNamespace:
    """An ``AppleEnergyMetrics``: every field, None where the SoC does not report it."""
    fields = dict.fromkeys(
        (
            "cpu_total_mj",
            "efficiency_cores_mj",
            "performance_cores_mj",
            "efficiency_core_manager_mj",
            "performance_core_manager_mj",
            "dram_mj",
            "gpu_mj",
            "gpu_sram_mj",
            "ane_mj",
        )
    )
    fields.update(mj)
    return types.SimpleNamespace(**fields)


class WindowMonitor:
    """``begin_window``/``end_window`` only (older zeus-apple-silicon), mJ per window."""

    def __init__(self, per_window: types.SimpleNamespace) -> None:
        self.per_window = per_window
        self.open: set[str] = set()

    def begin_window(self, key: str, restart: bool = False) -> None:
        if key in self.open and not restart:
            raise RuntimeError(f"Measurement window '{key}' already exists")
        self.open.add(key)

    def end_window(self, key: str) -> types.SimpleNamespace:
        if key not in self.open:
            raise RuntimeError(f"Measurement window '{key}' does not exist")
        self.open.remove(key)
        return self.per_window


class CumulativeMonitor(WindowMonitor):
    def __init__(self, values: list[types.SimpleNamespace]) -> None:
        super().__init__(values[0])
        self.values = values

    def get_cumulative_energy(self) -> types.SimpleNamespace:
        return self.values.pop(0)


def test_ioreport_windows_become_per_domain_counters() -> None:
    mon = WindowMonitor(metrics(cpu_total_mj=1000, gpu_mj=400, gpu_sram_mj=100, dram_mj=250))
    backends = apple.ioreport_backends(mon)
    by = {b.domain: b for b in backends}
    assert sorted(by) == ["cpu", "dram", "gpu"]  # ane_mj None: left out, not 0 J
    assert by["gpu"].info.kind == "gpu" and by["cpu"].info.kind == "cpu"
    assert {b.info.source for b in backends} == {"ioreport"}
    e0 = {d: b.read().energy_j for d, b in by.items()}  # each read closes one window
    e1 = {d: b.read().energy_j for d, b in by.items()}
    for d, per_window_j in (("cpu", 1.0), ("gpu", 0.5), ("dram", 0.25)):
        assert e1[d] - e0[d] == pytest.approx(3 * per_window_j)  # 3 windows closed in between
    assert mon.open == {"h3d"}  # always exactly one window open


def test_ioreport_cumulative_counter_is_preferred_and_clamped() -> None:
    vals = [
        metrics(cpu_total_mj=50_000, gpu_mj=9_000, ane_mj=0),
        metrics(cpu_total_mj=51_000, gpu_mj=9_500, ane_mj=10),
        metrics(cpu_total_mj=52_000, gpu_mj=9_900, ane_mj=10),
        metrics(cpu_total_mj=300, gpu_mj=100, ane_mj=4),  # counters restarted
    ]
    mon = CumulativeMonitor(vals)
    cpu, gpu, ane = apple.ioreport_backends(mon)
    assert mon.open == set()  # no windows in cumulative mode
    assert cpu.read().energy_j == pytest.approx(1.0)
    assert gpu.read().energy_j == pytest.approx(0.5 + 0.4)  # each read takes the next value
    assert ane.read().energy_j == pytest.approx(0.010 + 0.004)  # +10, +0, restart at 4


def test_ioreport_errors_become_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(WindowMonitor):
        def end_window(self, key: str) -> types.SimpleNamespace:
            raise RuntimeError("IOReport subscription lost")

    mon = Broken(metrics(cpu_total_mj=1))
    with pytest.raises(PowerBackendError, match="subscription lost"):
        apple.ioreport_backends(mon)
    with pytest.raises(PowerBackendError, match="no CPU, GPU, ANE or DRAM"):
        apple.ioreport_backends(WindowMonitor(metrics()))
    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", None)
    with pytest.raises(PowerBackendError, match="not importable"):
        apple.ioreport_backends()


def test_recorded_powermetrics_stream_becomes_counters() -> None:
    raw = STREAM.read_bytes()
    chunks = [raw[i : i + 97] for i in range(0, len(raw), 97)]  # pipe-sized pieces
    samples = list(apple.parse_plists(chunks))
    assert len(samples) == 3 and samples[0]["hw_model"] == "MacBookPro18,3"
    backends = apple.powermetrics_backends(stream=io.BytesIO(raw))
    by = {b.domain: b for b in backends}
    assert by["cpu"].stream.wait_ended(10.0)
    assert sorted(by) == ["ane", "cpu", "gpu"]
    assert {b.info.granularity_s for b in backends} == {0.1}
    cpu, gpu, ane = by["cpu"].read(), by["gpu"].read(), by["ane"].read()
    assert cpu.energy_j == pytest.approx((312 + 905 + 640) / 1000)  # the mJ of each sample
    assert gpu.energy_j == pytest.approx((105 + 1530 + 1210) / 1000)  # not also gpu.gpu_energy
    assert ane.energy_j == pytest.approx(0.012)
    assert cpu.power_w == pytest.approx(640 / 1000 / 0.099873, rel=1e-3)  # latest sample


def test_a_stream_without_trailing_nul_and_with_garbage_still_parses() -> None:
    raw = STREAM.read_bytes().rstrip(b"\0")
    docs = raw.split(b"\0")
    broken = docs[0] + b"\0<plist>not xml\0" + b"\0".join(docs[1:])
    assert len(list(apple.parse_plists([broken]))) == 3


def test_a_stalled_or_empty_stream_is_a_reason_not_zero_joules() -> None:
    with pytest.raises(PowerBackendError, match="no CPU/GPU/ANE figures"):
        apple.powermetrics_backends(stream=io.BytesIO(b""), first_sample_timeout_s=1.0)
    pm = apple.PowermetricsStream(stream=io.BytesIO(STREAM.read_bytes()))
    assert pm.wait_first(2.0)
    pm._last_sample = 0.0  # as if the last sample came long ago
    with pytest.raises(PowerBackendError, match="no fresh sample"):
        pm.reading("cpu")


def test_sudo_is_never_prompted_for() -> None:
    calls: list[list[str]] = []

    def denied(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(cmd)
        assert kw["stdin"] == subprocess.DEVNULL
        return subprocess.CompletedProcess(cmd, 1, b"", b"sudo: a password is required\n")

    assert apple.powermetrics_refusal(run=denied) == apple.NEEDS_PASSWORD
    assert calls[0][:2] == ["sudo", "-n"]

    def missing(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        raise FileNotFoundError("sudo")

    assert apple.powermetrics_refusal(run=missing) == "`sudo` cannot be run: sudo"


def test_a_powermetrics_that_fails_on_its_own_is_not_called_a_password_prompt() -> None:
    """A powermetrics that hangs, or exits with its own error, behind a sudo that needs no
    password: the refusal says so. Before, every failure read "needs a password", and
    ``h3d doctor`` told a user whose sudoers rule works to edit sudoers."""

    def hangs(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    def own_error(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        err = b"powermetrics: starting\npowermetrics: unrecognized sampler: cpu_power\n"
        return subprocess.CompletedProcess(cmd, 64, b"", err)

    def works(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(cmd, 0, b"<plist/>", b"")

    assert apple.powermetrics_refusal(run=hangs) == (
        "`sudo -n powermetrics` did not answer in 10 s"
    )
    assert apple.powermetrics_refusal(run=own_error) == (
        "`sudo -n powermetrics` failed (exit 64): powermetrics: unrecognized sampler: cpu_power"
    )
    assert apple.powermetrics_refusal(run=works) is None


def test_doctor_names_a_failing_powermetrics_and_attaches_no_sudoers_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real ``sudo -n powermetrics`` call, through a passwordless ``sudo`` and a
    ``powermetrics`` that exits 64 with its own error (scripts on PATH)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    (bin_ / "powermetrics").write_text(
        "#!/bin/sh\necho 'powermetrics: no such sampler' >&2\nexit 64\n"
    )
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    monkeypatch.setattr(detect.platform, "system", lambda: "Darwin")
    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", None)
    probes = {p.family: p for p in detect.probe_all(powercap_root=tmp_path, nvml_period=False)}
    p = probes["apple"]
    assert not p.ok and "not importable" in p.reason
    assert "`sudo -n powermetrics` failed (exit 64): powermetrics: no such sampler" in p.reason
    assert "password" not in p.reason and "sudoers" not in p.fix
    assert p.fix == apple.ZEUS_FIX


def test_probe_on_a_mac_without_either_path_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(detect.platform, "system", lambda: "Darwin")
    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", None)
    monkeypatch.setattr(apple, "powermetrics_refusal", lambda: apple.NEEDS_PASSWORD)
    probes = {p.family: p for p in detect.probe_all(powercap_root=tmp_path, nvml_period=False)}
    p = probes["apple"]
    assert not p.ok and "not importable" in p.reason and "needs a password" in p.reason
    assert "NOPASSWD: /usr/bin/powermetrics" in p.fix and "zeus-apple-silicon" in p.fix
    assert "fix:" in p.render()
