"""``LossTracker.update`` in a training loop, this tree against a git revision's.

Right after a training step, every tensor operation pays its dispatch at full price (the step
has evicted what it runs on), so an update's cost in a loop is set by how many operations it
makes, not by its arithmetic. This trains a small model and calls one of the two trackers'
``update`` right after each step, alternating step by step, and times the call; then the same
calls back to back (warm). Both trackers must hold bit-identical state at the end.

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
    ap.add_argument("--before", default="fef4450", help="the revision to compare with")
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
    assert torch.equal(trackers["before"]._state, trackers["this tree"]._state), "not identical"
    warm: dict[str, list[float]] = {k: [] for k in names}
    idx = torch.randperm(n, generator=g)[:batch]
    losses = torch.rand(batch, generator=g)
    for _ in range(2000):
        for name in names:
            t0 = time.perf_counter_ns()
            trackers[name].update(idx, losses)
            warm[name].append((time.perf_counter_ns() - t0) / 1e3)
    print(f"{machine()}; torch {torch.__version__}, 1 thread")
    print(
        f"{args.task} MLP, batch {batch}, {args.epochs} epochs: training step median "
        f"{statistics.median(step_us):.0f} µs; before = {short_rev(args.before)}"
    )
    print("| tracker | update right after a step, median µs | back to back (warm), median µs |")
    print("|---|---:|---:|")
    for name in names:
        print(
            f"| {name} | {statistics.median(in_loop[name]):.1f} | {statistics.median(warm[name]):.1f} |"
        )
    print("state after the run: bit-identical")


if __name__ == "__main__":
    main()
