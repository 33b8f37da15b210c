"""Figures that must never look like bugs: unknown baselines, short runs, negative η."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from h3d.analysis import _active_or_unknown
from tests.conftest import REPO, Daemon


def test_active_energy_is_unknown_without_a_trustworthy_baseline() -> None:
    active, note = _active_or_unknown(None, None, 100.0, 10.0)
    assert active is None and note is not None and note.startswith("no idle baseline yet")
    active, note = _active_or_unknown(None, None, 100.0, 10.0, ended=True)  # a run that ended
    assert active is None and note is not None and note.startswith("no idle baseline when the run")
    # the "idle" baseline was the whole draw: the machine was busy when it was measured
    active, note = _active_or_unknown(2e-15, 10.0, 100.0, 10.0)
    assert active is None and note is not None and "busy" in note
    # `h3d show` and the client's report print a note in parentheses: none nested inside
    for args in ((None, None, 100.0, 10.0), (2e-15, 10.0, 100.0, 10.0)):
        for ended in (False, True):
            note = _active_or_unknown(*args, ended=ended)[1]
            assert note is not None and "(" not in note and ")" not in note, note
    assert _active_or_unknown(40.0, 6.0, 100.0, 10.0) == (40.0, None)


def test_a_run_right_after_the_daemon_starts_has_no_idle_baseline_yet(daemon: Daemon) -> None:
    # as in `make demo`: the daemon starts and a run opens seconds later, while the script
    # was importing torch; a baseline from those seconds would be a busy machine's
    time.sleep(0.8)  # 40 samples without a run: far from the default 30 s
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "early"}).json()
        now = time.time()
        batches = [{"seq": s, "t": now + 0.002 * s, "loss": 2.0 - 0.01 * s} for s in range(50)]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        time.sleep(0.3)
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        e = api.get(f"/v1/runs/{run['id']}/report").json()["energy"]
    assert e["active_energy_j"] is None and e["energy_j"] > 0
    assert e["active_energy_note"].startswith("no idle baseline when the run ended")


def test_a_restarted_daemon_measures_its_own_idle_baseline(daemon_factory: Any) -> None:
    """Each daemon session measures its own baseline; a finished run keeps the one known
    when it ended, so its energy above idle reads the same in every later session."""
    daemon = daemon_factory(H3D_IDLE_MIN_S="0.4")

    def finished_run() -> str:
        with daemon.client() as api:
            run = api.post("/v1/runs", json={"name": "r"}).json()
            now = time.time()
            batches = [{"seq": s, "t": now + 0.002 * s, "loss": 1.0} for s in range(20)]
            api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches})
            time.sleep(0.3)
            api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
            return str(run["id"])

    def energy(run_id: str) -> dict[str, Any]:
        with daemon.client() as api:
            e: dict[str, Any] = api.get(f"/v1/runs/{run_id}/report").json()["energy"]
            return e

    time.sleep(0.8)  # measured: 50 W
    first = finished_run()
    before = energy(first)
    assert before["by_device"][0]["idle_power_w"] == 50.0
    daemon.env["H3D_IDLE_MIN_S"] = "30"
    daemon.restart()  # a baseline of the earlier session is not this machine as it is now
    second = finished_run()
    e = energy(second)
    assert e["by_device"][0]["idle_power_w"] is None
    assert e["active_energy_note"].startswith("no idle baseline when the run ended")
    kept = energy(first)  # the baseline it ended with, not this session's (none yet)
    assert kept["by_device"][0]["idle_power_w"] == 50.0
    assert kept["active_energy_note"] == before["active_energy_note"]
    daemon.env["H3D_IDLE_MIN_S"] = "0.4"
    daemon.restart()
    time.sleep(0.8)  # a baseline again, after the second run ended without one
    assert energy(second)["active_energy_j"] is None
    assert energy(first)["by_device"][0]["idle_power_w"] == 50.0
    with daemon.client() as api:  # a run still going reads the baseline of now
        run = api.post("/v1/runs", json={"name": "going"}).json()
        now = time.time()
        api.post(
            f"/v1/runs/{run['id']}/batches",
            json={"batches": [{"seq": s, "t": now + 0.002 * s, "loss": 1.0} for s in range(20)]},
        ).raise_for_status()
    assert energy(run["id"])["by_device"][0]["idle_power_w"] == 50.0


def test_report_of_a_short_run_says_what_its_figures_cover(daemon_factory: Any) -> None:
    daemon = daemon_factory(H3D_IDLE_MIN_S="0.4")
    time.sleep(0.8)  # constant 50 W with no run active: the idle baseline becomes 50 W
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "short"}).json()
        now = time.time()
        # epoch 0 learns, epoch 1 gets worse: its η is negative
        losses = [2.3 - 0.01 * s for s in range(100)] + [1.3 + 0.01 * s for s in range(100)]
        batches = [
            {"seq": s, "t": now + s * 0.005, "loss": v, "n": 64, "epoch": s // 100}
            for s, v in enumerate(losses)
        ]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        time.sleep(1.0)
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        rep = api.get(f"/v1/runs/{run['id']}/report").json()
    e, eta = rep["energy"], rep["eta"]
    assert e["energy_j"] > 0
    assert e["active_energy_j"] is None and "idle baseline" in e["active_energy_note"]
    assert eta["window_is_whole_run"] is True  # a ~1 s run against the 60 s window
    assert eta["loss_start"] == 2.3  # the first batch: the loss at the initial parameters
    assert rep["epochs"][1]["eta_bits_per_j"] < 0
    show = subprocess.run(
        [sys.executable, "-m", "h3d", "show", run["id"]],
        env=daemon.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    out = show.stdout
    assert "above idle   unknown (the device drew no more than its idle baseline" in out
    assert "whole run, shorter than the 60 s window" in out
    assert "negative eta: the smoothed training loss rose" in out
    assert "e-15" not in out


def test_marginal_eta_of_a_short_run_is_the_whole_runs_eta(daemon: Daemon) -> None:
    """A run that trains, then evaluates before it ends: its window ended at the last batch,
    so the "whole run" marginal η left the evaluation's energy out (0.148 against the run's
    η of 0.0835 bits/J). A finished run's window ends where its energy does."""
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "eval-tail"}).json()
        now = time.time()
        batches = [{"seq": s, "t": now + 0.003 * s, "loss": 2.3 - 0.01 * s} for s in range(100)]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        time.sleep(1.2)  # the evaluation pass: energy spent, no batch logged
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        eta = api.get(f"/v1/runs/{run['id']}/eta").json()
        tail = api.get(f"/v1/runs/{run['id']}/eta", params={"window": 0.5}).json()
        energy = api.get(f"/v1/runs/{run['id']}/energy").json()
    assert eta["window_is_whole_run"] is True and eta["eta_bits_per_j"] > 0
    assert eta["window_energy_j"] == pytest.approx(eta["energy_j"])
    assert eta["marginal_eta_bits_per_j"] == pytest.approx(eta["eta_bits_per_j"])
    # a window shorter than the run: its last 0.5 s, the evaluation, which learnt nothing
    assert tail["window_is_whole_run"] is False
    share = 0.5 / energy["duration_s"]
    assert tail["window_energy_j"] == pytest.approx(share * energy["energy_j"], rel=0.15)
    assert tail["marginal_eta_bits_per_j"] == pytest.approx(0.0, abs=1e-9)


def test_energy_series_ends_at_the_last_batch(daemon: Daemon) -> None:
    """The grid took every len/500-th batch from the k-th and could stop short of the last:
    the loss-against-energy curve's last batches then all stood on its last point."""
    with daemon.client() as api:
        run = api.post("/v1/runs", json={"name": "grid"}).json()
        now = time.time()
        batches = [{"seq": s, "t": now + 0.0005 * s, "loss": 2.0 - 1e-3 * s} for s in range(1234)]
        for i in range(0, len(batches), 500):
            got = api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches[i : i + 500]})
            got.raise_for_status()
        time.sleep(0.8)
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        for metric in ("energy", "eta"):
            got = api.get(
                f"/v1/runs/{run['id']}/series", params={"metric": metric, "points": 500}
            ).json()["points"]
            assert len(got) > 100 and got[-1][0] == batches[-1]["t"], metric
