"""Reports, the audit log, the Green Score and the h3-report command."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from h3client import H3Profiler, ThermoAuditLogger, explain_thermo_log
from h3client._report import diminishing_returns, format_report, stopping_point_unknown
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


def _audit_log(tmp_path: Path, name: str = "run") -> Path:
    log = ThermoAuditLogger(name, log_dir=tmp_path)
    for i in range(3):
        log.log_epoch(i, loss=1.0 / (i + 1), accuracy=0.9, energy_j=5.0)
    return log.get_path()


def test_h3_report_refuses_a_file_that_is_not_an_audit_log_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`h3-report --h3-log` on an `h3d export` CSV, a log with a bad cell or bytes that are
    not text ended in a traceback (KeyError 'energy_j', ValueError, UnicodeDecodeError); an
    empty file printed a whole "report" (exit 0), and `--compare` a row of dashes for it."""
    from h3client.report import main

    good = _audit_log(tmp_path)
    bad_cell = tmp_path / "bad_cell.csv"  # a real log, one accuracy cell edited by hand
    bad_cell.write_text(good.read_text().replace("0.9,5.0", "abc,5.0", 1))
    cases = {
        "export.csv": ("seq,t,epoch,step,phase,loss,n\n0,1.7e9,0,0,,2.0,32\n", "no val_loss"),
        "bytes.csv": (b"\x00\xab\xff\xfe" * 20, "not utf-8 text"),
        "empty.csv": ("", "it has no header row"),
        "bad_cell.csv": (None, "row 1: accuracy 'abc' is not a number"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        for argv in (["--h3-log", str(path)], ["--compare", str(path), str(good)]):
            assert main(argv) == 1, argv
            out, err = capsys.readouterr()
            (line,) = err.splitlines()  # one line, no traceback
            assert line.startswith(f"h3-report: {path}") and why in line, line
            assert out == "", out
        with pytest.raises(ValueError, match="not an H3 audit log|is not a number"):
            read_audit_log(path)
    assert main(["--compare", str(good), str(good)]) == 0  # a real log is still read
    assert "baseline" in capsys.readouterr().out


def test_h3_report_tolerance_is_a_finite_number_of_points(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--tolerance nan` gave a run 10 points worse a Green Score (NaN compares as within);
    a negative tolerance made every pair incomparable."""
    from h3client.report import main

    log = _audit_log(tmp_path)
    for bad in ("nan", "inf", "-5", "abc"):
        with pytest.raises(SystemExit) as exc:
            main(["--h3-log", str(log), "--tolerance", bad])
        assert exc.value.code == 2
        assert f"argument --tolerance: '{bad}' is not a" in capsys.readouterr().err
    assert main(["--h3-log", str(log), "--baseline-log", str(log), "--tolerance", "0"]) == 0
    assert "Green Score: 1 (accuracy within +0.00 points" in capsys.readouterr().out
    worse, base = {"energy_j": 5, "final_accuracy": 0.80}, {"energy_j": 10, "final_accuracy": 0.90}
    score, note = green_score(worse, base, float("nan"))  # the Python API takes any float
    assert score is None and "not comparable" in note


def test_report_calls_unknown_energy_unknown_and_claims_nothing_about_eta(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """With no readable device h3-report said "ESTIMATED: a model, not a measurement" and
    "η stayed above 10% of its peak" for a run whose η is unknown in every epoch."""
    d = daemon_factory("none", H3D_POWER_BACKENDS="none")
    with d.client() as api:
        run = api.post("/v1/runs", json={"name": "dark", "n_train": 10}).json()
        t = time.time()
        batches = [
            {"seq": i, "t": t + i * 0.01, "loss": 2 - i * 0.01, "epoch": i // 10} for i in range(40)
        ]
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        epochs = [{"epoch": k, "t": t + 0.1 * (k + 1), "accuracy": 0.5} for k in range(4)]
        api.post(f"/v1/runs/{run['id']}/epochs", json={"epochs": epochs}).raise_for_status()
        rep = api.get(f"/v1/runs/{run['id']}/report").json()
    assert len(rep["epochs"]) == 4 and all(e["eta_bits_per_j"] is None for e in rep["epochs"])
    text = format_report(rep)
    assert "provenance          none  (unknown: no device was readable)" in text, text
    assert "ESTIMATED" not in text and "stayed above" not in text, text
    assert "point of diminishing returns unknown (η is unknown for every epoch)" in text, text


def test_too_few_epochs_tell_no_point_of_diminishing_returns() -> None:
    assert stopping_point_unknown([ep(0, 1.0), ep(1, 0.5)]) == "2 epochs, too few to tell"
    assert stopping_point_unknown([ep(0, -1.0), ep(1, None), ep(2, 0.0)]) == (
        "no epoch's η was positive"
    )
    assert stopping_point_unknown([ep(0, 1.0), ep(1, 0.5), ep(2, 0.4)]) is None  # not yet


def test_h3_report_prints_names_and_phases_with_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run name or phase holding terminal escapes was printed raw: `\\x1b[2J` cleared the
    screen of whoever read the report."""
    from h3client.report import main

    log = ThermoAuditLogger("evil\x1b[2J", log_dir=tmp_path)
    for i in range(3):
        log.log_epoch(i, accuracy=0.9, energy_j=5.0, phase="p\x1b]0;t\x07\nx")
    text = explain_thermo_log(log.get_path())
    assert "(evil\\x1b[2J)" in text and "phase p\\x1b]0;t\\x07\\nx " in text, text
    assert main(["--compare", str(log.get_path())]) == 0
    out = capsys.readouterr().out
    assert "evil\\x1b[2J" in out
    assert not any(c in text + out for c in "\x1b\x07"), text + out


def test_tune_session_view_prints_names_and_techniques_with_control_characters_escaped() -> None:
    from h3client._tune_report import format_tune_session

    row = {
        "run_id": "a" * 32,
        "name": "x\x1b[2Jy",
        "status": "finished",
        "eta_bits_per_j": 1.0,
        "energy_j": 2.0,
        "duration_s": 3.0,
        "final_accuracy": 0.9,
    }
    text = format_tune_session(
        {"session": "s\n", "groups": [{"technique": "t\x1b[31m", "runs": [row]}]}
    )
    assert "\x1b" not in text and "\\x1b[2J" in text and "\\x1b[31m" in text
    assert text.count("\n") == 3  # the session's newline did not add a line


def test_compare_gives_an_audit_logs_eta_as_bits_over_joules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--compare` showed a log's η as the plain mean of its epochs' η, beside runs' ΔI/E:
    1 bit over 1000 J and 1 bit over 10 J read 0.0505 bits/J, not 2 bits / 1010 J."""
    from h3client.report import main

    log = ThermoAuditLogger("cmp", log_dir=tmp_path)
    log.log_epoch(0, energy_j=1000.0, eta_bits_per_j=0.001, accuracy=0.5)
    log.log_epoch(1, energy_j=10.0, eta_bits_per_j=0.1, accuracy=0.6)
    log.log_epoch(2, accuracy=0.6)  # neither figure: no part in η
    blind = ThermoAuditLogger("blind", log_dir=tmp_path)
    blind.log_epoch(0, eta_bits_per_j=0.1, accuracy=0.5)  # η without energy: unknown
    assert main(["--compare", str(log.get_path()), str(blind.get_path())]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    at = header.index("η bits/J")
    cells = [line[at : at + len("η bits/J")].strip() for line in lines[1:]]
    assert cells == [f"{2 / 1010:.4g}", "-"], lines


def test_an_epoch_without_eta_neither_withdraws_nor_makes_a_stop() -> None:
    """The dashboard's rule: a last epoch with no η (no batches, no energy read in it) kept
    the report from suggesting the stop the known η's made (it counted as η at the peak)."""
    eta = [10.0, 0.5, 0.4, None]
    epochs = [{"epoch": i, "eta_bits_per_j": v, "energy_j": 5.0} for i, v in enumerate(eta)]
    dr = diminishing_returns(epochs)
    assert dr is not None and dr["epoch"] == 0 and dr["energy_after_j"] == 15.0
    eta = [10.0, 9.0, None, 8.0]  # never fell: a missing η makes no stop either
    epochs = [{"epoch": i, "eta_bits_per_j": v, "energy_j": 5.0} for i, v in enumerate(eta)]
    assert diminishing_returns(epochs) is None
