"""``h3-report`` as a command: pipes, codecs, run references, tokens, and flags that cannot
go together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from h3client import H3Profiler, ThermoAuditLogger
from h3client._report import format_report
from h3client.report import green_score, main
from tests.conftest import REPO, Daemon, daemon_env


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon holding the runs ``alpha``, ``beta`` and ``x.csv``, shared read-only."""
    data = tmp_path_factory.mktemp("report-cli")
    env = daemon_env(
        data,
        H3D_POWER_BACKENDS="constant:50",
        H3D_SAMPLE_INTERVAL_S="0.02",
        H3D_FLUSH_INTERVAL_S="0.2",
        H3D_LOG_LEVEL="WARNING",
    )
    d = Daemon(data, env).start()
    try:
        for name, acc in (("alpha", 0.90), ("beta", 0.905), ("x.csv", 0.9)):
            p = H3Profiler(name, url=d.url, data_dir=d.data_dir)
            for s in range(60):
                p.log_batch(2.0 / (1 + s / 10), epoch=s // 20)
                if s % 20 == 19:
                    p.log_epoch(accuracy=acc)
            time.sleep(0.2)  # a few power readings inside the run's window
            p.stop()
        yield d
    finally:
        d.stop()


def h3_report(
    d: Daemon | None, *args: str, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess[str]:
    data_dir = d.data_dir if d is not None else cwd / "no-daemon"
    return subprocess.run(
        [sys.executable, "-m", "h3client.report", *args],
        env=daemon_env(data_dir, **env),
        cwd=cwd,
        capture_output=True,
        encoding=env.get("PYTHONIOENCODING", "utf-8"),
        timeout=60,
    )


def _audit_log(directory: Path, name: str) -> Path:
    log = ThermoAuditLogger(name, log_dir=directory)
    for i in range(3):
        log.log_epoch(i, loss=1.0 / (i + 1), accuracy=0.9, energy_j=5.0, eta_bits_per_j=0.1)
    return log.get_path()


# --- bug 4: a reader that leaves -------------------------------------------------------


def _into_a_closed_pipe(args: list[str], cwd: Path, **env: str) -> tuple[int, str]:
    """Run h3-report with stdout a pipe nobody reads any more (`h3-report ... | true`):
    the read end is closed before the command starts, so its first write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "h3client.report", *args],
            env=daemon_env(cwd / "no-daemon", **env),
            cwd=cwd,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    return r.returncode, r.stderr


def test_h3_report_piped_into_a_reader_that_left_stops_quietly(tmp_path: Path) -> None:
    """`h3-report --run beta | true` printed "h3-report: [Errno 32] Broken pipe" (its OSError
    handler caught the BrokenPipeError meant for main()'s quiet exit); a report small enough
    to sit in the buffer failed at exit instead ("Exception ignored ... BrokenPipeError")."""
    logs = [str(_audit_log(tmp_path, n)) for n in ("a", "b")]
    for args in (["--compare", *logs], ["--h3-log", logs[0]]):
        for buffering in ({"PYTHONUNBUFFERED": "1"}, {}):  # each print writes / one write at exit
            code, err = _into_a_closed_pipe(args, tmp_path, **buffering)
            assert (code, err) == (1, ""), (args, buffering, code, err)


# --- bug 16: a stdout that cannot hold η ---------------------------------------------


def test_h3_report_on_a_stdout_that_is_not_utf8_prints_no_traceback(
    daemon: Daemon, tmp_path: Path
) -> None:
    """With a cp1252 stdout (a redirect on Windows) the η and ΔI of the table headers ended
    in a UnicodeEncodeError traceback."""
    logs = [str(_audit_log(tmp_path, n)) for n in ("a", "b")]
    r = h3_report(None, "--compare", *logs, cwd=tmp_path, PYTHONIOENCODING="cp1252")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "?I bits/sample" in r.stdout and "? bits/J" in r.stdout, r.stdout
    r = h3_report(daemon, "--run", "alpha", PYTHONIOENCODING="cp1252")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "H3 report — run" in r.stdout and "? bits/J" in r.stdout, r.stdout
    assert "assessment: conservative" in r.stdout, r.stdout


# --- bug 5: --compare resolves a RUN as every command does -------------------------------


def test_compare_resolves_a_run_even_beside_a_file_of_its_name(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A notes file `beta` in the current directory made `--compare alpha beta` read it as
    an audit log ("beta is not an H3 audit log"), and a run named `x.csv` could never be
    compared by name ("no audit log at x.csv")."""
    (tmp_path / "beta").write_text("notes\n")
    r = h3_report(daemon, "--compare", "alpha", "beta", "x.csv", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["name"] for row in json.loads(r.stdout)["runs"]] == ["alpha", "beta", "x.csv"]
    # a path names a file, whatever runs there are
    r = h3_report(daemon, "--compare", "alpha", "./beta", cwd=tmp_path)
    assert r.returncode == 1 and "./beta is not an H3 audit log" in r.stderr, r.stderr
    # an existing .csv file is an audit log; a missing one that is no run says both
    log = _audit_log(tmp_path, "log")
    r = h3_report(daemon, "--compare", log.name, "alpha", cwd=tmp_path)
    assert r.returncode == 0 and log.name in r.stdout, r.stderr
    r = h3_report(daemon, "--compare", "nope.csv", "alpha", cwd=tmp_path)
    assert r.returncode == 1, r.stdout
    assert r.stderr == "h3-report: no audit log at nope.csv, and no run of that name\n"


# --- bug 6: a refused H3D_TOKEN -------------------------------------------------------


def test_a_refused_h3d_token_is_named_as_such(daemon: Daemon, tmp_path: Path) -> None:
    """A wrong H3D_TOKEN was reported as "refuses the token of data dir D: it serves another
    data dir" though the token was not D's and the daemon was D's own."""
    r = h3_report(None, "--run", "alpha", "--url", daemon.url, cwd=tmp_path, H3D_TOKEN="wrong")
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"h3-report: the daemon at {daemon.url} refuses the token in H3D_TOKEN")
    assert "serves another data dir" not in line, line


# --- bug 15: flags that cannot go together ---------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--run", "beta", "--compare", "alpha", "x"],
        ["--run", "beta", "--tune", "s"],
        ["--h3-log", "a.csv", "--compare", "b.csv"],
        ["--tune", "s", "--h3-log", "a.csv"],
    ],
)
def test_h3_report_modes_are_mutually_exclusive(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--run beta --compare alpha x` silently dropped --run (one mode won, the rest were
    ignored)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--compare", "a", "b", "--baseline", "c"], "argument --baseline: only with --run"),
        (["--run", "a", "--baseline-log", "c.csv"], "argument --baseline-log: only with --h3-log"),
        ([], "one of the arguments --run --h3-log --compare --tune is required"),
    ],
)
def test_h3_report_refuses_a_baseline_its_mode_does_not_use(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and why in capsys.readouterr().err


def test_run_json_carries_the_green_score_of_its_baseline(daemon: Daemon) -> None:
    """`--run beta --baseline alpha --json` printed the report without any Green Score."""
    r = h3_report(daemon, "--run", "beta", "--baseline", "alpha", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    base = json.loads(h3_report(daemon, "--run", "alpha", "--json").stdout)
    assert "green_score" not in base  # no baseline asked: none given

    def summary(report: dict[str, Any]) -> dict[str, Any]:
        acc = [e["accuracy"] for e in report["epochs"] if e["accuracy"] is not None]
        return {"energy_j": report["energy"]["energy_j"], "final_accuracy": acc[-1]}

    score, note = green_score(summary(rep), summary(base), 1.0)
    assert rep["green_score"] == {
        "baseline": base["run"],
        "tolerance": 1.0,
        "score": score,
        "note": note,
    }
    assert "accuracy within +0.50 points" in note, note


# --- bug 10: the sentence when no stopping point is reached --------------------------------


def _report_with_epochs(etas: list[float | None]) -> dict[str, Any]:
    energy = {
        "energy_j": 10.0,
        "device_energy_j": 10.0,
        "active_energy_j": None,
        "active_energy_note": None,
        "source": "rapl",
        "measured": True,
    }
    eta = {
        "loss_start": 2.0,
        "loss_now": 1.0,
        "info_gain_bits": 1.0,
        "eta_bits_per_j": 0.1,
        "marginal_eta_bits_per_j": 0.1,
        "window_s": 60.0,
        "window_is_whole_run": True,
    }
    epochs = [
        {"epoch": i, "loss": 1.0, "accuracy": 0.9, "energy_j": 1.0, "eta_bits_per_j": v}
        for i, v in enumerate(etas)
    ]
    return {
        "run": "a" * 32,
        "name": "beta",
        "status": "finished",
        "duration_s": 3.0,
        "n_batches": 30,
        "energy": energy,
        "eta": eta,
        "phases": [],
        "epochs": epochs,
    }


def test_no_stopping_point_yet_says_the_rule_applied_not_that_eta_stayed_high() -> None:
    """η 1.98, 0.15 (7.6 % of the peak), 0.43: the report said "η stayed above 10% of its
    peak"; the rule only looks at whether η stayed below from some epoch to the last."""
    text = format_report(_report_with_epochs([1.98, 0.1506, 0.4309]))
    assert "stayed above" not in text, text
    assert (
        "no point of diminishing returns yet (the last epoch's η is not below 10% of its peak)"
        in text
    ), text
    # an epoch without η says nothing either way: the known η's decide (the dashboard's rule)
    text = format_report(_report_with_epochs([1.98, 0.1506, None]))
    assert "diminishing returns after epoch 0" in text, text
    text = format_report(_report_with_epochs([1.98, 0.9, None]))
    assert "no point of diminishing returns yet (the last known η is not below 10% of" in text
