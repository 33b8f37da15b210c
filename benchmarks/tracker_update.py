"""``LossTracker.update`` in a training loop, this tree against a git revision's.

Right after a training step, every tensor operation pays its dispatch at full price (the step
has evicted what it runs on), so an update's cost in a loop is set by how many operations it
makes, not by its arithmetic. This trains a small model and calls one of the two trackers'
``update`` right after each step, alternating step by step, and times the call; at each
epoch's end it times a read of each tracker's state (what a sampler does before drawing the
next epoch; a tracker that records its updates applies them then), so that "in all" is what
tracking costs a step. Then one epoch of updates back to back and a read (warm). Both
trackers must hold bit-identical state at the end.

    PYTHONPATH=. python benchmarks/tracker_update.py [--before REV] [--task mnist1d|mnist]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks._common import REPO, machine, short_rev
from benchmarks._data import load
from benchmarks.learning import make_model
from h3optim.tracking import LossTracker


def tracker_at(rev: str) -> type[LossTracker]:
    """``LossTracker`` as ``h3optim/tracking.py`` was at ``rev``."""
    src = subprocess.run(
        ["git", "show", f"{rev}:h3optim/tracking.py"], cwd=REPO, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "tracking_before.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("tracking_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tracking_before"] = mod
    spec.loader.exec_module(mod)
    return mod.LossTracker  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="c4992d6", help="the revision to compare with")
    ap.add_argument("--task", default="mnist1d", choices=["mnist1d", "mnist"])
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load(args.task)
    batch = 64 if args.task == "mnist1d" else 128
    model = make_model("mlp", data.input_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = len(data.y_train)
    trackers = {"before": tracker_at(args.before)(n), "this tree": LossTracker(n)}
    names = list(trackers)
    in_loop: dict[str, list[float]] = {k: [] for k in names}
    reads: dict[str, list[float]] = {k: [] for k in names}
    step_us: list[float] = []
    k = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            t0 = time.perf_counter_ns()
            losses = nn.functional.cross_entropy(
                model(data.x_train.index_select(0, idx)), data.y_train[idx], reduction="none"
            )
            opt.zero_grad()
            losses.mean().backward()  # type: ignore[no-untyped-call]
            opt.step()
            t1 = time.perf_counter_ns()
            name = names[k % 2]  # the other one catches up below, outside the timing
            k += 1
            trackers[name].update(idx, losses.detach())
            t2 = time.perf_counter_ns()
            trackers[names[k % 2]].update(idx, losses.detach())
            in_loop[name].append((t2 - t1) / 1e3)
            step_us.append((t1 - t0) / 1e3)
        for name in names:  # the epoch's end: the sampler reads the state (and applies it)
            t0 = time.perf_counter_ns()
            _ = trackers[name].ema
            reads[name].append((time.perf_counter_ns() - t0) / 1e3)
    before, after = (trackers[k].state_dict() for k in names)
    for key in ("ema", "first", "last", "counts", "seen", "nonfinite"):
        assert torch.equal(before[key], after[key]), f"{key} not identical"
    steps = len(step_us)
    warm: dict[str, float] = {}
    batches = torch.randperm(n, generator=g)[: n - n % batch].reshape(-1, batch)
    losses = torch.rand(batches.shape, generator=g)
    for name in names:
        t0 = time.perf_counter_ns()
        for i in range(len(batches)):
            trackers[name].update(batches[i], losses[i])
        _ = trackers[name].ema
        warm[name] = (time.perf_counter_ns() - t0) / 1e3 / len(batches)
    print(f"{machine()}; torch {torch.__version__}, 1 thread")
    print(
        f"{args.task} MLP, batch {batch}, {args.epochs} epochs ({steps} steps): training step "
        f"median {statistics.median(step_us):.0f} µs; before = {short_rev(args.before)}"
    )
    print(
        "| tracker | update right after a step, median µs | the state read at each epoch's "
        "end, median µs | in all, µs a step | back to back, one epoch and a read, µs a batch |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        total = statistics.mean(in_loop[name]) + sum(reads[name]) / steps
        print(
            f"| {name} | {statistics.median(in_loop[name]):.1f} | "
            f"{statistics.median(reads[name]):.0f} | {total:.1f} | {warm[name]:.1f} |"
        )
    print("state after the run: bit-identical")


if __name__ == "__main__":
    main()
