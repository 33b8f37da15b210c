"""The benchmark scripts' own behaviour, not their figures: where a run's report goes, and
that a report says what ran. Small real runs; the figures are in benchmarks/results/."""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _common
from benchmarks._data import Split
from tests.conftest import REPO

# the scripts that write a report; the others only print (docs/benchmarks.md says which)
REPORTING = [
    "auto_overhead",
    "client_instructions",
    "client_overhead",
    "concurrency",
    "counter_granularity",
    "energy_accuracy",
    "infonet",
    "ingest",
    "learning",
    "log_batch_ab",
    "ngdt",
    "optimizer_step",
    "reads",
    "startup",
    "startup_phases",
]
PRINT_ONLY = ["batch_fetch", "contention", "denormals", "tracker_update"]
RESULTS = REPO / "benchmarks" / "results"


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The script's argument parser as its ``main()`` builds it (stopped before parsing)."""
    module = importlib.import_module(f"benchmarks.{name}")

    def stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Built) as built:
        module.main()
    return built.value.parser


def default_of(parser: argparse.ArgumentParser, option: str) -> object:
    return next(a.default for a in parser._actions if option in a.option_strings)


def test_every_script_is_sorted_into_reporting_or_print_only() -> None:
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("[!_]*.py"))
    assert scripts == sorted(REPORTING + PRINT_ONLY)


@pytest.mark.parametrize("name", REPORTING)
def test_a_report_goes_to_the_git_ignored_local_dir_unless_out_says(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = parser_of(name, monkeypatch)
    assert default_of(parser, "--out") == _common.LOCAL_RESULTS / f"{name}.md"
    if name == "learning":  # its rows too: a run appends to them
        assert default_of(parser, "--jsonl") == _common.LOCAL_RESULTS / "learning.jsonl"
    assert "benchmarks/results/local/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("name", PRINT_ONLY)
def test_the_print_only_scripts_take_no_out(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = parser_of(name, monkeypatch)
    assert all("--out" not in a.option_strings for a in parser._actions)


def test_a_smoke_run_leaves_the_committed_results_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import counter_granularity

    committed = RESULTS / "counter_granularity.md"
    before = hashlib.sha256(committed.read_bytes()).hexdigest()
    # raising=False: before the local dir, the script wrote the committed file (checked below)
    monkeypatch.setattr(_common, "LOCAL_RESULTS", tmp_path / "local", raising=False)
    monkeypatch.setattr("sys.argv", ["counter_granularity.py", "--quick"])
    counter_granularity.main()
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == before
    report = (tmp_path / "local" / "counter_granularity.md").read_text()
    assert "counter_granularity.py --quick" in report
    assert f"wrote {tmp_path / 'local' / 'counter_granularity.md'}" in capsys.readouterr().out


def test_ngdt_quick_says_the_epochs_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import ngdt

    def small(name: str) -> Split:  # the tasks' shapes, a few batches of them
        g = torch.Generator().manual_seed(0)
        dim = {"mnist1d": 40, "mnist5k": 784}[name]
        x, y = torch.randn(96, dim, generator=g), torch.randint(0, 10, (96,), generator=g)
        return Split(x[:64], y[:64], x[64:], y[64:])

    monkeypatch.setattr(ngdt, "load", small)
    monkeypatch.setattr(ngdt, "METHODS", {"Adam": ngdt.METHODS["Adam"]})  # the header's test
    out = tmp_path / "ngdt.md"
    monkeypatch.setattr("sys.argv", ["ngdt.py", "--quick", "--out", str(out)])
    ngdt.main()
    header = out.read_text().splitlines()[2]
    with open(tmp_path / "ngdt_curves.csv") as f:
        curves = list(csv.DictReader(f))
    for task, words in [("MLP on MNIST-1D", "MNIST-1D (64/32"), ("CNN", "subset (64/32")]:
        ran = max(int(r["epoch"]) for r in curves if r["task"].startswith(task))
        assert f"{words}, {ran} epochs)" in header
    assert "10 epochs" not in header and "6 epochs" not in header


def test_auto_overhead_writes_its_report_in_a_tree_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import auto_overhead

    monkeypatch.setattr(_common, "REPO", tmp_path)  # a `git archive` tree: no .git
    row = {
        "seed": 0,
        "d_acc": -0.5,
        "samples": 0.875,
        "flops": 0.9,
        "wall": 0.95,
        "full_epochs": 0.96,
        "n_full": 3,
        "uniform_s": 10.0,
        "auto_s": 9.5,
        "epoch_spread": 1.1,
    }
    out = tmp_path / "out" / "auto_overhead.md"
    auto_overhead.write({"mnist1d": [row]}, out, "2026-12-03 21:00")
    assert "auto_overhead.py` at an unknown commit on 2026-12-03 21:00 UTC" in out.read_text()


def test_concurrency_quick_retries_so_exactly_once_is_tested() -> None:
    from benchmarks import concurrency

    # --quick's writers send 8 and 2 requests: one in 2 is sent twice, not one in 10
    res = concurrency.run_config(2, 1, 4, None, "SQLite", retry_every=2)
    assert res["errors"] == 0 and res["exactly_once"]
    assert res["duplicates_seen"] == 2 * 2 * concurrency.N_BATCHES


def learning_report(rows_file: str, task: str, tmp_path: Path) -> str:
    """``learning.py``'s report of one task's published rows (at the published lrs)."""
    from benchmarks import learning

    rows = [
        json.loads(line)
        for line in (RESULTS / rows_file).read_text().splitlines()
        if line.strip() and json.loads(line)["task"] == task
    ]
    out = tmp_path / "learning.md"
    learning.write(rows, learning.read_rows(RESULTS / "learning_lr.jsonl"), out, rows_file)
    return out.read_text()


def test_learning_report_says_where_each_arm_ran(tmp_path: Path) -> None:
    text = learning_report("learning.jsonl", "mnist-cnn", tmp_path)
    when = next(line for line in text.splitlines() if line.startswith("When "))
    assert "random subset 12:13–12:23 (AMD EPYC)" in when
    assert "uniform Adam 22:01–22:06 (Intel" in when


def test_learning_report_names_arms_run_without_uniform_adam(tmp_path: Path) -> None:
    """A task whose rows hold no uniform Adam arm says what ran (unpaired), not "not run"."""
    text = learning_report("learning_noise_floor.jsonl", "mnist-mlp", tmp_path)
    assert "Uniform Adam not run (`--tasks mnist-mlp`" in text
    assert "AutoH3 (H3Optimizer): 3 seeds, 97.74 % test accuracy, 298,333 samples" in text
    assert "Not run (`--tasks mnist-cnn`" in text  # no rows at all


def test_learning_cosine_schedule_is_torchs_per_epoch_cosine_and_constant_leaves_lr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--lr-schedule cosine`` sets an arm's lr per epoch as ``CosineAnnealingLR`` stepped
    once an epoch does (eta_min at the floor); the default leaves every lr as it was."""
    import torch

    from benchmarks import learning

    def lrs(schedule: str, epochs: int) -> list[float]:
        monkeypatch.setattr(learning, "SCHEDULE", schedule)
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        at = learning.scheduled(opt, epochs)
        seen = []
        for epoch in range(epochs):
            at(epoch)
            seen.append(opt.param_groups[0]["lr"])
        return seen

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    torchs = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=20, eta_min=2e-3 * learning.COSINE_FLOOR
    )
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        torchs.step()
    assert lrs("cosine", 20) == pytest.approx(expected, rel=1e-9)
    assert lrs("constant", 20) == [2e-3] * 20
    # a step the optimizer lowered itself (H3Optimizer's probe) stays lowered under "constant"
    monkeypatch.setattr(learning, "SCHEDULE", "constant")
    at = learning.scheduled(opt, 20)
    opt.param_groups[0]["lr"] = 1e-3
    at(5)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_reports_command_line_names_the_options_that_ran() -> None:
    # every report's header quotes this line: an option left at its default is not named,
    # one that changed what ran (--quick, --rounds 3, a list, a path) is; --out never is
    ap = argparse.ArgumentParser(prog="optimizer_step.py")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--block-s", type=float, default=3.0)
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--baseline", type=Path)
    _common.add_out(ap, "optimizer_step.md")
    base = "PYTHONPATH=. python benchmarks/optimizer_step.py"
    assert _common.command(ap, ap.parse_args(["--out", "x.md"])) == base
    argv = ["--quick", "--rounds", "3", "--block-s", "1.5", "--only", "a", "b"]
    assert _common.command(ap, ap.parse_args([*argv, "--baseline", "/tmp/b"])) == (
        f"{base} --quick --rounds 3 --block-s 1.5 --only a b --baseline /tmp/b"
    )


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_client_instructions_counts_each_thread_of_a_real_callgrind_run(tmp_path: Path) -> None:
    """The per-thread counts the script reads: a thread that sums ten times as many numbers
    shows about ten times as many instructions, and the main thread is thread 1."""
    from benchmarks.client_instructions import thread_counts

    counts = {}
    for n in (20_000, 200_000):
        prefix = tmp_path / f"cg-{n}"
        code = (
            f"import threading; t = threading.Thread(target=sum, args=(range({n}),)); "
            "t.start(); t.join()"
        )
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={prefix}", sys.executable, "-S", "-c", code],
            check=True, capture_output=True,
        )  # fmt: skip
        counts[n] = thread_counts(prefix)
    assert set(counts[20_000]) == set(counts[200_000]) == {1, 2}
    small, big = counts[20_000][2], counts[200_000][2]
    # the thread's own start-up is a fixed part: the summing part grows tenfold
    assert 5 < big / small < 11
    assert abs(counts[200_000][1] - counts[20_000][1]) < 0.05 * counts[20_000][1]


def test_client_instructions_splits_work_into_per_batch_and_per_request_parts(
    tmp_path: Path,
) -> None:
    """Counts made from a known step, per-batch and per-request cost (and a fixed start-up)
    are split back into those parts, and the report puts them together at the native run's
    batches a request."""
    from benchmarks import client_instructions as ci

    step, idle_extra = 6_000_000, 5_000
    costs = {"training": (3_000, 400_000), "other": (10_000, 2_000_000)}  # per batch, request
    args = argparse.Namespace(
        short=100, long=500, batch=[100, 1000], modes=["unprofiled", "idle-thread", "mean"],
        out=tmp_path / "r.md", before=None, jobs=2,
    )  # fmt: skip
    counts = {}
    for steps in (500, 100):
        counts["this tree", "unprofiled", 0, steps] = {
            "training": 10**9 + step * steps,
            "other": 0,
            "requests": 0,
        }
        counts["this tree", "idle-thread", 0, steps] = {
            "training": 10**9 + (step + idle_extra) * steps,
            "other": 5,
            "requests": 0,
        }
        for batch in (100, 1000):
            requests = 2 + -(-steps // batch)  # create, update, the batches' requests
            counts["this tree", "mean", batch, steps] = {
                k: 10**9
                + (step + idle_extra if k == "training" else 0) * steps
                + per_batch * steps
                + per_request * requests
                for k, (per_batch, per_request) in costs.items()
            } | {"requests": requests}
    split = ci.split_costs(args, counts, "this tree", "mean")
    assert split is not None
    assert split["training"]["batch"] == pytest.approx(step + idle_extra + 3_000)
    assert split["training"]["request"] == pytest.approx(400_000)
    assert split["other"] == pytest.approx({"batch": 10_000, "request": 2_000_000})
    # one request size: nothing to solve from
    one = {k: v for k, v in counts.items() if k[2] != 100}
    assert ci.split_costs(args, one, "this tree", "mean") is None

    ap = argparse.ArgumentParser(prog="client_instructions.py")
    ci.write(ap, args, "now", 1000.0, counts)
    report = args.out.read_text()
    # at 1 000 batches a request: 3 000 + 400 a batch on the training thread over the
    # control, 10 000 + 2 000 on the sender's
    assert "a request of a native run carries 1,000 batches" in report
    row = next(line for line in report.splitlines() if "| 3,000 / 400,000 |" in line)
    assert "+3,400 (**+0.057 %**)" in row and "+12,000 (**+0.200 %**)" in row
    assert "+15,400 (**+0.257 %**)" in row


def test_startups_large_store_holds_the_rows_and_is_served(tmp_path: Path) -> None:
    import sqlite3

    from benchmarks import startup

    env = startup.child_env(REPO, tmp_path / "pycache")
    data = tmp_path / "large"
    startup.large_store(REPO, env, data, 1234)
    conn = sqlite3.connect(data / "h3d.db")
    (n,) = conn.execute("SELECT count(*) FROM power_samples WHERE device_id = 1000").fetchone()
    conn.close()
    assert n == 1234
    wall, cpu = startup.spawn_to_healthy(REPO, env, data)  # h3d serves the store it made
    assert wall > 0 and cpu > 0


def test_startups_autostart_times_a_profiler_that_reaches_the_daemon_it_started(
    tmp_path: Path,
) -> None:
    from benchmarks import startup

    env = startup.child_env(REPO, tmp_path / "pycache")
    data = tmp_path / "auto"
    # raises if the batches were not posted
    construct, stored, covered, share, joules = startup.autostart(REPO, env, data)
    assert 0 < construct < stored
    assert covered == pytest.approx(1.0) and 0 < share <= 1.0 and joules > 0  # from its start
    assert (data / "h3d.db").exists()


def test_startup_phases_times_every_step_of_a_real_start(tmp_path: Path) -> None:
    from benchmarks import startup, startup_phases

    env = startup.child_env(REPO, tmp_path / "pycache")
    steps = startup_phases.one_start(REPO, env, tmp_path / "data")  # a real `h3d serve`
    assert list(steps) == startup_phases.ORDER  # each step found, in the order it runs
    assert all(ms > 0 for ms in steps.values())
    assert steps["total"] >= sum(ms for name, ms in steps.items() if name != "total")
    assert (tmp_path / "data" / "h3d.db").exists() and not (
        tmp_path / "data" / "daemon.json"
    ).exists()
