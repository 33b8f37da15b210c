"""Intel i915/xe hwmon and Jetson INA3221, on sysfs trees laid out as the kernel lays them."""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from h3d.energy import integrate
from h3d.power import detect, intel, jetson
from h3d.power.base import PowerBackendError
from h3d.power.sampler import PowerSampler
from h3d.storage import migrate
from h3d.storage.engine import Store
from tests.h3d import fake_pyzes as fz


def drm_tree(root: Path, cards: dict[str, dict[str, str]]) -> Path:
    """``/sys`` with ``class/drm/cardN`` linking to ``devices/pci…/<bdf>/drm/cardN`` and
    the driver's hwmon under the PCI function, plus a connector entry to be ignored."""
    cls = root / "class" / "drm"
    cls.mkdir(parents=True)
    for i, (bdf, hw) in enumerate(cards.items()):
        pci = root / "devices" / "pci0000:00" / "0000:00:01.0" / bdf
        card = pci / "drm" / f"card{i}"
        card.mkdir(parents=True)
        (card / "device").symlink_to(os.path.relpath(pci, card))
        (pci / "vendor").write_text("0x8086\n")
        (pci / "device").write_text("0x56a0\n")
        hwmon = pci / "hwmon" / f"hwmon{i + 3}"
        hwmon.mkdir(parents=True)
        for name, value in hw.items():
            (hwmon / name).write_text(value + "\n")
        (cls / f"card{i}").symlink_to(os.path.relpath(card, cls))
        conn = card / f"card{i}-DP-1"
        conn.mkdir()
        (cls / f"card{i}-DP-1").symlink_to(os.path.relpath(conn, cls))
    return cls


def hwmon_file(cls: Path, card: str, name: str) -> Path:
    (hw,) = (cls / card / "device" / "hwmon").glob("hwmon*")
    return hw / name


def test_i915_energy_counter_in_microjoules(tmp_path: Path) -> None:
    cls = drm_tree(tmp_path, {"0000:03:00.0": {"name": "i915", "energy1_input": "5000000"}})
    (gpu,) = intel.discover(cls)
    assert gpu.info.name == "intel:0000:03:00.0" and gpu.info.source == "intel_hwmon"
    assert "0x56a0" in gpu.info.model and "i915" in gpu.info.model
    assert gpu.read().energy_j == 0.0
    hwmon_file(cls, "card0", "energy1_input").write_text("17500000\n")
    assert gpu.read().energy_j == pytest.approx(12.5)
    hwmon_file(cls, "card0", "energy1_input").write_text("100\n")  # driver reload
    assert gpu.read().energy_j == pytest.approx(12.5)
    hwmon_file(cls, "card0", "energy1_input").write_text("2000100\n")
    assert gpu.read().energy_j == pytest.approx(14.5)


def test_xe_prefers_the_card_counter_over_the_package(tmp_path: Path) -> None:
    hw = {
        "name": "xe",
        "energy1_input": "1000",
        "energy1_label": "pkg",
        "energy2_input": "9000",
        "energy2_label": "card",
    }
    cls = drm_tree(tmp_path, {"0000:04:00.0": hw})
    (gpu,) = intel.discover(cls)
    assert gpu.path.name == "energy2_input"


def _intel_probe(tmp_path: Path, drm: Path) -> detect.Probe:
    """What ``h3d doctor`` says of the Intel GPUs under ``drm`` (no other device there)."""
    none = tmp_path / "none"
    probes = detect.probe_all(powercap_root=none, drm_root=drm, hwmon_root=none, nvml_period=False)
    (p,) = [p for p in probes if p.family == "intel"]
    return p


def test_xe_on_dg2_and_pvc_reads_the_pkg_counter(tmp_path: Path) -> None:
    # xe_hwmon.c: DG2 and PVC have an energy register for CHANNEL_PKG only, so energy1
    # (card) is hidden and the one counter is energy2_input, labelled "pkg"
    hw = {"name": "xe", "energy2_input": "123456789", "energy2_label": "pkg", "power2_label": "pkg"}
    cls = drm_tree(tmp_path, {"0000:03:00.0": hw})
    (gpu,) = intel.discover(cls)
    assert gpu.info.name == "intel:0000:03:00.0" and gpu.path.name == "energy2_input"
    assert "'pkg'" in gpu.info.note and "not the whole board" in gpu.info.note
    hwmon_file(cls, "card0", "energy2_input").write_text("126456789\n")
    assert gpu.read().energy_j == pytest.approx(3.0)
    p = _intel_probe(tmp_path, cls)
    assert p.ok and "intel:0000:03:00.0 (intel_hwmon; " in p.reason


def test_a_gpu_without_hwmon_energy_says_why(tmp_path: Path) -> None:
    # i915 and xe register hwmon for discrete GPUs only: one without an energy file is a
    # discrete GPU on a kernel that does not expose it, never "an integrated GPU"
    cls = drm_tree(tmp_path, {"0000:03:00.0": {"name": "i915", "power1_max": "0"}})
    with pytest.raises(PowerBackendError, match="i915 hwmon without an energy counter") as exc:
        intel.discover(cls)
    assert "integrated" not in str(exc.value)
    p = _intel_probe(tmp_path, cls)
    assert "integrated" not in p.reason + p.fix and "Level Zero" in p.fix
    # an integrated GPU has no i915/xe hwmon at all: it is inside RAPL's package figure
    cls2 = drm_tree(tmp_path / "b", {"0000:00:02.0": {"name": "coretemp"}})
    with pytest.raises(PowerBackendError, match="no i915/xe .*integrated GPU.*RAPL"):
        intel.discover(cls2)
    with pytest.raises(PowerBackendError, match="does not exist"):
        intel.discover(tmp_path / "nothing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_counter_gives_the_fix(tmp_path: Path) -> None:
    cls = drm_tree(tmp_path, {"0000:03:00.0": {"name": "i915", "energy1_input": "1"}})
    hwmon_file(cls, "card0", "energy1_input").chmod(0o200)
    with pytest.raises(PowerBackendError, match="udev rule"):
        intel.discover(cls)


def ina3221(root: Path, chips: list[dict[int, tuple[str, int, int]]]) -> Path:
    """``/sys/class/hwmon/hwmonN`` links to the I2C device's hwmon, one per chip, with
    ``inK_label``, ``inK_input`` (mV) and ``currK_input`` (mA) per channel."""
    cls = root / "class" / "hwmon"
    cls.mkdir(parents=True)
    (root / "devices" / "virtual" / "thermal").mkdir(parents=True)
    other = root / "devices" / "virtual" / "thermal" / "hwmon0"
    other.mkdir()
    (other / "name").write_text("soc_thermal\n")
    (cls / "hwmon0").symlink_to(os.path.relpath(other, cls))
    for n, chip in enumerate(chips, start=1):
        dev = root / "devices" / "platform" / "bus@0" / "c240000.i2c" / "i2c-1" / f"1-004{n}"
        hw = dev / "hwmon" / f"hwmon{n}"
        hw.mkdir(parents=True)
        (hw / "name").write_text("ina3221\n")
        for k, (label, mv, ma) in chip.items():
            (hw / f"in{k}_label").write_text(label + "\n")
            (hw / f"in{k}_input").write_text(f"{mv}\n")
            (hw / f"curr{k}_input").write_text(f"{ma}\n")
            (hw / f"in{k + 3}_input").write_text("12\n")  # shunt voltage channel, unlabelled
        (cls / f"hwmon{n}").symlink_to(os.path.relpath(hw, cls))
    return cls


ORIN = [{1: ("VDD_IN", 5000, 2400), 2: ("VDD_CPU_GPU_CV", 5000, 800), 3: ("VDD_SOC", 5000, 600)}]


def test_jetson_total_is_the_input_rail(tmp_path: Path) -> None:
    cls = ina3221(tmp_path, ORIN)
    (board,) = jetson.discover(cls)
    assert board.info.name == "jetson:VDD_IN" and board.info.source == "jetson_ina3221"
    assert board.read().power_w == pytest.approx(12.0)  # 5 V x 2.4 A; not 12 + 4 + 3
    assert board.read().energy_j is None


def test_jetson_without_an_input_rail_sums_the_rails_and_says_so(tmp_path: Path) -> None:
    cls = ina3221(tmp_path, [{1: ("VDD_GPU", 5000, 1000), 2: ("VDD_CPU", 5000, 400)}])
    (board,) = jetson.discover(cls)
    assert board.read().power_w == pytest.approx(7.0)
    assert "sum of the monitored rails" in board.info.note
    with pytest.raises(PowerBackendError, match="not a Jetson"):
        jetson.discover(tmp_path / "empty")


def test_jetson_polled_power_integrates_by_trapezoid() -> None:
    # 10 W then a ramp to 14 W over 2 s, as the sampler would store it
    samples = [(0.0, 10.0, None), (1.0, 10.0, None), (3.0, 14.0, None)]
    assert integrate(samples, 0.0, 3.0).energy_j == pytest.approx(10.0 + 24.0)
    assert integrate(samples, 0.0, 3.0).method == "trapezoid"


def test_a_rail_that_disappears_mid_run_marks_the_device_degraded(tmp_path: Path) -> None:
    cls = ina3221(tmp_path, [{1: ("VDD_GPU", 5000, 1000), 2: ("VDD_CPU", 5000, 400)}])
    (board,) = jetson.discover(cls)
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(store.engine)
    sampler = PowerSampler([board], store, interval_s=0.05)
    try:
        sampler.tick()
        assert sampler.devices[0].status == "ok"
        assert sampler.devices[0].last_power_w == pytest.approx(7.0)
        (cls / "hwmon1" / "curr2_input").unlink()  # the VDD_CPU channel goes away
        sampler.tick()
        dev = sampler.devices[0]
        assert dev.status == "degraded" and "VDD_CPU" in (dev.reason or "")
        assert dev.last_power_w == pytest.approx(7.0)  # no smaller sum was recorded
    finally:
        sampler.stop()
        store.close()


def test_probes_list_every_backend_with_a_reason(tmp_path: Path) -> None:
    cls = ina3221(tmp_path / "h", ORIN)
    drm = drm_tree(tmp_path / "d", {"0000:03:00.0": {"name": "i915", "energy1_input": "1"}})
    probes = {
        p.family: p
        for p in detect.probe_all(
            powercap_root=tmp_path / "none", drm_root=drm, hwmon_root=cls, nvml_period=False
        )
    }
    assert probes["intel"].ok and probes["jetson"].ok
    assert "intel:0000:03:00.0 (intel_hwmon)" in probes["intel"].reason
    assert "jetson:VDD_IN (jetson_ina3221)" in probes["jetson"].reason
    assert {"nvml", "amdsmi", "intel", "jetson", "rapl", "apple"} <= set(probes)


# --- Level Zero Sysman through a fake pyzes --------------------------------------------


def test_level_zero_counter_for_gpus_hwmon_does_not_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiles = fz.FakeZeGpu(bus=0x4, domains=[fz.Domain(10, True), fz.Domain(20, True)])
    card = fz.FakeZeGpu(bus=0x3, domains=[fz.Domain(5, True), fz.Domain(1_000_000, False)])
    monkeypatch.setitem(sys.modules, "pyzes", fz.make_module([card, tiles]))
    cls = drm_tree(tmp_path, {"0000:03:00.0": {"name": "i915", "energy1_input": "1"}})
    found = intel.discover_all(cls)
    # the card at 03:00.0 is read once, by hwmon; the one at 04:00.0 by Level Zero (tiles)
    assert [(g.info.name, g.info.source) for g in found] == [
        ("intel:0000:03:00.0", "intel_hwmon"),
        ("intel:0000:04:00.0", "level_zero"),
    ]
    lz = found[1]
    assert "tiles" in lz.info.note and lz.read().energy_j == 0.0
    tiles.domains[0].energy_uj += 1_500_000
    tiles.domains[1].energy_uj += 500_000
    assert lz.read().energy_j == pytest.approx(2.0)
    # without hwmon, the device-level domain of the card is used (not its tile as well)
    (only,) = [g for g in intel.level_zero_discover() if g.info.name.endswith("03:00.0")]
    card.domains[1].energy_uj += 3_000_000
    card.domains[0].energy_uj += 999
    assert only.read().energy_j == pytest.approx(3.0)


def test_level_zero_failures_are_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(
        sys.modules, "pyzes", fz.make_module([], init_rc=fz.ZE_RESULT_ERROR_DEPENDENCY_UNAVAILABLE)
    )
    with pytest.raises(PowerBackendError, match="hwmon: .*; Level Zero: .*driver loaded"):
        intel.discover_all(tmp_path / "none")
    monkeypatch.setitem(sys.modules, "pyzes", None)  # not installed
    with pytest.raises(PowerBackendError, match="pyzes is not importable"):
        intel.level_zero_discover()


def test_the_fake_pyzes_matches_the_real_package() -> None:
    spec = importlib.util.find_spec("pyzes")
    if spec is None or spec.origin is None:
        pytest.skip("pyzes is not installed")
    tree = ast.parse(Path(spec.origin).read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    consts = {
        n.targets[0].id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and isinstance(n.targets[0], ast.Name)
        and isinstance(n.value, ast.Constant)
    }
    fake = fz.make_module([])
    for name in dir(fake):
        obj = getattr(fake, name)
        if name.startswith("zes") and callable(obj) and not isinstance(obj, type):
            real_args = [a.arg for a in funcs[name].args.args]
            assert obj.__code__.co_varnames[: obj.__code__.co_argcount] == tuple(real_args), name
        elif name.startswith("ZE"):
            assert consts[name] == obj, name
        elif isinstance(obj, type) and issubclass(obj, ctypes.Structure):
            (assign,) = [
                n
                for n in classes[name].body
                if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "_fields_"
            ]
            assert isinstance(assign.value, ast.List)
            real_fields = [ast.literal_eval(e.elts[0]) for e in assign.value.elts]  # type: ignore[attr-defined]
            assert [f[0] for f in obj._fields_] == real_fields, name
        elif isinstance(obj, type) and issubclass(obj, ctypes.c_void_p):
            assert name in classes, name
