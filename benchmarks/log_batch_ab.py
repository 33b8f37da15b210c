"""``log_batch`` and the sender, before and after a change, measured side by side in one run.

The h3client of a git revision (``--before``, default ``main``) and the worktree's are each run
in fresh subprocesses, alternately (A B A B ..., the order swapped every round), against one
real daemon on loopback. Each subprocess, with one torch thread:

0. queues 50 000 batches of fresh tensors (a requiring-grad loss, 64 per-sample losses, 64
   indices), the sender parked, and reports the RSS growth per queued batch;
1. times ``log_batch`` per call (perf_counter_ns around each call, the timer's own cost
   subtracted), the sender parked;
2. times ``log_batch`` as ``client_overhead.py`` does: one profiler, ``--calls`` calls of each
   kind in turn (a float; a 0-dim tensor; a tensor with 64 per-sample losses and 64 indices,
   the same tensors every call; the same, requiring grad), its sender posting meanwhile;
3. times the per-sample call while the sender converts and posts a backlog of 60 000 such
   batches (only the calls made while it was busy);
4. trains an MLP (batch 64, random data) for ``--epochs`` epochs unprofiled and as many
   logging the loss, per-sample losses and indices each step, alternating: the profiler's
   overhead on the training loop.

Medians per subprocess, then the median over rounds; the ratio after/before is the figure to
read on a shared machine. Then the sender's conversion (``encode_batches``, and with gzip) of
2 000 batches as each version's ``log_batch`` queues them, both versions in one process,
interleaved: batches/s. Writes ``benchmarks/results/local/log_batch_ab.md`` (``--out`` elsewhere).

    PYTHONPATH=. python benchmarks/log_batch_ab.py [--before REV] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402
    add_out,
    daemon,
    extract,
    machine,
    short_rev,
    write_report,
)

KINDS = (
    "float",
    "0-dim tensor",
    "tensor + 64 per-sample losses + 64 indices",
    "same, requiring grad (a training loop's)",
    "tensor + 64 per-sample losses + 64 indices, sender busy",
    "same, requiring grad, sender parked",
)

# Runs inside each subprocess, against whichever h3client is first on its sys.path.
WORKER = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
import h3client
from h3client import H3Profiler

url, data_dir, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter_ns

def per_call(fn, n):
    out = []
    for _ in range(n):
        a = t(); fn(); out.append(t() - a)
    return out

timer = statistics.median(per_call(lambda: None, calls))
scalar, vec, idx = torch.tensor(0.5), torch.rand(64), torch.arange(64)
w = torch.randn(64, requires_grad=True)
glosses = w * 2
gloss = glosses.mean()
res = {"h3client": h3client.__file__}

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def discard(prof):
    # end a profiler without sending its backlog (a benchmark's shortcut, not an API)
    proc = prof._proc
    prof._accepting = False
    with proc._lock:
        proc._abandoned = True
        proc.batches.clear()
    proc._exit = True
    proc._wake.set()
    proc._thread.join(60)

def calls_for(prof):
    return {
        "float": lambda: prof.log_batch(0.5),
        "0-dim tensor": lambda: prof.log_batch(scalar),
        "tensor + 64 per-sample losses + 64 indices":
            lambda: prof.log_batch(scalar, losses=vec, indices=idx),
        "same, requiring grad (a training loop's)":
            lambda: prof.log_batch(gloss, losses=glosses, indices=idx),
    }
# 0. memory, first, in a fresh process: 50 000 batches of fresh tensors, as a training loop makes them, queued
prof = H3Profiler("ab-memory", url=url, data_dir=data_dir, flush_interval_s=3600,
                  max_batch=10**9, max_queue=10**6)
m0 = rss()
for _ in range(50_000):
    fl = w * 2
    prof.log_batch(fl.mean(), losses=fl, indices=torch.arange(64))
res["bytes per queued batch"] = (rss() - m0) / 50_000
discard(prof)

# 1. the sender parked: the call alone, and the memory a queued batch holds
prof = H3Profiler("ab-parked", url=url, data_dir=data_dir, flush_interval_s=3600,
                  max_batch=10**9, max_queue=10**6)
fn = calls_for(prof)["same, requiring grad (a training loop's)"]
ns = [max(0.0, x - timer) for x in per_call(fn, 50_000)]
res["same, requiring grad, sender parked"] = statistics.median(ns) / 1e3
discard(prof)

# 2. as client_overhead.py measures it: one profiler, `calls` calls of each kind in turn,
#    its sender posting what piles up (every second) meanwhile
prof = H3Profiler("ab", url=url, data_dir=data_dir, max_queue=10 * calls)
for kind, fn in calls_for(prof).items():
    ns = [max(0.0, x - timer) for x in per_call(fn, calls)]
    res[kind] = statistics.median(ns) / 1e3
assert prof.log_errors == 0
discard(prof)

# 3. the same call while the sender converts and posts a backlog of 60 000 such batches
prof = H3Profiler("ab-busy", url=url, data_dir=data_dir, max_queue=10**6)
proc = prof._proc
fn = calls_for(prof)["tensor + 64 per-sample losses + 64 indices"]
for _ in range(60_000):
    fn()
proc._wake.set()
while not proc._busy:
    time.sleep(0.001)
busy = []
while proc._busy and len(busy) < calls:
    a = t(); fn(); busy.append(max(0.0, t() - a - timer))
res["tensor + 64 per-sample losses + 64 indices, sender busy"] = statistics.median(busy) / 1e3
res["busy calls"] = len(busy)
discard(prof)

# 4. a training loop logging per-sample losses and indices: epochs unprofiled and profiled,
#    alternating (the order swapped every repeat), the profiler's sender posting meanwhile
from torch import nn
g = torch.Generator().manual_seed(0)
x, y = torch.randn(8000, 40, generator=g), torch.randint(0, 10, (8000,), generator=g)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
prof = H3Profiler("ab-train", url=url, data_dir=data_dir)

def epoch(profiled):
    t0, c0 = time.perf_counter(), time.thread_time()
    perm = torch.randperm(len(y))
    for i in range(0, len(perm), 64):
        b = perm[i : i + 64]
        losses = nn.functional.cross_entropy(model(x[b]), y[b], reduction="none")
        loss = losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if profiled:
            prof.log_batch(loss, losses=losses, indices=b)
    return time.perf_counter() - t0, time.thread_time() - c0

epoch(False)
epoch(True)
times = {False: [], True: []}
for r in range(int(sys.argv[4])):
    for mode in ((False, True) if r % 2 == 0 else (True, False)):
        times[mode].append(epoch(mode))
r = prof.stop(timeout_s=300, report=False)
assert r["batches_posted"] == r["batches_logged"] and prof.log_errors == 0, r
wall = {m: [w for w, _ in ts] for m, ts in times.items()}
cpu = {m: [c for _, c in ts] for m, ts in times.items()}
res["steps/s"] = 125 / statistics.median(wall[False])
res["paired overhead %"] = 100 * statistics.median(
    b / a - 1 for a, b in zip(wall[False], wall[True]))
res["total overhead %"] = 100 * (sum(wall[True]) / sum(wall[False]) - 1)
res["thread CPU overhead %"] = 100 * (sum(cpu[True]) / sum(cpu[False]) - 1)
print(json.dumps(res))
"""


# The sender's conversion, both versions in one process, interleaved: the old module is loaded
# from the extracted tree under another name (it imports only h3client._exporter, unchanged).
SENDER = r"""
import gzip, importlib.util, json, statistics, sys, time
import torch
torch.set_num_threads(1)
from h3client import _batching as after
spec = importlib.util.spec_from_file_location("before_batching", sys.argv[1])
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
reps = int(sys.argv[2])

def queued(mod):  # what that version's log_batch queues, for 2 000 training-loop batches
    keep = getattr(mod, "snapshot", None) or mod.off_device
    keep_loss = getattr(mod, "snapshot_loss", None) or mod.off_device
    w = torch.randn(64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    out = []
    for k in range(2000):
        fl = w * (1 + k / 2000)
        out.append((k, 1.7e9 + k / 1000, keep_loss(fl.mean()), keep(fl),
                    keep(torch.arange(64) + k), None, 0, None, None))
    return out

items = {"before": queued(before), "after": queued(after)}
mods = {"before": before, "after": after}
from h3client.client import columns_as_json
def utf8(body):  # a body is JSON text, str or (since the sender builds it as bytes) bytes
    return body.encode() if isinstance(body, str) else body

def as_json(req):  # what a request says, whichever form it travels in (the binary form too)
    return json.loads(columns_as_json(req.body) if getattr(req, "binary", False) else req.body)

bodies = {arm: as_json(mods[arm].encode_batches(items[arm])[0]) for arm in mods}
assert bodies["before"] == bodies["after"], "the two versions send different batches"
t = {k: [] for k in ("before", "after", "before+gzip", "after+gzip")}
for r in range(reps):
    for arm in (("before", "after") if r % 2 == 0 else ("after", "before")):
        a = time.perf_counter()
        req, _ = mods[arm].encode_batches(items[arm])
        b = time.perf_counter()
        gzip.compress(utf8(req.body), compresslevel=1)
        c = time.perf_counter()
        t[arm].append(b - a)
        t[arm + "+gzip"].append(c - a)
print(json.dumps({k: 2000 / statistics.median(v) for k, v in t.items()}))
"""


def run(tree: Path, url: str, data_dir: Path, calls: int, epochs: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("H3D_")}
    env["PYTHONPATH"] = str(tree)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, url, str(data_dir), str(calls), str(epochs)],
        env=env, cwd=tree, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert res["h3client"].startswith(str(tree)), res["h3client"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", default="main", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=30, help="training epochs per mode")
    add_out(ap, "log_batch_ab.md")
    args = ap.parse_args()
    rev, head = short_rev(args.before), short_rev()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "h3client"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        before = extract(rev, Path(tmp) / "before", "h3client")
        trees = {"before": before, "after": REPO}
        results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        with daemon(Path(tmp) / "data", H3D_POWER_BACKENDS="estimated") as (url, _token):
            for r in range(args.rounds):
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for arm in order:
                    results[arm].append(
                        run(trees[arm], url, Path(tmp) / "data", args.calls, args.epochs)
                    )
                print(
                    f"round {r + 1}/{args.rounds}: "
                    + "; ".join(
                        f"{arm} {results[arm][-1][KINDS[2]]:.2f}/{results[arm][-1][KINDS[4]]:.2f} µs"
                        for arm in ("before", "after")
                    ),
                    flush=True,
                )
        snd = json.loads(
            subprocess.run(
                [sys.executable, "-c", SENDER, str(before / "h3client/_batching.py"), "41"],
                cwd=REPO, check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            ).stdout.strip().splitlines()[-1]
        )  # fmt: skip
    load1 = os.getloadavg()
    med = {
        arm: {
            k: statistics.median(x[k] for x in rs)
            for k in (
                *KINDS,
                "bytes per queued batch",
                "steps/s",
                "paired overhead %",
                "total overhead %",
                "thread CPU overhead %",
            )
        }
        for arm, rs in results.items()
    }
    busy_calls = min(x["busy calls"] for rs in results.values() for x in rs)
    lines = [
        "# log_batch and the sender, before and after, side by side",
        "",
        f"`PYTHONPATH=. python benchmarks/log_batch_ab.py --before {args.before} --rounds "
        f"{args.rounds} --calls {args.calls}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{machine()}; torch with 1 thread; a real daemon on loopback. Before: h3client at "
        f"{rev}; after: at {head}{' plus uncommitted changes' if dirty else ''}. The two run in "
        f"alternate subprocesses ({args.rounds} rounds, order swapped every round); each figure "
        "is the median over rounds of each subprocess's median. The machine was shared: load "
        f"average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end, on 2 cores, so read "
        "the ratios, not the absolute figures.",
        "",
        f"**`log_batch` per call** (µs, {args.calls:,} calls per kind per subprocess; sender "
        f"busy: at least {busy_calls:,} calls while it converted and posted a 60 000-batch backlog):",
        "",
        "| call | before µs | after µs | after / before |",
        "|---|---:|---:|---:|",
    ]
    for k in KINDS:
        b, a = med["before"][k], med["after"][k]
        lines.append(f"| {k} | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    lines += [
        "",
        "**Sender CPU** (batches/s converting one request of 2 000 training-loop batches "
        "(a requiring-grad loss, 64 per-sample losses, 64 indices) as each version's "
        "`log_batch` queues them; both versions in one process, 41 interleaved repeats, "
        "medians; the two produce the same request body, byte for byte):",
        "",
        "| step | before | after | after / before |",
        "|---|---:|---:|---:|",
    ]
    for k, label in (("", "encode"), ("+gzip", "encode + gzip (the sender's whole CPU)")):
        b, a = snd["before" + k], snd["after" + k]
        lines.append(f"| {label} | {b:,.0f} | {a:,.0f} | {a / b:.2f} |")
    b, a = med["before"]["bytes per queued batch"], med["after"]["bytes per queued batch"]
    lines += [
        "",
        "**Memory**: a queued batch (a requiring-grad loss, 64 per-sample losses and 64 "
        "indices, fresh tensors every batch as in a training loop; the process's RSS growth "
        f"over 50 000 batches queued while the sender is parked) holds {b:,.0f} bytes before "
        f"and {a:,.0f} bytes after.",
    ]
    lines += [
        "",
        f"**Training loop** (MLP 40-128-128-10, batch 64, 125 steps per epoch on random data, "
        f"logging the loss, 64 per-sample losses and the indices each step; {args.epochs} "
        "epochs unprofiled and as many profiled per subprocess, alternating. Overhead of the "
        "profiled epochs: the median over epoch pairs of profiled / unprofiled − 1; their total "
        "wall time over the unprofiled total − 1 (this one includes the sender's bursts, "
        "which a median of epochs can miss); and the training thread's CPU time "
        "(`time.thread_time`, insensitive to other processes, blind to waits for the GIL). "
        "Medians over rounds, each round's figure after the slash):",
        "",
        "| h3client | steps/s unprofiled | paired wall | total wall | training thread CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in ("before", "after"):
        m, rs = med[arm], results[arm]

        def col(key: str, m: dict[str, float] = m, rs: list[dict[str, Any]] = rs) -> str:
            return f"{m[key]:+.2f} % / " + ", ".join(f"{x[key]:+.1f}" for x in rs)

        lines.append(
            f"| {arm} | {m['steps/s']:,.0f} | {col('paired overhead %')} | "
            f"{col('total overhead %')} | {col('thread CPU overhead %')} |"
        )
    lines += [
        "",
        "Budgets (issue 17): `log_batch` ≤ 5 µs median with per-sample tensors, also while the "
        "sender is busy; sender ≥ 20 000 batches/s; profiler overhead ≤ 0.5 % of wall time.",
    ]
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
