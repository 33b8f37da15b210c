"""`h3d setup-rapl` prints, and with --apply installs, group read access to RAPL."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from h3d import cli
from h3d.power import setup_rapl


def test_prints_rule_tmpfiles_and_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["setup-rapl", "--group", "rapl", "--user", "alice"]) == 0
    out = capsys.readouterr().out
    assert 'SUBSYSTEM=="powercap", ACTION=="add"' in out
    assert 'RUN+="/bin/chgrp rapl /sys%p/energy_uj /sys%p/max_energy_range_uj"' in out
    assert 'RUN+="/bin/chmod g+r /sys%p/energy_uj /sys%p/max_energy_range_uj"' in out
    assert "z /sys/class/powercap/intel-rapl:*:*/energy_uj 0440 root rapl -" in out
    assert "User=alice\nSupplementaryGroups=rapl\n" in out and " serve\n" in out


def test_apply_installs_under_a_root_and_opens_the_counters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    sub = tmp_path / "sys/class/powercap/intel-rapl:0:0"
    for z in (zone, sub):
        z.mkdir(parents=True)
        for f in setup_rapl.FILES:
            (z / f).write_text("1\n")
            (z / f).chmod(0o400)
    args = ["setup-rapl", "--apply", "--group", group, "--user", "u", "--root", str(tmp_path)]
    assert cli.main(args) == 0
    for rel in (setup_rapl.UDEV_RULE, setup_rapl.TMPFILES, setup_rapl.UNIT):
        assert (tmp_path / rel).read_text()
    for z in (zone, sub):
        st = (z / "energy_uj").stat()
        assert st.st_mode & 0o777 == 0o440 and st.st_gid == os.getgid()
    assert "next: `systemctl daemon-reload" in capsys.readouterr().out


def test_apply_with_an_unknown_group_under_a_test_root_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["setup-rapl", "--apply", "--group", "no-such-group-h3", "--root", str(tmp_path)]
    assert cli.main(args) == 1
    assert "no-such-group-h3" in capsys.readouterr().err


def test_doctor_lists_every_backend_and_carbon(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("H3D_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("H3D_CARBON_INTENSITY_G_PER_KWH", raising=False)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for family in ("nvml", "amdsmi", "intel", "jetson", "rapl", "apple", "estimated", "carbon"):
        assert any(line.startswith(family) for line in out.splitlines()), family
    assert "co2e_g is null" in out
    monkeypatch.setenv("H3D_CARBON_REGION", "de")
    assert cli.main(["doctor"]) == 0
    assert "region_average: Germany (DE) 2023" in capsys.readouterr().out
