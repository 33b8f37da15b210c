"""Per-run attribution with real processes: CPU-burning children in two runs."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from h3d.attribution import CpuShareTracker

BURN = """
import sys, time
duty = float(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.monotonic()
    while time.monotonic() - t < 0.02 * duty:
        pass
    time.sleep(0.02 * (1 - duty))
"""


def burner(duty: float, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BURN, str(duty), str(seconds)])


def test_tracker_follows_children_and_shares_stay_below_one() -> None:
    # the tracked process is a shell whose child does the burning
    parent = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            f"exec \"{sys.executable}\" -c \"import subprocess,sys; subprocess.run([sys.executable, '-c', {BURN!r}, '0.9', '1.5'])\"",
        ]
    )
    tr = CpuShareTracker()
    assert tr.track("r", parent.pid)
    assert not tr.track("gone", 2**22 + 12345)
    tr.sample()
    shares = []
    for _ in range(6):
        time.sleep(0.2)
        shares.append(tr.sample().get("r", 0.0))
    parent.wait()
    assert max(shares) > 0.2  # the grandchild's CPU time is counted
    assert all(0.0 <= s <= 1.0 for s in shares)


def test_busier_run_gets_about_twice_the_active_energy(daemon_factory: Any) -> None:
    d = daemon_factory(
        H3D_POWER_BACKENDS="estimated",
        H3D_CPU_TDP_W="100",
        H3D_SAMPLE_INTERVAL_S="0.05",
        H3D_FLUSH_INTERVAL_S="0.2",
    )
    time.sleep(2.0)  # no run active: the idle baseline is measured
    busy, light = burner(0.6, 4.0), burner(0.3, 4.0)
    with d.client() as api:
        runs = {}
        for name, proc in (("busy", busy), ("light", light)):
            runs[name] = api.post("/v1/runs", json={"name": name, "pid": proc.pid}).json()["id"]
        busy.wait()
        light.wait()
        for rid in runs.values():
            api.patch(f"/v1/runs/{rid}", json={"status": "finished"})
        time.sleep(0.4)
        e = {name: api.get(f"/v1/runs/{rid}/energy").json() for name, rid in runs.items()}
        devices = api.get("/v1/devices").json()
    assert devices["devices"][0]["name"] == "estimated:cpu"
    for name in e:
        dev = e[name]["by_device"][0]
        assert dev["attribution"] == "process"
        assert dev["energy_j"] <= dev["device_energy_j"] + 1e-9
        assert e[name]["active_energy_j"] is not None
        assert e[name]["active_energy_j"] <= e[name]["energy_j"]
    # together the two runs never get more than the device drew over their windows
    assert e["busy"]["energy_j"] + e["light"]["energy_j"] <= 1.02 * max(
        e["busy"]["device_energy_j"], e["light"]["device_energy_j"]
    )
    ratio = e["busy"]["active_energy_j"] / e["light"]["active_energy_j"]
    assert ratio == pytest.approx(2.0, rel=0.4), e
