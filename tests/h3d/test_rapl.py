"""RAPL through a fake powercap tree laid out like the kernel's (Intel, AMD, client psys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from h3d.power import detect, rapl
from h3d.power.base import PowerBackendError


def zone(path: Path, name: str, energy_uj: int = 0, max_uj: int = 262_143_328_850) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "enabled").write_text("1\n")
    return path


def set_uj(path: Path, value: int) -> None:
    (path / "energy_uj").write_text(f"{value}\n")


def test_client_intel_psys_is_not_added_to_the_package(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    pkg = zone(root / "intel-rapl:0", "package-0")
    zone(pkg / "intel-rapl:0:0", "core")
    zone(pkg / "intel-rapl:0:1", "uncore")
    zone(root / "intel-rapl:1", "psys")  # the whole platform: includes package-0
    zone(root / "intel-rapl-mmio:0", "package-0")  # the MMIO view of the same package
    names = [z.info.name for z in rapl.discover(root)]
    assert names == ["rapl:package-0"]


def test_amd_tree_has_package_and_core_and_no_dram(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    for p in range(2):
        pkg = zone(root / f"intel-rapl:{p}", f"package-{p}", max_uj=65_532_610_987)
        zone(pkg / f"intel-rapl:{p}:0", "core", max_uj=65_532_610_987)
    zones = rapl.discover(root)
    assert [z.info.name for z in zones] == ["rapl:package-0", "rapl:package-1"]
    assert {z.info.kind for z in zones} == {"cpu"} and {z.info.source for z in zones} == {"rapl"}


def test_each_zone_wraps_on_its_own_range(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    pkg = zone(root / "intel-rapl:0", "package-0", energy_uj=990_000, max_uj=1_000_000)
    dram = zone(pkg / "intel-rapl:0:0", "dram", energy_uj=10, max_uj=500_000)
    zp, zd = rapl.discover(root)
    assert (zp.info.name, zd.info.name, zd.info.kind) == (
        "rapl:package-0",
        "rapl:package-0-dram",
        "dram",
    )
    steps = [(5_000, 20), (200_000, 499_990), (995_000, 100), (1_000, 200_000)]
    for pkg_uj, dram_uj in steps:
        set_uj(pkg, pkg_uj)
        set_uj(dram, dram_uj)
        pj, dj = zp.read().energy_j, zd.read().energy_j
    # package: +15 000 (wrap) +195 000 +795 000 +6 000 (wrap) µJ
    assert pj == pytest.approx((15_000 + 195_000 + 795_000 + 6_000) / 1e6)
    # dram: +10 +499 970 +110 (wrap) +199 900 µJ
    assert dj == pytest.approx((10 + 499_970 + 110 + 199_900) / 1e6)


def test_a_counter_that_restarts_near_zero_is_a_reset_not_a_wrap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # S3 suspend/resume or a reload of intel_rapl_msr: the counter starts again from ~0,
    # which is not 252 kJ of wrap-around (nor ever a full range of phantom energy)
    root = tmp_path / "powercap"
    pkg = zone(root / "intel-rapl:0", "package-0", energy_uj=10_000_000_000)
    (z,) = rapl.discover(root)
    set_uj(pkg, 10_005_000_000)
    assert z.read().energy_j == pytest.approx(5.0)
    set_uj(pkg, 2_000_000)
    assert z.read().energy_j == pytest.approx(5.0)
    assert "rapl:package-0: energy counter reset" in caplog.text
    set_uj(pkg, 5_000_000)  # counted again from the new base
    assert z.read().energy_j == pytest.approx(8.0)
    # a real wrap at the top of Intel's range is still one wrap
    set_uj(pkg, 262_143_328_850 - 1_000_000)
    e = z.read().energy_j or 0.0
    set_uj(pkg, 500_000)
    assert z.read().energy_j == pytest.approx(e + 1.5)


def test_update_period_is_measured_not_assumed(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    zone(root / "intel-rapl:0", "package-0")
    (z,) = rapl.discover(root)
    assert z.info.granularity_s is None  # a file that never changes: unknown, not "1 ms"


def test_unreadable_dram_keeps_the_package_and_logs_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "powercap"
    pkg = zone(root / "intel-rapl:0", "package-0")
    zone(pkg / "intel-rapl:0:0", "dram")
    real = Path.read_text

    def deny(self: Path, *a: object, **k: object) -> str:
        if self.name == "energy_uj" and self.parent.name == "intel-rapl:0:0":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", deny)
    assert [z.info.name for z in rapl.discover(root)] == ["rapl:package-0"]
    assert "chmod a+r" in caplog.text and "udev" in caplog.text


def test_probe_says_why_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "powercap"
    root.mkdir()
    probes = {p.family: p for p in detect.probe_all(powercap_root=root, nvml_period=False)}
    assert not probes["rapl"].ok and "no intel-rapl" in probes["rapl"].reason
    assert "intel_rapl_msr" in probes["rapl"].fix
    zone(root / "intel-rapl:0", "package-0")
    real = Path.read_text

    def deny(self: Path, *a: object, **k: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", deny)
    probes = {p.family: p for p in detect.probe_all(powercap_root=root, nvml_period=False)}
    assert not probes["rapl"].ok and "CVE-2020-8694" in probes["rapl"].reason


def test_a_zone_that_becomes_unreadable_mid_run_raises_the_backend_error(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    pkg = zone(root / "intel-rapl:0", "package-0")
    (z,) = rapl.discover(root)
    (pkg / "energy_uj").unlink()  # the module was unloaded
    with pytest.raises(PowerBackendError, match="unreadable"):
        z.read()
