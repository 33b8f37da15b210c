"""What H3Profiler costs a training step, in instructions: a figure the host's noise cannot move.

``client_overhead.py`` times the profiler on a real training loop, but on these shared 2-core
hosts the rounds of one run spread over 3 to 24 points, so a 0.5 % budget cannot be resolved
by the clock. This script counts instead. The same training loop as ``client_overhead.py``
(MLP 40-256-256-10 on MNIST-1D, batch 64, one torch thread, Adam) runs under
``valgrind --tool=callgrind --separate-threads=yes``, which counts every instruction each
thread executes, the same count for the same binary and inputs whatever else the machine is
doing. Each logging mode runs twice, for ``--short`` and for ``--long`` steps, so that
everything the two runs share (the interpreter, ``import torch``, the profiler's start and
stop) cancels:

    instructions per step = (count(long) - count(short)) / (long - short)

for the training thread (the one that calls ``log_batch``) and for every other thread of the
process together (the sender; with one torch, OpenMP and BLAS thread, nothing else). The modes: unprofiled;
``H3Profiler`` logging the mean loss only; logging the loss, 64 per-sample losses and 64
indices, as the README's quick start does; and a control, the unprofiled loop with a second
thread that only waits (what any process with a second thread pays: one with a CUDA context or
an intra-op thread pool has them already). The profiler posts to a real daemon on loopback
(run natively, not counted).

Requests. Under valgrind a step takes tens of times as long, so the sender, which posts once
a second (``flush_interval_s``), would post after every few steps instead of every 500-2 000:
each profiler here posts every ``--batch`` batches instead (``max_batch``, the flush interval
set out of reach). A request may cost each thread a fixed part whatever it carries (on the
sender, the HTTP exchange; on the training thread, whatever the sender's turn costs it), so
each profiled mode runs at two request sizes, 100 and 1 000 batches by default; the sender's
requests are counted, and the two long-minus-short differences solve for a part per batch
and a part per request, on each thread. The report puts them together at the batches a
request of a native run carries: the loop is timed natively first (steps a second, capped at
``max_batch``, 2 000). The default run (12 valgrind processes, two at a time) takes about
half an hour.

The objects made before the loop (torch's among them) are frozen out of the cyclic
garbage collector: a full collection walks them all, about 0.2 G instructions, paid by
whichever thread's allocation triggers it, which made one run's training thread pay it and
the next's not.

What the counts mean, and what they do not:

- the training thread's extra instructions per step over the control's are the work the
  profiler adds to the loop's thread, as a share of a step's instructions: ``log_batch``'s, and
  a part per request if any (the split says);
- the other threads' are the sender's conversion and posting, which a second core runs in
  parallel (on one core they would add to the step's time);
- an instruction is not a nanosecond: a call after a training step misses caches the step
  evicted, and ``client_overhead.py``'s timed in-loop call (0.56 % of a step on a quiet
  host) is the cost in time. What valgrind counts is the work, free of the host's noise, and
  a change to ``log_batch`` or the sender shows here as a difference of instructions;
- valgrind's CPU has no AVX-512: torch runs its AVX2 kernels under it, so a step counts the
  instructions of an AVX2 host.

``--before REV`` counts the h3client of a git revision too (the same loop, the same daemon),
for a change's A/B. Writes ``benchmarks/results/local/client_instructions.md``.

    PYTHONPATH=. python benchmarks/client_instructions.py [--before REV] [--short 100] [--long 500]
"""

from __future__ import annotations

import argparse
import compileall
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402
    add_out,
    command,
    daemon,
    extract,
    machine,
    short_rev,
    write_report,
)

MODES = {
    "unprofiled": "unprofiled",
    "idle-thread": "unprofiled, with a second thread that waits (no profiler)",
    "mean": "H3Profiler, mean loss only",
    "per-sample": "H3Profiler, loss + 64 per-sample losses + 64 indices",
}
#: The modes without a profiler: run for this tree only.
CONTROLS = ("unprofiled", "idle-thread")

# Runs under valgrind, against whichever h3client is first on its sys.path.
WORKER = r"""
import gc
import json
import sys
import time
import torch
from torch import nn
torch.set_num_threads(1)
torch.set_flush_denormal(True)
mode, steps, data, url, data_dir, batch = sys.argv[1:7]
steps, batch = int(steps), int(batch)
x, y = torch.load(data)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
prof = None
if mode == "idle-thread":
    import threading
    # the control: a second thread that only waits, as the profiler's sender does between
    # requests; what the training thread pays for it is the cost of a process having two
    # threads at all, which any process with a CUDA context or an intra-op pool pays too
    threading.Thread(target=threading.Event().wait, daemon=True).start()
elif mode != "unprofiled":
    import h3client.client
    from h3client import H3Profiler
    # the HTTP stack is imported once, by whichever thread needs it first: here, so that its
    # import (about 0.5 G instructions under valgrind) is never counted on one thread in one
    # run and on another in the next
    getattr(h3client.client, "load_http_stack", lambda: None)()
    prof = H3Profiler(f"instructions-{mode}", url=url, data_dir=data_dir, max_batch=batch,
                      flush_interval_s=1e6)
    prof.start()
    # the requests the sender makes (create, batches, update), counted: a request costs both
    # threads a fixed part whatever the batches it carries (see the docstring)
    sent = [0]
    exporter = prof._proc.exporter
    def counted(req, _send=exporter.send):
        sent[0] += 1
        return _send(req)
    exporter.send = counted
per_sample = mode == "per-sample"
# A full collection walks every object alive, torch's included: about 0.2 G instructions here,
# paid by whichever thread's allocation triggers it, so one run counted it on the training
# thread where the next did not. The objects made so far are left out of collections
# (gc.freeze): a collection still walks everything made from here on, the profiler's included.
gc.collect()
gc.freeze()
perm = torch.randperm(len(y))
i = 0
t0 = time.perf_counter()
for _ in range(steps):
    if i + 64 > len(perm):
        perm, i = torch.randperm(len(y)), 0
    b = perm[i : i + 64]
    i += 64
    losses = nn.functional.cross_entropy(model(x[b]), y[b], reduction="none")
    loss = losses.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if per_sample:
        prof.log_batch(loss, losses=losses, indices=b)
    elif prof is not None:
        prof.log_batch(loss)
loop_s = time.perf_counter() - t0
if prof is not None:
    r = prof.stop()
    assert r["batches_posted"] == steps, r
print(json.dumps({"steps_per_s": steps / loop_s, "requests": sent[0] if prof else 0}))
"""


def thread_counts(prefix: Path) -> dict[int, int]:
    """Instructions per thread, from callgrind's per-thread files ``<prefix>-NN``."""
    out = {}
    for f in prefix.parent.glob(prefix.name + "-*"):
        m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.M)
        if m:
            out[int(f.name.rsplit("-", 1)[1])] = int(m.group(1))
    return out


#: The valgrind processes running: killed when the run is interrupted (Ctrl-C, SIGTERM), so
#: that none of them, nor a queued one, outlives it.
RUNNING: set[subprocess.Popen[str]] = set()
STARTING = threading.Lock()  # held while one is started; an interrupted run starts none after
STOPPED = threading.Event()


def count(
    tree: Path, mode: str, steps: int, data: Path, url: str, data_dir: Path, batch: int, tmp: Path
) -> dict[str, int]:
    """One run under callgrind: the training thread's and the other threads' instructions."""
    prefix = tmp / f"cg-{tree.name}-{mode}-{batch}-{steps}"
    with STARTING:
        if STOPPED.is_set():
            raise SystemExit("interrupted")
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                # valgrind runs one thread at a time; its default lock is unfair, and under it
                # the sender waited 35-50 s for each step of a request while the training
                # thread ran (the daemon closed the connection, silent for 10 s): a ticket
                # lock hands the threads their turns as the GIL asks
                "--fair-sched=yes",
                f"--callgrind-out-file={prefix}",
                sys.executable,
                "-c",
                WORKER,
                mode,
                str(steps),
                str(data),
                url,
                str(data_dir),
                str(batch),
            ],
            # one BLAS thread: numpy's OpenBLAS otherwise keeps a server thread whose idle
            # loop counts instructions by the second, not by the step
            env={
                "PYTHONPATH": str(tree),
                "PYTHONHASHSEED": "0",
                "PATH": "/usr/bin:/bin",
                "PYTHONDONTWRITEBYTECODE": "1",  # compiled up front (see main)
                "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        RUNNING.add(proc)
    try:
        out, err = proc.communicate()
    finally:
        RUNNING.discard(proc)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} ({steps} steps) under valgrind failed:\n{err[-3000:]}")
    threads = thread_counts(prefix)
    requests = json.loads(out.strip().splitlines()[-1])["requests"]
    return {"training": threads.pop(1), "other": sum(threads.values()), "requests": requests}


def native_rate(data: Path, steps: int = 3000) -> float:
    """Steps a second of the unprofiled loop run natively (not under valgrind), this host."""
    out = subprocess.run(
        [sys.executable, "-c", WORKER, "unprofiled", str(steps), str(data), "-", "-", "0"],
        env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["steps_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(prog="client_instructions.py", description=__doc__.split("\n")[0])
    ap.add_argument("--short", type=int, default=100, help="steps of the short run")
    ap.add_argument("--long", type=int, default=500, help="steps of the long run")
    ap.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[100, 1000],
        help="batches a request carries, one set of runs for each (see the docstring)",
    )
    ap.add_argument("--before", help="also count the h3client of this git revision")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="the modes to count (all by default; unprofiled always)",
    )
    add_out(ap, "client_instructions.md")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if args.long <= args.short:
        raise SystemExit("--long must be more steps than --short")
    args.modes = [m for m in MODES if m in args.modes or m == "unprofiled"]

    import torch

    from benchmarks._data import load_mnist1d

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        split = load_mnist1d()
        data = tmp / "mnist1d.pt"
        torch.save((split.x_train, split.y_train), data)
        rate = native_rate(data)  # before the valgrinds take the cores
        # this tree's h3client as it is now (an edit during the half hour of the run
        # changes nothing), and every tree byte-compiled up front: a run that found no
        # up-to-date .pyc compiled the module's source, tens of M instructions counted on
        # whichever run (long or short) got there first
        this = tmp / "this"
        shutil.copytree(
            REPO / "h3client", this / "h3client", ignore=shutil.ignore_patterns("__pycache__")
        )
        trees = {"this tree": this}
        if args.before:
            trees[f"before ({short_rev(args.before)})"] = extract(
                args.before, tmp / "before", "h3client"
            )
        for tree in trees.values():
            compileall.compile_dir(tree / "h3client", quiet=1)
        data_dir = tmp / "data"
        data_dir.mkdir()
        # (tree, mode, batches a request, steps); the controls send nothing: run once
        jobs: list[Job] = [
            (name, mode, batch, steps)
            for name in trees
            for mode in args.modes
            if name == "this tree" or mode not in CONTROLS
            for batch in ([0] if mode in CONTROLS else args.batch)
            for steps in (args.long, args.short)  # the long runs first: fewer idle cores
        ]
        with daemon(data_dir) as (url, _token):
            pool = ThreadPoolExecutor(args.jobs)
            try:
                futures = {
                    job: pool.submit(
                        count, trees[job[0]], job[1], job[3], data, url, data_dir, job[2], tmp
                    )
                    for job in jobs
                }
                counts = {job: f.result() for job, f in futures.items()}
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                with STARTING:
                    STOPPED.set()
                    for proc in RUNNING:
                        proc.kill()
                raise
            pool.shutdown()
    write(ap, args, started, rate, counts)


#: (tree, mode, batches a request (0 for the controls), steps)
Job = tuple[str, str, int, int]


def delta(
    args: Any, counts: dict[Job, dict[str, int]], name: str, mode: str, batch: int, k: str
) -> int:
    """What the long run of (``name``, ``mode``, ``batch``) counted of ``k`` (a thread's
    instructions, or the requests) more than its short run."""
    return counts[name, mode, batch, args.long][k] - counts[name, mode, batch, args.short][k]


def split_costs(
    args: Any, counts: dict[Job, dict[str, int]], name: str, mode: str
) -> dict[str, dict[str, float]] | None:
    """A profiled mode's work split into a part per batch and a part per request, for each
    thread, from its runs at two request sizes (the largest and the smallest): each long run
    minus its short run is (long - short) batches and some requests more, and the two
    differences solve for both parts. None with one request size, or if the two sizes made
    the same number of requests more."""
    sizes = sorted(b for (n, m, b, st) in counts if n == name and m == mode and st == args.long)
    if len(sizes) < 2:
        return None

    def more(batch: int, k: str) -> int:
        return delta(args, counts, name, mode, batch, k)

    small, large = sizes[0], sizes[-1]
    dreq = more(small, "requests") - more(large, "requests")
    if dreq == 0:
        return None
    out: dict[str, dict[str, float]] = {}
    for k in ("training", "other"):
        per_request = (more(small, k) - more(large, k)) / dreq
        per_batch = (more(large, k) - per_request * more(large, "requests")) / (
            args.long - args.short
        )
        out[k] = {"batch": per_batch, "request": per_request}
    return out


def write(
    ap: argparse.ArgumentParser,
    args: Any,
    started: str,
    rate: float,
    counts: dict[Job, dict[str, int]],
) -> None:
    def per_step(name: str, mode: str, batch: int) -> dict[str, float]:
        steps = args.long - args.short
        return {k: delta(args, counts, name, mode, batch, k) / steps for k in ("training", "other")}

    base = per_step("this tree", "unprofiled", 0)
    idle = per_step("this tree", "idle-thread", 0) if "idle-thread" in args.modes else None
    step = base["training"] + base["other"]
    # batches a request of a native run of this loop carries: the sender posts once a
    # second (flush_interval_s) or at max_batch (2 000), whichever comes first
    native = min(2000, max(1, round(rate)))

    def pct(extra: float) -> str:
        return f"{extra:+,.0f} (**{100 * extra / step:+.3f} %**)"

    lines = [
        "# Client overhead in instructions",
        "",
        f"`{command(ap, args)}` at {short_rev(check=False) or '?'} on {started}, "
        f"{machine()}, under valgrind's callgrind. Instructions per training step: "
        f"(count over {args.long} steps − count over {args.short}) / {args.long - args.short}, "
        "per thread. The same loop runs natively here at "
        f"{rate:,.0f} steps/s: a request of a native run carries {native:,} batches.",
        "",
        "| tree | logging | batches a request | requests, long − short | training thread, per "
        "step | over unprofiled | over the idle-thread control | other threads (the sender), "
        "per step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mode, batch, steps in counts:
        if steps != args.long:
            continue
        c = per_step(name, mode, batch)
        dreq = delta(args, counts, name, mode, batch, "requests")
        lines.append(
            f"| {name} | {MODES[mode]} | {batch or '—'} | {dreq if batch else '—'} | "
            f"{c['training']:,.0f} | "
            + ("—" if mode == "unprofiled" else pct(c["training"] - base["training"]))
            + " | "
            + (pct(c["training"] - idle["training"]) if idle and mode not in CONTROLS else "—")
            + f" | {c['other']:,.0f} |"
        )
    lines += [
        "",
        "Over unprofiled: the extra instructions per step as a share of an unprofiled step's. "
        "The idle-thread control is the unprofiled loop with a second thread that only "
        "waits: what the training thread pays over it is the profiler's work there, less what "
        "any process with a second thread pays (a CUDA context or an intra-op thread pool has "
        "them already).",
        "",
    ]
    profiled = dict.fromkeys((name, mode) for name, mode, _, _ in counts if mode not in CONTROLS)
    split = {(name, mode): split_costs(args, counts, name, mode) for name, mode in profiled}
    if any(split.values()):
        ref = idle or base
        lines += [
            "Each profiled mode's work split into a part per batch and a part per request "
            "(solved from its two request sizes), and the two put together at a native run's "
            f"{native:,} batches a request: the profiler's work per step of this loop as it "
            "runs outside valgrind. Budget (DESIGN.md §8): profiler overhead ≤ 0.5 % of a "
            "step's wall time. With a core to spare the sender runs beside the training "
            "thread, which pays its own column; on a single core the step pays both.",
            "",
            "| tree | logging | training thread: per batch (over the control) / per request "
            "| sender: per batch "
            "/ per request | training thread, per step over the "
            + ("idle-thread control" if idle else "unprofiled loop")
            + " | sender, per step | both |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for (name, mode), sp in split.items():
            if sp is None:
                continue
            # (the training thread's per-batch part includes the step: the control's is
            # taken off)
            batch_part = sp["training"]["batch"] - ref["training"]
            train = batch_part + sp["training"]["request"] / native
            sender = sp["other"]["batch"] + sp["other"]["request"] / native
            lines.append(
                f"| {name} | {MODES[mode]} | {batch_part:,.0f} / "
                f"{sp['training']['request']:,.0f} | {sp['other']['batch']:,.0f} / "
                f"{sp['other']['request']:,.0f} | {pct(train)} | {pct(sender)} | "
                f"{pct(train + sender)} |"
            )
        lines.append("")
    lines += [
        "The counts each figure comes from (instructions per process, all of it: the "
        "interpreter, the imports, the profiler's start and stop) and the requests the sender "
        "made (the run's create and final update included):",
        "",
        "| tree | logging | batches a request | steps | training thread | other threads | "
        "requests |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, mode, batch, steps), n in sorted(counts.items()):
        lines.append(
            f"| {name} | {MODES[mode]} | {batch or '—'} | {steps} | {n['training']:,} | "
            f"{n['other']:,} | {n['requests']} |"
        )
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
