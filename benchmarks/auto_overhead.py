"""What AutoH3's time buys and costs, with the host's drift taken out: uniform Adam and AutoH3
trained epoch by epoch in turn, in one process.

On this project's shared 2-core hosts a whole run's wall time moves by 10-15 % from one
minute to the next (``learning.py`` runs each arm whole, so its per-seed wall ratios of
AutoH3 to uniform Adam scatter from 0.69x to 0.91x on one task). Here the two arms of
``learning.py`` (:func:`benchmarks.learning.arm_epochs`: the same models, data path, profiled
runs on one real daemon, AutoH3 with its controller) advance one epoch at a time, uniform Adam
first on even epochs and AutoH3 first on odd ones, so that each pair of epochs meets the same
host. Each arm's time is its set-up plus its epochs (not its profiler's start and stop, as in
``learning.py``).

Per task and seed:
- **wall**: AutoH3's time over uniform Adam's;
- **samples**: the samples AutoH3 back-propagated over uniform Adam's;
- **per sample**: wall over samples, AutoH3's time per back-propagated sample against uniform
  Adam's: 1.00 would be a saving in samples that shows in full in time; above 1, what AutoH3's
  bookkeeping (loss tracking, weights, the probe set, the controller, draws) costs;
- **full epochs**: the median, over the epochs where AutoH3 trains on as many samples as
  uniform Adam (warm-up, and consolidation epochs with no sample of weight 0 left out), of
  AutoH3's epoch time over uniform Adam's: the same work, so the bookkeeping alone.

Energy is not split here: the two runs are open at once, and the daemon gives each the
device's whole draw. ``learning.py`` reports energy, whole runs apart.

    PYTHONPATH=. python benchmarks/auto_overhead.py [--tasks mnist1d mnist1d-noisy mnist1d-long] [--seeds 5]

``--arms BASE AUTO`` pairs two other arms of ``learning.py`` the same way (for example
``"uniform Adam (fused)" "AutoH3 (H3Optimizer)"``: AutoH3 with its default optimizer against
Adam with the same fused kernel).

Writes ``benchmarks/results/local/auto_overhead.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import learning  # noqa: E402
from benchmarks._common import add_out, daemon, machine, short_rev, write_report  # noqa: E402

ARMS = ("uniform Adam", "AutoH3 (balanced)")


def interleaved(
    task: learning.Task,
    data: learning.Split,
    noisy: torch.Tensor | None,
    lr: float,
    seed: int,
    url: str,
    tmp: str,
    arms: tuple[str, str] = ARMS,
) -> dict[str, Any]:
    """One seed of ``task``: both arms' epochs in turn; per-arm totals and per-epoch times."""
    runs: dict[str, tuple[learning.Arm, Iterator[None]]] = {
        arm: learning.arm_epochs(arm, task, data, seed, noisy, url, tmp, lr) for arm in arms
    }
    epoch_s: dict[str, list[float]] = {arm: [] for arm in arms}
    epoch_samples: dict[str, list[int]] = {arm: [] for arm in arms}
    for epoch in range(task.epochs):
        for arm in arms if epoch % 2 == 0 else arms[::-1]:
            state, epochs = runs[arm]
            before = state.counter.backprop
            t0 = time.perf_counter()
            next(epochs)
            epoch_s[arm].append(time.perf_counter() - t0)
            epoch_samples[arm].append(state.counter.backprop - before)
    for _, epochs in runs.values():  # run AutoH3's end of epochs (its controller report)
        next(epochs, None)
    rows = {
        arm: learning.arm_row(state, task, data, state.setup_s + sum(epoch_s[arm]), lr)
        for arm, (state, _) in runs.items()
    }
    uni, auto = (rows[a] for a in arms)
    full = [
        a / u
        for a, u, n_a, n_u in zip(
            epoch_s[arms[1]],
            epoch_s[arms[0]],
            epoch_samples[arms[1]],
            epoch_samples[arms[0]],
            strict=True,
        )
        if n_a == n_u
    ]
    return {
        "seed": seed,
        "wall": auto["wall_s"] / uni["wall_s"],
        "samples": auto["samples"] / uni["samples"],
        "flops": auto["flops"] / uni["flops"],
        "full_epochs": statistics.median(full) if full else float("nan"),
        "n_full": len(full),
        "d_acc": auto["acc"] - uni["acc"],
        "uniform_s": uni["wall_s"],
        "auto_s": auto["wall_s"],
        "epoch_spread": max(epoch_s[arms[0]]) / min(epoch_s[arms[0]]),
    }


def _q(xs: list[float]) -> str:
    """median (quartiles) of ``xs``."""
    if len(xs) < 2:
        return f"{xs[0]:.3f}"
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return f"{med:.3f} ({q1:.3f}–{q3:.3f})"


def write(
    results: dict[str, list[dict[str, Any]]],
    out: Path,
    started: str,
    arms: tuple[str, str] = ARMS,
) -> None:
    base, auto = arms
    rev = short_rev(check=False) or "an unknown commit"  # a `git archive` tree has no .git
    lines = [
        f"# {auto} against {base}, epochs interleaved",
        "",
        f"`PYTHONPATH=. python benchmarks/auto_overhead.py` at {rev} on {started} UTC, "
        f"{machine()}; one torch thread. Method: the docstring of "
        f"`benchmarks/auto_overhead.py`. Ratios are {auto} over {base}, per seed; the "
        "table gives their medians (quartiles).",
        "",
        "| task | seeds | Δ accuracy (points, mean) | samples | FLOPs | wall, interleaved "
        "| per sample (wall ÷ samples) | full epochs (same work) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rs in results.items():
        lines.append(
            f"| {learning.TASKS[key].name} | {len(rs)} "
            f"| {statistics.mean(r['d_acc'] for r in rs):+.2f} "
            f"| {statistics.median(r['samples'] for r in rs):.3f}× "
            f"| {statistics.median(r['flops'] for r in rs):.3f}× "
            f"| {_q([r['wall'] for r in rs])} "
            f"| {_q([r['wall'] / r['samples'] for r in rs])} "
            f"| {_q([r['full_epochs'] for r in rs])} |"
        )
    lines += [
        "",
        f"Per seed ({base}'s slowest epoch over its fastest shows the host's drift "
        "within one run):",
        "",
        f"| task | seed | {base} s | {auto} s | wall | samples | per sample "
        "| full epochs (n) | drift |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rs in results.items():
        for r in rs:
            lines.append(
                f"| {key} | {r['seed']} | {r['uniform_s']:.2f} | {r['auto_s']:.2f} "
                f"| {r['wall']:.3f} | {r['samples']:.3f} | {r['wall'] / r['samples']:.3f} "
                f"| {r['full_epochs']:.3f} ({r['n_full']}) | {r['epoch_spread']:.2f}× |"
            )
    write_report(out, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=["mnist1d", "mnist1d-noisy", "mnist1d-long"])
    ap.add_argument("--seeds", type=int, default=5)
    add_out(ap, "auto_overhead.md")
    ap.add_argument(
        "--arms",
        nargs=2,
        default=list(ARMS),
        metavar=("BASE", "AUTO"),
        # the stopped-early arm has fewer epochs than the one it would interleave with
        choices=[a for a in learning.ARMS if a != learning.SHORT],
    )
    args = ap.parse_args()
    arms: tuple[str, str] = (args.arms[0], args.arms[1])
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as (url, _token):
        lr_rows = learning.read_rows(learning.RESULTS / "learning_lr.jsonl")
        for key in args.tasks:  # the task's data, lr and FLOPs once, as learning.py does
            task = learning.TASKS[key]
            lr = learning.chosen_lr(key, lr_rows)
            data, noisy = learning.task_data(task)
            learning.FLOPS[(task.model, data.input_dim, task.batch)] = learning.flops_per_sample(
                task.model, data.input_dim, task.batch
            )
            for seed in range(args.seeds):
                r = interleaved(task, data, noisy, lr, seed, url, tmp, arms)
                results.setdefault(key, []).append(r)
                print(
                    f"{key:14s} seed {seed}: wall {r['wall']:.3f} samples {r['samples']:.3f} "
                    f"per sample {r['wall'] / r['samples']:.3f} full epochs "
                    f"{r['full_epochs']:.3f} Δacc {r['d_acc']:+.2f}",
                    flush=True,
                )
    write(results, args.out, started, arms)


if __name__ == "__main__":
    main()
