"""Probing in isolation: any failure of any vendor path is "absent, because …"."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from h3d.power import apple, detect, nvml, rapl
from tests.h3d.fake_pynvml import FakeGpu, make_module


def powercap(root: Path) -> Path:
    z = root / "intel-rapl:0"
    z.mkdir(parents=True)
    (z / "name").write_text("package-0\n")
    (z / "energy_uj").write_text("12345\n")
    (z / "max_energy_range_uj").write_text("262143328850\n")
    return root


def broken_module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ("raise KeyError('ROCM_PATH')\n", "KeyError"),
        ("raise OSError('libnvidia-ml.so.1: cannot open shared object file')\n", "OSError"),
        ("import sys\nsys.exit(3)\n", "SystemExit"),
    ],
)
def test_vendor_modules_that_fail_on_import_are_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, shown: str
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    broken_module(lib, "pynvml", body)
    broken_module(lib, "zeus_apple_silicon", body)
    broken_module(lib, "amdsmi", body)
    monkeypatch.syspath_prepend(str(lib))
    for name in ("pynvml", "zeus_apple_silicon", "amdsmi"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # a host with the NVIDIA driver library: the binding is imported (without one it is not:
    # see test_no_driver_library_is_absent_without_importing_the_binding)
    monkeypatch.setattr(nvml, "driver_library_loads", lambda: True)
    monkeypatch.setattr(detect.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(apple, "powermetrics_refusal", lambda: apple.NEEDS_PASSWORD)
    roots = {
        "powercap_root": tmp_path / "none",
        "drm_root": tmp_path / "none",
        "hwmon_root": tmp_path / "none",
    }
    probes = {p.family: p for p in detect.probe_all(**roots)}
    assert [p for p in probes] == ["nvml", "amdsmi", "intel", "jetson", "rapl", "apple"]
    assert not any(p.ok for p in probes.values())
    assert shown in probes["nvml"].reason and shown in probes["apple"].reason
    assert shown in probes["amdsmi"].reason
    assert detect.detect_backends(**roots) == []


def test_no_driver_library_is_absent_without_importing_the_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_module(tmp_path, "pynvml", "raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(nvml.sys, "platform", "linux")
    monkeypatch.setattr(nvml, "driver_library_loads", lambda: False)
    probe = detect.probe_all(powercap_root=tmp_path / "none")[0]
    assert probe.family == "nvml" and not probe.ok
    assert probe.reason == "NVML: the NVIDIA driver library (libnvidia-ml.so) is not installed"
    assert "pynvml" not in sys.modules
    assert probe.fix == "install or load the NVIDIA driver; `nvidia-smi` must work"
    monkeypatch.setattr(nvml, "driver_library_loads", lambda: True)  # the driver: imported
    assert "RuntimeError: imported" in detect.probe_all(powercap_root=tmp_path / "none")[0].reason
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import says so
    monkeypatch.setattr(nvml, "driver_library_loads", lambda: False)
    assert "not importable" in detect.probe_all(powercap_root=tmp_path / "none")[0].reason


def test_a_probe_that_crashes_in_discovery_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*a: object, **k: object) -> list[object]:
        raise ZeroDivisionError("driver bug")

    monkeypatch.setattr(nvml, "discover", crash)
    monkeypatch.setattr(rapl, "discover", crash)
    probes = detect.probe_all(powercap_root=tmp_path, drm_root=tmp_path, hwmon_root=tmp_path)
    assert [p.ok for p in probes] == [False] * 6
    assert "driver bug" in probes[0].reason and "driver bug" in probes[4].reason


def test_backends_come_in_a_fixed_order_gpus_then_rapl_then_apple(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", make_module([FakeGpu("GPU-b"), FakeGpu("GPU-a")]))
    monkeypatch.setattr(detect.platform, "system", lambda: "Darwin")

    class Monitor:
        def get_cumulative_energy(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(
                cpu_total_mj=5, gpu_mj=1, gpu_sram_mj=None, ane_mj=None, dram_mj=None
            )

    fake_zeus = types.ModuleType("zeus_apple_silicon")
    fake_zeus.AppleEnergyMonitor = Monitor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", fake_zeus)
    found = detect.detect_backends(powercap_root=powercap(tmp_path / "powercap"))
    assert [b.info.name for b in found] == [
        "nvml:GPU-b",
        "nvml:GPU-a",
        "rapl:package-0",
        "ioreport:cpu",
        "ioreport:gpu",
    ]
    assert [b.info.source for b in found][2:] == ["rapl", "ioreport", "ioreport"]


def test_nothing_readable_is_an_empty_list_and_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    caplog.set_level(logging.INFO, logger="h3d.power.detect")
    assert detect.detect_backends(powercap_root=tmp_path / "missing") == []
    for family in ("nvml", "amdsmi", "intel", "jetson", "rapl", "apple"):
        assert f"power backend {family} absent" in caplog.text


def test_render_is_one_line_when_ok_and_names_the_fix_when_not(tmp_path: Path) -> None:
    probes = {p.family: p for p in detect.probe_all(powercap_root=powercap(tmp_path / "pc"))}
    ok = probes["rapl"].render()
    assert ok.startswith("rapl") and " OK " in ok and "\n" not in ok
    empty = tmp_path / "empty"
    empty.mkdir()
    (bad,) = [p for p in detect.probe_all(powercap_root=empty) if p.family == "rapl"]
    text = bad.render()
    assert " NO " in text and "fix: " in text and "intel_rapl_msr" in text
