"""What other CPU work on the machine costs a training loop that never shares its core.

The loop of ``client_overhead.py`` (MLP 40-256-256-10, batch 64, 125 steps an epoch, one
torch thread) is pinned to CPU 0. Beside it, per mode, a process spins for a share of every
10 ms and sleeps for the rest: on CPU 1 (another core) at 5 % and 20 % duty, and on CPU 0
itself at 5 %. The modes alternate round by round; each round's epoch median is compared
with the same round's median without a spinner. This is the question behind the profiler's
overhead: its daemon and its sender run on the other core, so is their CPU time free to the
training thread? (Linux only: CPU affinity.)

    PYTHONPATH=. python benchmarks/contention.py --rounds 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from benchmarks._common import command, machine

SPINNER = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
duty, period = float(sys.argv[1]), 0.01
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < duty * period:
        pass
    time.sleep(period * (1 - duty))
"""

#: mode -> (duty, cpu) of the spinner; None: no spinner
MODES: dict[str, tuple[float, int] | None] = {
    "nothing else": None,
    "other core, 5 % duty": (0.05, 1),
    "other core, 20 % duty": (0.2, 1),
    "same core, 5 % duty": (0.05, 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=20, help="epochs per mode and round")
    args = ap.parse_args()
    if not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit(
            "contention.py needs CPUs 0 and 1 (the loop on one, the spinner on the other)"
        )
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    x, y = torch.randn(8000, 40), torch.randint(0, 10, (8000,))
    model = nn.Sequential(
        nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch() -> float:
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    for _ in range(20):  # warm up
        epoch()
    medians: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode, spin in MODES.items():
            proc = None
            if spin is not None:
                argv = [sys.executable, "-c", SPINNER, str(spin[0]), str(spin[1])]
                proc = subprocess.Popen(argv)
                time.sleep(0.2)  # the spinner is running
            try:
                medians[mode].append(statistics.median(epoch() for _ in range(args.epochs)))
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    base = medians["nothing else"]
    print(
        f"`{command(ap, args)}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end.\n"
    )
    print("| beside the loop | median epoch ms | vs nothing else (median of rounds) |")
    print("|---|---:|---:|")
    for mode, ms in medians.items():
        ratio = statistics.median(a / b - 1 for a, b in zip(ms, base, strict=True))
        shown = "—" if MODES[mode] is None else f"{100 * ratio:+.2f} %"
        print(f"| {mode} | {1e3 * statistics.median(ms):.2f} | {shown} |")


if __name__ == "__main__":
    main()
