"""h3-tune's command line and its edges: bad arguments, no daemon, a closed stdout, and the
trial's run window (real daemons, real HTTP; only the memory sampler is wrapped to stamp it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from h3optim.tune import Outcome, Task, Trial, _train, format_report, tune
from h3optim.tune.cli import main as h3_tune
from h3optim.tune.runner import TuneResult
from h3optim.tune.task import load_task
from tests.conftest import REPO, Daemon, free_port

TASK_FILE = """\
import torch
from torch.utils.data import TensorDataset
from h3optim.tune import Task


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return Task(model, TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:]),
                torch.nn.CrossEntropyLoss(), lambda p: torch.optim.SGD(p, lr=0.1),
                batch_size=16, name="tiny", device="cpu")
"""


@pytest.fixture(scope="module")
def task_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``path:make`` of a tiny task file (one per module: its stem becomes a module name)."""
    path = tmp_path_factory.mktemp("task") / "h3_tune_cli_tinytask.py"
    path.write_text(TASK_FILE)
    return f"{path}:make"


def tiny_task() -> Task:
    return Task(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))),
        TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))),
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=16,
        device="cpu",
    )


def quick(**kw: Any) -> TuneResult:
    """A small session that starts no daemon (whatever the code under test does)."""
    args: dict[str, Any] = {
        "budget": 4,
        "techniques": ["early_stop"],
        "segments": 2,
        "autostart": False,
        "progress": None,
        "count_flops": False,
    }
    return tune(tiny_task(), **{**args, **kw})


def tuned(d: Daemon, techniques: list[str], **kw: Any) -> TuneResult:
    """A small session of :func:`tiny_task` against the daemon ``d`` (silent, no FLOPs)."""
    args: dict[str, Any] = {
        "budget": 4,
        "segments": 2,
        "url": d.url,
        "data_dir": d.data_dir,
        "progress": None,
        "count_flops": False,
    }
    return tune(tiny_task(), techniques=techniques, **{**args, **kw})


@pytest.fixture
def no_daemon_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data dir, its default port one nothing listens on, no URL or token set."""
    for var in ("H3D_URL", "H3D_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "h3d-data"
    monkeypatch.setenv("H3D_DATA_DIR", str(data))
    monkeypatch.setenv("H3D_PORT", str(free_port()))
    return data


# --- bug 2: --tolerance nan ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5", "abc"])
def test_a_tolerance_that_is_not_a_finite_number_from_0_is_an_argument_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN compared as "within" for every drop: techniques that lost accuracy were
    recommended, and the session's JSON (NaN written as null) broke its own --report."""
    with pytest.raises(SystemExit) as exc:
        h3_tune(["missing_task_file.py:make", "--tolerance", value])
    assert exc.value.code == 2
    assert "--tolerance" in capsys.readouterr().err


def test_tune_refuses_a_nan_tolerance_before_anything_runs(no_daemon_env: Path) -> None:
    with pytest.raises(ValueError, match="Invalid tolerance: nan"):
        quick(tolerance=math.nan)


# --- bug 3: a mistyped module, --threads -1, --segments 0 -----------------------------------


def test_a_mistyped_module_task_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert h3_tune(["h3_no_such_module_here:make"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("h3-tune: cannot import h3_no_such_module_here: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="cannot import h3_no_such_module_here"):
        load_task("h3_no_such_module_here:make")


@pytest.mark.parametrize("flag", ["--threads", "--segments"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_and_segments_must_be_positive_integers(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        h3_tune(["missing_task_file.py:make", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_tune_refuses_zero_segments(no_daemon_env: Path) -> None:
    with pytest.raises(ValueError, match="Invalid segments: 0"):
        quick(segments=0)


# --- bug 4: --report into a closed pipe -----------------------------------------------------


def test_report_into_a_closed_pipe_does_not_call_the_file_unreadable() -> None:
    """`h3-tune --report FILE | true`: the write fails, not the read."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "h3optim.tune.cli", "--report"]
            + [str(REPO / "docs" / "tune-session-99762c6b.json")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err == "", err


# --- bug 18: no daemon ----------------------------------------------------------------------


def test_no_daemon_at_the_url_stops_before_the_first_trial(
    task_spec: str, no_daemon_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    argv = [task_spec, "--url", url, "--techniques", "early_stop", "--no-flops"]
    argv += ["--budget-steps", "5", "--segments", "2", "--out", str(out)]
    assert h3_tune(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines == [
        f"h3-tune: no h3d daemon answers at {url}; every trial is a run of the daemon, so "
        f"none was run: start one (`h3d serve --data-dir {no_daemon_env}`) or give its URL "
        "(--url)"
    ]
    assert not out.exists()  # nothing trained, nothing written
    assert not (no_daemon_env / "spool").exists()  # no run spooled


def test_no_daemon_and_no_autostart_raises_and_starts_none(no_daemon_env: Path) -> None:
    events: list[str] = []
    with pytest.raises(ConnectionError, match="no h3d daemon answers at http://127.0.0.1:"):
        quick(progress=lambda e, _i: events.append(e))
    assert events == []
    assert not (no_daemon_env / "daemon.json").exists()


def _outcome(source: str, measured: bool, energy_j: float | None) -> Outcome:
    return Outcome(
        run_id=None,
        wall_s=1.0,
        energy_j=energy_j,
        device_energy_j=None,
        energy_source=source,
        energy_measured=measured,
        eta_bits_per_j=None if energy_j is None else 1.0,
        info_gain_bits=None,
        peak_mem_bytes=0,
        mem_rise_bytes=0,
        mem_source="rss_sampled",
        flops=None,
        metric=0.9,
        steps=10,
        samples=160,
    )


def _session(*outcomes: tuple[str, Outcome]) -> TuneResult:
    return TuneResult(
        session="s",
        task="t",
        budget_steps=10,
        repeats=1,
        tolerance=0.01,
        metric_name="accuracy",
        device="cpu",
        tags=[],
        trials=[Trial(name, 0, {}, outcome=o) for name, o in outcomes],
    )


def _provenance_line(result: TuneResult) -> str:
    return next(
        line for line in format_report(result).splitlines() if line.startswith("Energy prov")
    )


def test_energy_of_source_none_reads_unknown_not_estimated() -> None:
    none = _session(
        ("baseline", _outcome("none", False, None)), ("prune", _outcome("none", False, None))
    )
    assert _provenance_line(none) == "Energy provenance: unknown (no energy measured)"
    estimated = _session(("baseline", _outcome("estimated", False, 5.0)))
    assert _provenance_line(estimated) == (
        "Energy provenance: estimated (ESTIMATED or partly estimated: a model, not a measurement)"
    )
    counter = _session(
        ("baseline", _outcome("rapl", True, 5.0)), ("prune", _outcome("none", False, None))
    )
    assert _provenance_line(counter) == (
        "Energy provenance: rapl; unknown (no energy measured) for trials of source none"
    )


# --- bug 21: the run's window is the window wall_s times ------------------------------------


class _StampedPeakMemory(_train.PeakMemory):
    """The real sampler, stamping (on the clock runs are stamped with) when its set-up
    ended and its tear-down began."""

    stamps: list[tuple[str, float]] = []

    def __enter__(self) -> _train.PeakMemory:
        entered = super().__enter__()
        self.stamps.append(("entered", time.time()))
        return entered

    def __exit__(self, *exc: Any) -> None:
        self.stamps.append(("exiting", time.time()))
        super().__exit__(*exc)


@pytest.fixture
def stamped(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, float]]]:
    stamps: list[tuple[str, float]] = []
    monkeypatch.setattr(_StampedPeakMemory, "stamps", stamps)
    monkeypatch.setattr(_train, "PeakMemory", _StampedPeakMemory)
    yield stamps


def test_a_trials_run_window_is_inside_what_wall_s_times(
    daemon_factory: Callable[..., Daemon], stamped: list[tuple[str, float]]
) -> None:
    """docs/tune.md: wall time is "the same window as the run's energy". The run opened
    before the memory sampler's set-up (a heap trim, a thread) and stopped after its
    tear-down: 0.17-0.30 s more energy window than wall time, against short trials."""
    d = daemon_factory()
    result = tuned(d, ["early_stop"], budget=6, segments=3)
    trials = [t for t in result.trials if t.outcome is not None]
    assert [t.technique for t in trials] == ["baseline", "early_stop"]
    assert [k for k, _ in stamped] == ["entered", "exiting"] * 2
    with d.client() as api:
        for k, t in enumerate(trials):
            assert t.outcome is not None
            run = api.get(f"/v1/runs/{t.outcome.run_id}").json()
            entered, exiting = stamped[2 * k][1], stamped[2 * k + 1][1]
            assert entered <= run["created_at"] <= run["finished_at"] <= exiting, (run, stamped)


def test_report_of_a_session_file_still_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --report path reads and formats inside its error handling, then prints."""
    path = tmp_path / "tune-s.json"
    path.write_text(json.dumps(_session(("baseline", _outcome("rapl", True, 5.0))).to_json()))
    assert h3_tune(["--report", str(path)]) == 0
    assert "Energy provenance: rapl\n" in capsys.readouterr().out


# --- carried over: --out given a file, '/' in --session -------------------------------------


@pytest.mark.parametrize("session", ["a/b", "../up", ".hidden", "x" * 65])
def test_a_session_id_that_is_no_file_name_is_an_argument_error(
    session: str, task_spec: str, no_daemon_env: Path, tmp_path: Path
) -> None:
    """The id names the session's files in --out: 'a/b' died in a FileNotFoundError
    traceback writing tune-a/b.json (and '../up' wrote outside --out)."""
    argv = [task_spec, "--session", session, "--out", str(tmp_path / "out"), "--no-flops"]
    proc = subprocess.run(
        [sys.executable, "-m", "h3optim.tune.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"h3-tune: Invalid session id {session!r}: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_anything_runs(
    no_daemon_env: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    out.write_text("kept\n")
    with pytest.raises(ValueError, match="is not a directory"):
        quick(out=out)  # before the daemon check: no daemon is needed to say so
    assert out.read_text() == "kept\n"


def test_an_out_that_cannot_be_made_is_one_line_before_the_first_trial(
    daemon: Daemon,
    task_spec: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file in --out's path: mkdir fails once the daemon answered, before any trial."""
    monkeypatch.setenv("H3D_DATA_DIR", str(daemon.data_dir))  # its token
    (tmp_path / "a-file").write_text("kept\n")
    out = tmp_path / "a-file" / "sub"
    argv = [task_spec, "--url", daemon.url, "--out", str(out), "--no-flops"]
    argv += ["--techniques", "early_stop", "--budget-steps", "4", "--segments", "2"]
    assert h3_tune(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"h3-tune: cannot make the output directory '{out}': "), err
    with daemon.client() as api:
        assert api.get("/v1/runs").json()["count"] == 0  # no trial ran


def test_combine_of_one_named_technique_says_it_was_named_not_that_it_won(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """``--combine early_stop`` alone said "only early_stop won: it was verified alone",
    whatever early_stop's verdict was."""
    result = tuned(daemon_factory(), ["early_stop"], combine=["early_stop"])
    assert result.combination == ["early_stop"]
    assert result.combination_note == (
        "--combine early_stop: one technique left (early_stop, trained alone above): "
        "nothing to combine"
    )
    assert "won" not in result.combination_note


def test_combine_names_a_technique_that_does_not_apply_here(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """``--combine amp_fp16,early_stop`` on a CPU: amp_fp16 ran no trial, and the session
    died at its end in a KeyError traceback, every trial trained."""
    both = ["amp_fp16", "early_stop"]
    result = tuned(daemon_factory(), both, combine=both)
    assert result.combination == ["early_stop"]
    assert "amp_fp16 (not applicable: fp16 autocast needs CUDA" in result.combination_note
    alone = tuned(daemon_factory("alone"), both, combine=["amp_fp16"])
    assert alone.combination == []
    assert alone.combination_note.startswith("--combine amp_fp16: no technique left; left out")


def test_combine_refuses_an_inference_technique_before_anything_runs(
    no_daemon_env: Path,
) -> None:
    with pytest.raises(ValueError, match=r"combine takes training techniques, not \['int8"):
        quick(techniques=["early_stop", "int8_dynamic"], combine=["int8_dynamic", "early_stop"])
