"""What H3Profiler costs the training loop, measured side by side in one run.

1. ``log_batch`` on the calling thread: each call timed with perf_counter_ns (the timer's
   own cost, measured on an empty call, is subtracted), for a float loss, a 0-dim tensor, and
   a tensor with a 64-sample loss vector and indices; median and p99.
2. A real training loop (MLP on MNIST-1D, batch 64, one torch thread), epochs timed in
   interleaved order: unprofiled, profiled (H3Profiler, per-sample losses included), and
   logging through a synchronous HTTP POST per batch (what a naive client does). Medians
   over repeats and the ratio to unprofiled.

    PYTHONPATH=. python benchmarks/client_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import daemon, machine  # noqa: E402
from benchmarks._data import load  # noqa: E402
from h3client import H3Profiler  # noqa: E402


def per_call_ns(fn, n: int) -> list[int]:
    t = time.perf_counter_ns
    out = []
    for _ in range(n):
        a = t()
        fn()
        out.append(t() - a)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/client_overhead.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    calls = 20_000 if args.quick else 200_000
    repeats = 3 if args.quick else 9
    data = load("mnist1d")
    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon(Path(tmp), H3D_POWER_BACKENDS="estimated") as (url, token),
    ):
        rows = run_all(url, token, Path(tmp), data, calls, repeats)
    write(args, rows, calls, repeats)


def run_all(url: str, token: str, data_dir: Path, data, calls: int, repeats: int) -> dict:
    res: dict = {}
    empty = per_call_ns(lambda: None, calls)
    timer = statistics.median(empty)
    prof = H3Profiler("bench-log-batch", url=url, data_dir=data_dir, max_queue=10 * calls)
    scalar = torch.tensor(0.5)
    vec, idx = torch.rand(64), torch.arange(64)
    for name, fn in (
        ("float", lambda: prof.log_batch(0.5)),
        ("0-dim tensor", lambda: prof.log_batch(scalar)),
        ("tensor + 64 per-sample losses", lambda: prof.log_batch(scalar, losses=vec, indices=idx)),
    ):
        ns = [max(0, x - timer) for x in per_call_ns(fn, calls)]
        res[name] = (statistics.median(ns) / 1e3, pct(ns, 0.99) / 1e3)
        print(
            f"log_batch {name}: median {res[name][0]:.2f} µs, p99 {res[name][1]:.2f} µs", flush=True
        )
    prof.stop()

    x, y = data.x_train, data.y_train
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
    sync_run = http.post("/v1/runs", json={"name": "bench-sync"}).json()["id"]
    seq = {"n": 0}

    def epoch(log) -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            losses = nn.functional.cross_entropy(model(x[b]), y[b], reduction="none")
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            log(loss, losses, b)
        return time.perf_counter() - t0

    def sync_log(loss, losses, b) -> None:
        s = seq["n"]
        seq["n"] += 1
        http.post(
            f"/v1/runs/{sync_run}/batches",
            json={
                "batches": [
                    {
                        "seq": s,
                        "t": time.time(),
                        "loss": loss.item(),
                        "losses": losses.tolist(),
                        "indices": b.tolist(),
                    }
                ]
            },
        )

    prof = H3Profiler("bench-train", url=url, data_dir=data_dir)
    modes = {
        "unprofiled": lambda loss, losses, b: None,
        "H3Profiler": lambda loss, losses, b: prof.log_batch(loss, losses=losses, indices=b),
        "sync HTTP POST per batch": sync_log,
    }
    epoch(modes["unprofiled"])  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for r in range(repeats):
        # rotate the order so no mode always follows the HTTP-heavy one (whose daemon work
        # spills into the next epoch)
        for m in names[r % len(names) :] + names[: r % len(names)]:
            times[m].append(epoch(modes[m]))
        print(
            f"repeat {r + 1}/{repeats}: " + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in modes),
            flush=True,
        )
    prof.stop()
    http.close()
    res["epochs"] = times
    res["batches_per_epoch"] = (len(y) + 63) // 64
    return res


def write(args, res: dict, calls: int, repeats: int) -> None:
    base = statistics.median(res["epochs"]["unprofiled"])
    lines = [
        "# Client overhead benchmark",
        "",
        f"`PYTHONPATH=. python benchmarks/client_overhead.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}, {machine()}, torch {torch.__version__} with 1 thread, "
        "a real daemon on loopback (estimated CPU power backend). The machine was shared with other work.",
        "",
        f"**log_batch on the calling thread** ({calls:,} calls each, timer cost subtracted):",
        "",
        "| loss passed | median µs | p99 µs |",
        "|---|---:|---:|",
    ]
    for name in ("float", "0-dim tensor", "tensor + 64 per-sample losses"):
        med, p99 = res[name]
        lines.append(f"| {name} | {med:.2f} | {p99:.2f} |")
    lines += [
        "",
        f"**Training loop** (MLP 40-256-256-10 on MNIST-1D, {res['batches_per_epoch']} batches of 64 per epoch, "
        f"{repeats} interleaved repeats in rotating order, median epoch time):",
        "",
        "| logging | median epoch s | vs unprofiled |",
        "|---|---:|---:|",
    ]
    for m, ts in res["epochs"].items():
        med = statistics.median(ts)
        lines.append(f"| {m} | {med:.4f} | {100 * (med / base - 1):+.1f} % |")
    lines += [
        "",
        "Budgets (DESIGN.md §8): log_batch ≤ 5 µs median; profiler overhead ≤ 1 % of wall time.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
