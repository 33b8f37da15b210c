"""Reports, the audit log, the Green Score and the h3-report command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from h3client import H3Profiler, ThermoAuditLogger, explain_thermo_log
from h3client._report import diminishing_returns
from h3client.report import assess, green_score, read_audit_log
from tests.conftest import REPO, Daemon, daemon_env, free_port


def ep(i: int, eta: float | None, energy: float = 10.0) -> dict:
    return {"epoch": i, "eta_bits_per_j": eta, "energy_j": energy}


def test_diminishing_returns_point() -> None:
    epochs = [ep(0, 1.0), ep(1, 0.5), ep(2, 0.2), ep(3, 0.05), ep(4, 0.08), ep(5, 0.01)]
    dr = diminishing_returns(epochs)
    assert dr is not None and dr["epoch"] == 2  # from epoch 3 on, η < 10 % of the peak
    assert dr["energy_after_j"] == 30.0 and dr["energy_after_frac"] == pytest.approx(0.5)
    # a late rebound above the threshold moves the point
    assert diminishing_returns([*epochs[:-1], ep(5, 0.2)]) is None
    assert diminishing_returns(epochs[:2]) is None


def test_audit_log_round_trip_and_explanation(tmp_path: Path) -> None:
    log = ThermoAuditLogger(
        "h3run", metadata={"data": "digits"}, config={"lr": 0.1}, log_dir=tmp_path
    )
    base = ThermoAuditLogger("baseline", log_dir=tmp_path)
    for i in range(5):
        log.log_epoch(
            i,
            loss=1.0 / (i + 1),
            accuracy=0.90 + 0.01 * i,
            energy_j=6.0,
            phase="thermodynamic",
            keep_frac=0.4,
            uniform_mix=0.3,
            samples=400,
            lr=0.1,
        )
        base.log_epoch(i, loss=1.0 / (i + 1), accuracy=0.90 + 0.011 * i, energy_j=10.0)
    header, rows = read_audit_log(log.get_path())
    assert header["metadata"] == {"data": "digits"} and header["config"] == {"lr": 0.1}
    assert rows[4]["accuracy"] == pytest.approx(0.94) and rows[0]["extra"] == {"lr": 0.1}
    assert assess(rows)[0] == "aggressive"
    text = explain_thermo_log(log.get_path(), base.get_path())
    assert "assessment: aggressive" in text
    assert "Green Score: 1.667" in text  # 50 J against 30 J at comparable accuracy


def test_audit_logs_of_one_name_in_one_second_never_overwrite(tmp_path: Path) -> None:
    """A seed sweep creates its loggers within a second: each keeps its own file (the
    second one truncated the first)."""
    logs = [ThermoAuditLogger("sweep", {"seed": k}, log_dir=tmp_path) for k in range(3)]
    for k, log in enumerate(logs):
        log.log_epoch(0, loss=float(k + 1))
    assert len({log.get_path() for log in logs}) == 3
    for k, log in enumerate(logs):
        header, rows = read_audit_log(log.get_path())
        assert header["metadata"] == {"seed": k} and rows[0]["loss"] == float(k + 1)


def test_green_score_refuses_incomparable_accuracy() -> None:
    score, note = green_score(
        {"energy_j": 5, "final_accuracy": 0.80}, {"energy_j": 10, "final_accuracy": 0.95}
    )
    assert score is None and "not comparable" in note
    score, _ = green_score(
        {"energy_j": 5, "final_accuracy": 95.2}, {"energy_j": 10, "final_accuracy": 95.0}
    )
    assert score == 2.0
    rows = [{"keep_frac": 0.2, "uniform_mix": 0.0, "accuracy": a} for a in (0.9, 0.95, 0.90)]
    assert assess(rows)[0] == "starvation"
    assert assess([{"keep_frac": 1.0, "uniform_mix": 1.0, "accuracy": 0.9}])[0] == "conservative"


def test_h3_report_cli_on_runs(daemon: Daemon) -> None:
    ids = []
    for name, n in (("fast", 200), ("slow", 400)):
        p = H3Profiler(name, url=daemon.url, data_dir=daemon.data_dir)
        for s in range(n):
            p.log_batch(2.0 / (1 + s / 50), epoch=s // 100, phase="warmup" if s < 100 else None)
            if s % 100 == 99:
                p.log_epoch(accuracy=0.9, keep_frac=0.6, uniform_mix=0.3)
        p.stop()
        ids.append(p.run_id)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "h3client.report", *args],
            env=daemon_env(daemon.data_dir),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = run("--run", ids[0], "--baseline", ids[1])
    assert r.returncode == 0, r.stderr
    assert (
        "H3 report" in r.stdout and "Green Score" in r.stdout and "assessment: moderate" in r.stdout
    )
    assert "ΔI" in r.stdout and " bits/sample  η" in r.stdout  # the phase line's unit
    r = run("--compare", *ids)
    assert ids[0] in r.stdout and ids[1] in r.stdout and "ΔI bits/sample" in r.stdout
    r = run("--run", "nope")
    assert r.returncode == 1 and "run_not_found" in r.stderr


def test_h3_report_on_audit_logs_applies_the_tolerance(tmp_path: Path) -> None:
    run = ThermoAuditLogger("run", log_dir=tmp_path)
    base = ThermoAuditLogger("base", log_dir=tmp_path)
    for i in range(3):  # half the energy, 2 points less accuracy
        run.log_epoch(i, accuracy=0.90, energy_j=5.0)
        base.log_epoch(i, accuracy=0.92, energy_j=10.0)

    def report(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "h3client.report", *args],
            env=daemon_env(tmp_path / "no-daemon"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    logs = ("--h3-log", str(run.get_path()), "--baseline-log", str(base.get_path()))
    r = report(*logs, "--tolerance", "5")
    assert r.returncode == 0, r.stderr
    assert "Green Score: 2 (accuracy within -2.00 points of the baseline)" in r.stdout, r.stdout
    r = report(*logs)  # the default, 1 point
    assert r.returncode == 0, r.stderr
    assert "Green Score: - (accuracies differ by -2.00 points (> 1.0)" in r.stdout, r.stdout
    r = report(*logs, "--tolerance", "0.5")
    assert "(> 0.5): not comparable" in r.stdout, r.stdout
    text = explain_thermo_log(run.get_path(), base.get_path(), tolerance=5.0)
    assert "Green Score: 2 " in text
    r = report("--h3-log", str(tmp_path / "missing.csv"))  # one line, no traceback
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("h3-report: ") and "missing.csv" in r.stderr


def test_h3_report_run_shows_carbon_and_why_it_is_unknown(tmp_path: Path) -> None:
    """`h3d show` printed a run's grams of CO2e; `h3-report --run` printed energy, loss and
    η but no carbon line at all (the figure was only in its --json)."""

    def report(d: Daemon, run_id: str) -> tuple[str, dict]:
        r = subprocess.run(
            [sys.executable, "-m", "h3client.report", "--run", run_id],
            env=daemon_env(d.data_dir),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        with d.client() as c:
            return r.stdout, c.get(f"/v1/runs/{run_id}/report").json()

    daemons = {
        "constant": {"H3D_CARBON_INTENSITY_G_PER_KWH": "300"},
        # configured, but a token no provider accepts (nothing listens there): unavailable
        "failing": {
            "H3D_ELECTRICITYMAPS_TOKEN": "tok",
            "H3D_CARBON_ZONE": "DE",
            "H3D_CARBON_LIVE_URL": f"http://127.0.0.1:{free_port()}",
        },
    }
    out: dict[str, tuple[str, dict]] = {}
    for name, extra in daemons.items():
        d = Daemon(
            tmp_path / name,
            daemon_env(
                tmp_path / name,
                H3D_POWER_BACKENDS="constant:50",
                H3D_SAMPLE_INTERVAL_S="0.02",
                H3D_FLUSH_INTERVAL_S="0.2",
                H3D_LOG_LEVEL="WARNING",
                **extra,
            ),
        ).start()
        try:
            p = H3Profiler(name, url=d.url, data_dir=d.data_dir)
            for s in range(50):
                p.log_batch(2.0 / (1 + s / 10))
            time.sleep(0.3)
            results = p.stop()
            assert p.run_id is not None
            out[name] = report(d, p.run_id)
            # the profiler's results carry the daemon's reason too
            assert results["carbon_detail"] == out[name][1]["energy"]["carbon_detail"] is not None
        finally:
            d.stop()
    text, rep = out["constant"]
    assert rep["carbon_source"] == "constant" and rep["co2e_g"] > 0
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("carbon"))
    assert f"{rep['co2e_g']:.4g} g CO2e" in line and "constant" in line
    text, rep = out["failing"]
    assert rep["co2e_g"] is None
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("carbon"))
    assert "unknown" in line and "unavailable" in line and "ConnectError" in line, line
