"""Power backends through fakes at the hardware seam only."""

from __future__ import annotations

import io
import plistlib
import sys
import time
from pathlib import Path

import pytest

from h3d.power import apple, detect, nvml, rapl
from h3d.power.base import PowerBackendError
from h3d.power.estimated import MIN_WINDOW_S, EstimatedCpuBackend
from h3d.power.select import build_backends
from tests.h3d.fake_pynvml import FakeGpu, NVMLError_LibraryNotFound

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# --- NVML -----------------------------------------------------------------------------------


def test_nvml_prefers_the_energy_counter_and_clamps_a_backwards_step(fake_nvml) -> None:
    g = FakeGpu("GPU-aaaa-1111")
    fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.info.source == "nvml_counter" and dev.info.name == "nvml:GPU-aaaa-1111"
    assert dev.info.power_limit_w == 400.0 and dev.info.kind == "gpu"
    r0 = dev.read()
    assert r0.energy_j == 0.0 and r0.power_w == 250.0
    g.advance(2.0)  # 250 W for 2 s
    assert dev.read().energy_j == pytest.approx(500.0)
    g.energy_mj = 10  # driver reload: the counter restarts near zero
    assert dev.read().energy_j == pytest.approx(500.01)  # never negative, never lost
    g.advance(1.0)
    assert dev.read().energy_j == pytest.approx(750.01)


def test_nvml_without_counter_polls_the_instant_field_not_the_average(fake_nvml) -> None:
    g = FakeGpu("GPU-bbbb", counter=False, power_mw=123_000)
    fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.info.source == "nvml_power_instant"
    r = dev.read()
    assert r.power_w == 123.0 and r.energy_j is None
    g2 = FakeGpu("GPU-cccc", counter=False, instant=False, power_mw=80_000)
    fake_nvml([g2])
    (dev2,) = nvml.discover(env={}, probe_period=False)
    assert dev2.info.source == "nvml_power_average" and dev2.read().power_w == 80.0


def test_nvml_honours_cuda_visible_devices(fake_nvml) -> None:
    gpus = [FakeGpu("GPU-0000-x"), FakeGpu("GPU-1111-y"), FakeGpu("MIG-2222-z")]
    fake_nvml(gpus)
    names = lambda env: [d.info.uuid for d in nvml.discover(env=env, probe_period=False)]  # noqa: E731
    assert names({}) == ["GPU-0000-x", "GPU-1111-y", "MIG-2222-z"]
    assert names({"CUDA_VISIBLE_DEVICES": "1"}) == ["GPU-1111-y"]
    assert names({"CUDA_VISIBLE_DEVICES": "GPU-0000,MIG-2222"}) == ["GPU-0000-x", "MIG-2222-z"]
    assert names({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_nvml_measures_the_update_period(fake_nvml) -> None:
    g = FakeGpu("GPU-dddd")
    mod = fake_nvml([g])
    t0 = time.monotonic()
    mod.nvmlDeviceGetTotalEnergyConsumption = lambda h: (
        1000 + int((time.monotonic() - t0) / 0.02)
    )  # 20 ms steps
    (dev,) = nvml.discover(env={})
    assert dev.info.granularity_s == pytest.approx(0.02, abs=0.008)


def test_nvml_errors_become_reasons(fake_nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml([], init_error=NVMLError_LibraryNotFound)
    with pytest.raises(PowerBackendError, match="libnvidia-ml.so"):
        nvml.discover(env={})
    g = FakeGpu("GPU-eeee")
    fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    g.lost = True
    with pytest.raises(PowerBackendError, match="fell off the bus"):
        dev.read()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(PowerBackendError, match="not importable"):
        nvml.discover(env={})


def test_nvml_process_share(fake_nvml) -> None:
    g = FakeGpu("GPU-ffff", procs=[(10, 60), (11, 20), (99, 20)])
    fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.process_share({10, 11}) == pytest.approx(0.8)
    g.procs = []
    assert dev.process_share({10}) is None


def test_a_vendor_module_that_raises_on_import_is_absent_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pynvml.py").write_text(
        "raise KeyError('ROCM_PATH')  # as a broken vendor binding does\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(nvml, "driver_library_loads", lambda: True)  # the binding is imported
    probes = {p.family: p for p in detect.probe_all(powercap_root=tmp_path / "none")}
    assert not probes["nvml"].ok and "KeyError" in probes["nvml"].reason
    assert detect.detect_backends(powercap_root=tmp_path / "none") == []


# --- RAPL -----------------------------------------------------------------------------------


def powercap(root: Path, *, packages: int = 1, max_uj: int = 1000_000, start_uj: int = 0) -> Path:
    for p in range(packages):
        pkg = root / f"intel-rapl:{p}"
        pkg.mkdir(parents=True)
        (pkg / "name").write_text(f"package-{p}\n")
        (pkg / "energy_uj").write_text(f"{start_uj}\n")
        (pkg / "max_energy_range_uj").write_text(f"{max_uj}\n")
        for j, sub in enumerate(("core", "dram")):
            z = pkg / f"intel-rapl:{p}:{j}"
            z.mkdir()
            (z / "name").write_text(f"{sub}\n")
            (z / "energy_uj").write_text("0\n")
            (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    mmio = root / "intel-rapl-mmio:0"
    mmio.mkdir()
    (mmio / "name").write_text("package-0\n")
    return root


def test_rapl_reads_packages_and_dram_and_handles_wraparound(tmp_path: Path) -> None:
    root = powercap(tmp_path / "powercap", packages=2, max_uj=1_000_000, start_uj=900_000)
    zones = rapl.discover(root)
    assert [z.info.name for z in zones] == [
        "rapl:package-0",
        "rapl:package-0-dram",
        "rapl:package-1",
        "rapl:package-1-dram",
    ]
    assert [z.info.kind for z in zones] == ["cpu", "dram", "cpu", "dram"]
    pkg = zones[0]
    assert pkg.read().energy_j == 0.0
    (root / "intel-rapl:0" / "energy_uj").write_text("950000\n")
    assert pkg.read().energy_j == pytest.approx(0.05)
    (root / "intel-rapl:0" / "energy_uj").write_text("100000\n")  # wrapped past 1 000 000
    assert pkg.read().energy_j == pytest.approx(0.05 + 0.05 + 0.1)


def test_rapl_unreadable_energy_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = powercap(tmp_path / "powercap")
    real = Path.read_text

    def deny(self: Path, *a, **k) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(PowerBackendError, match="CVE-2020-8694"):
        rapl.discover(root)
    with pytest.raises(PowerBackendError, match="does not exist"):
        rapl.discover(tmp_path / "missing")


# --- Apple ----------------------------------------------------------------------------------


def test_powermetrics_plist_stream_is_parsed_into_power() -> None:
    stream = (FIXTURES / "powermetrics.plist.stream").read_bytes()
    samples = list(apple.parse_plists([stream[i : i + 300] for i in range(0, len(stream), 300)]))
    assert len(samples) == 3
    assert [apple.sample_power_w(s) for s in samples] == pytest.approx([4.321, 12.5, 7.0])
    (cpu, gpu, ane) = apple.powermetrics_backends(stream=io.BytesIO(stream))
    assert cpu.stream.wait_ended(10.0)
    # this older-style stream has power only: energy is power x elapsed_ns
    assert cpu.read().energy_j == pytest.approx((3.0 + 9.0 + 5.0) * 0.1)
    assert gpu.read().power_w == pytest.approx(2.0) and cpu.info.source == "powermetrics"
    assert ane.read().energy_j == pytest.approx(0.03)


def test_recorded_stream_fixture_is_real_plist() -> None:
    docs = (FIXTURES / "powermetrics.plist.stream").read_bytes().split(b"\0")
    assert plistlib.loads(docs[0].strip())["processor"]["combined_power"] == 4321


# --- the estimated CPU model ----------------------------------------------------------------


def test_estimated_reads_utilisation_over_whole_windows_only() -> None:
    """A read off the sampler's schedule (a run's start or end), a few ms after a scheduled
    one, measured a window of one or two 10 ms ticks: 0 % or 100 % of a busy machine, a dip
    to 0 W in the README's own figure. It now repeats the last figure and leaves the window
    open, so the next read measures the whole window."""
    now = [0.0]
    cpu = [(0.0, 0.0)]  # (busy, total) CPU seconds, as /proc/stat counts them
    est = EstimatedCpuBackend(20.0, clock=lambda: now[0], cpu_times=lambda: cpu[0])
    now[0], cpu[0] = 0.1, (0.1, 0.2)  # one of two cores busy for 100 ms
    assert est.read().power_w == pytest.approx(10.0)
    now[0], cpu[0] = 0.11, (0.1, 0.22)  # 10 ms later: no busy tick counted yet
    assert est.read().power_w == pytest.approx(10.0)  # not 0 W
    now[0], cpu[0] = 0.2, (0.2, 0.4)
    assert est.read().power_w == pytest.approx(10.0)  # (0.2 - 0.1) / (0.4 - 0.2): whole
    now[0], cpu[0] = 0.3, (0.4, 0.6)
    assert est.read().power_w == pytest.approx(20.0)  # a window that is long enough counts
    now[0], cpu[0] = 0.4, (0.4, 0.6)  # a stalled /proc/stat: no tick at all
    assert est.read().power_w == pytest.approx(20.0)


def test_estimated_scheduled_reads_always_measure() -> None:
    """The daemon builds the model with a shortest window of half its sampling period (at
    most 50 ms): at a 50 ms period a scheduled read that wakes 1 ms early still measures,
    where a 50 ms shortest window would have skipped it."""
    (est,) = build_backends("estimated", cpu_tdp_w=20.0, sample_interval_s=0.05)
    assert isinstance(est, EstimatedCpuBackend) and est.min_window_s == pytest.approx(0.025)
    (default,) = build_backends("estimated", cpu_tdp_w=20.0, sample_interval_s=1.0)
    assert isinstance(default, EstimatedCpuBackend) and default.min_window_s == MIN_WINDOW_S
    now = [0.0]
    cpu = [(0.0, 0.0)]
    est = EstimatedCpuBackend(
        20.0, min_window_s=0.025, clock=lambda: now[0], cpu_times=lambda: cpu[0]
    )
    now[0], cpu[0] = 0.05, (0.05, 0.1)
    assert est.read().power_w == pytest.approx(10.0)
    now[0], cpu[0] = 0.099, (0.148, 0.198)  # 49 ms later: both cores busy throughout
    assert est.read().power_w == pytest.approx(20.0)


def test_estimated_agrees_with_psutil_on_a_busy_machine() -> None:
    """On this machine, with one core kept busy by a child process: every 100 ms window reads
    what ``psutil.cpu_percent`` reads over the same window, and a read 2 ms after one repeats
    it."""
    import subprocess

    import psutil

    est = EstimatedCpuBackend(100.0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        est.read()
        psutil.cpu_percent(interval=None)
        for _ in range(5):
            time.sleep(0.1)
            w = est.read().power_w
            pct = psutil.cpu_percent(interval=None)
            assert w is not None and abs(w - pct) <= 10.0  # µs apart: a tick or two at most
            assert w >= 100.0 / (psutil.cpu_count() or 1) * 0.8  # a busy core shows
            time.sleep(0.002)
            assert est.read().power_w == w
    finally:
        busy.kill()
        busy.wait()
