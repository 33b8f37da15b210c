"""What H3Profiler costs the training loop, and how fast its sender is, measured side by side.

1. ``import h3client`` over a bare interpreter: wall time of ``python -c "import h3client"``
   against ``python -c "pass"`` (and ``import httpx`` for scale), processes interleaved,
   medians; plus the cumulative figure ``python -X importtime`` reports for h3client.
2. ``log_batch`` on the calling thread: each call timed with perf_counter_ns (the timer's own
   cost, measured on an empty call, is subtracted), for a float loss, a 0-dim tensor, and a
   tensor with a 64-sample loss vector and indices; median and p99. Then the same tensor
   call while the sender thread is busy converting and posting a backlog (GIL contention
   included), counting only the calls made while it was busy.
3. Sender throughput in batches/s for floats, 0-dim tensors and tensors with 64 per-sample
   losses and indices: the conversion of a 2 000-batch request alone (encode: the sender's
   whole CPU cost for a daemon on loopback; encode + gzip: for a daemon on another machine),
   and end to end against a real daemon (log 20 000, ``stop()``; batches over the time from
   the first log to ``stop()`` returning).
4. A real training loop (MLP on MNIST-1D, batch 64, one torch thread, about 1 000 steps/s)
   that logs per-sample losses and indices: rounds of one block of epochs per mode
   (unprofiled, profiled, and a synchronous HTTP POST per batch, what a naive client does) in
   rotating order, a block lasting ``--block-s`` seconds so that the sender posts about once
   a second of the mode's training, as in a run; the sender paused outside its mode's blocks
   so that its work is charged to them; the median over rounds of each block's ratio to its
   round's unprofiled block. Plus the CPU
   share of the training thread, the sender thread and the daemon. ``--diagnose`` adds three
   modes that take the overhead apart: ``log_batch`` alone (its sender held), the sender
   converting to a null sink, and the mean loss only.

    PYTHONPATH=. python benchmarks/client_overhead.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402
    add_out,
    bytecode_cached_env,
    command,
    daemon,
    machine,
    write_report,
)
from benchmarks._data import load  # noqa: E402
from h3client import H3Profiler  # noqa: E402
from h3client._batching import encode_batches, snapshot  # noqa: E402

KINDS = ("float", "0-dim tensor", "tensor + 64 per-sample losses")


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


def import_times(runs: int) -> dict[str, Any]:
    """``import h3client`` against a bare interpreter, in fresh processes with their bytecode
    cached (a first run of each compiles it), as in a training script after ``pip install``."""
    with tempfile.TemporaryDirectory() as tmp:
        return _import_times(runs, bytecode_cached_env(Path(tmp)))


def _import_times(runs: int, env: dict[str, str]) -> dict[str, Any]:
    py = sys.executable
    arms = {
        "bare interpreter": "pass",
        "import h3client": "import h3client",
        "import httpx": "import httpx",
    }
    for code in arms.values():  # compile and cache the bytecode
        subprocess.run([py, "-c", code], check=True, cwd=REPO, env=env)
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    cumulative: list[float] = []
    for _ in range(runs):
        for arm, code in arms.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([py, "-c", code], check=True, cwd=REPO, env=env)
            wall[arm].append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[arm].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        err = subprocess.run(
            [py, "-X", "importtime", "-c", "import h3client"],
            check=True, cwd=REPO, env=env, capture_output=True, text=True,
        ).stderr  # fmt: skip
        m = re.search(r"\|\s*(\d+) \| h3client$", err, re.M)
        assert m, err[-500:]
        cumulative.append(int(m.group(1)) / 1e3)
    out: dict[str, Any] = {a: statistics.median(v) * 1e3 for a, v in wall.items()}
    out["over bare"] = out["import h3client"] - out["bare interpreter"]
    out["cpu"] = {a: statistics.median(v) * 1e3 for a, v in cpu.items()}
    out["cpu over bare"] = out["cpu"]["import h3client"] - out["cpu"]["bare interpreter"]
    out["importtime"] = statistics.median(cumulative)
    out["runs"] = runs
    heavy = subprocess.run(
        [py, "-c", "import sys, h3client; print(sorted(m for m in ('httpx', 'torch', 'numpy', "
         "'subprocess', 'dataclasses', 'argparse') if m in sys.modules))"],
        check=True, cwd=REPO, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    out["heavy"] = heavy
    print(f"import: {out}", flush=True)
    return out


def log_calls(prof: H3Profiler, kind: str):
    scalar, vec, idx = torch.tensor(0.5), torch.rand(64), torch.arange(64)
    return {
        "float": lambda: prof.log_batch(0.5),
        "0-dim tensor": lambda: prof.log_batch(scalar),
        "tensor + 64 per-sample losses": lambda: prof.log_batch(scalar, losses=vec, indices=idx),
    }[kind]


def log_batch_costs(url: str, data_dir: Path, calls: int, timer: float) -> dict[str, Any]:
    res: dict[str, Any] = {}
    prof = H3Profiler("bench-log-batch", url=url, data_dir=data_dir, max_queue=10 * calls)
    for kind in KINDS:
        ns = [max(0, x - timer) for x in per_call_ns(log_calls(prof, kind), calls)]
        res[kind] = (statistics.median(ns) / 1e3, pct(ns, 0.99) / 1e3)
        print(
            f"log_batch {kind}: median {res[kind][0]:.2f} µs, p99 {res[kind][1]:.2f} µs", flush=True
        )
    prof.stop(timeout_s=300)

    # the same call while the sender works through a backlog of 60 000 such batches
    prof = H3Profiler("bench-busy", url=url, data_dir=data_dir, max_queue=10**6)
    proc = prof._proc
    assert proc is not None
    fn = log_calls(prof, KINDS[2])
    for _ in range(60_000):
        fn()
    proc._wake.set()
    while not proc._busy:
        time.sleep(0.001)
    busy_ns: list[int] = []
    t = time.perf_counter_ns
    while proc._busy and len(busy_ns) < calls:
        a = t()
        fn()
        busy_ns.append(max(0, t() - a - int(timer)))
    prof.stop(timeout_s=300)
    res["busy"] = (statistics.median(busy_ns) / 1e3, pct(busy_ns, 0.99) / 1e3, len(busy_ns))
    print(f"log_batch while the sender is busy: {res['busy']}", flush=True)
    return res


def items(kind: str, n: int) -> list[tuple[Any, ...]]:
    """``n`` queued batches, as ``log_batch`` queues them: a CPU loss tensor as its value
    (``item()``), the per-sample tensors as copies of their bytes."""
    base, idx = torch.arange(64, dtype=torch.float32) / 64, torch.arange(64)
    out = []
    for k in range(n):
        if kind == "float":
            out.append((k, time.time(), 1.0 / (1 + k), None, None, None, 0, None, None))
        elif kind == "0-dim tensor":
            loss = torch.tensor(1.0 / (1 + k)).item()
            out.append((k, time.time(), loss, None, None, None, 0, None, None))
        else:
            loss, vec, ids = torch.tensor(1.0).item(), snapshot(base + k), snapshot(idx + k)
            out.append((k, time.time(), loss, vec, ids, None, 0, None, None))
    return out


def sender_throughput(url: str, data_dir: Path, repeats: int, n_e2e: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    chunks = {kind: items(kind, 2000) for kind in KINDS}
    enc: dict[str, list[float]] = {k: [] for k in KINDS}
    gz: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(repeats):  # interleaved
        for kind in KINDS:
            a = time.perf_counter()
            req, _ = encode_batches(chunks[kind])
            b = time.perf_counter()
            assert req is not None
            gzip.compress(req.body, compresslevel=1)
            c = time.perf_counter()
            enc[kind].append(b - a)
            gz[kind].append(c - a)
    e2e: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(max(1, repeats // 3)):
        for kind in KINDS:
            prof = H3Profiler(f"bench-e2e-{kind}", url=url, data_dir=data_dir, max_queue=10 * n_e2e)
            fn = log_calls(prof, kind)
            t0 = time.perf_counter()
            for _ in range(n_e2e):
                fn()
            r = prof.stop(timeout_s=300, report=False)
            e2e[kind].append(time.perf_counter() - t0)
            assert r["batches_posted"] == n_e2e, r
    for kind in KINDS:
        res[kind] = {
            "encode": 2000 / statistics.median(enc[kind]),
            "encode+gzip": 2000 / statistics.median(gz[kind]),
            "end to end": n_e2e / statistics.median(e2e[kind]),
        }
        print(f"sender {kind}: {res[kind]}", flush=True)
    return res


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(stat: str) -> float:
    """CPU seconds (user + system) of a process or thread, from its /proc stat file."""
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sched_ns(path: str) -> tuple[int, int]:
    """A thread's nanoseconds on a CPU and waiting on a run queue (its /proc schedstat)."""
    on, queued, _ = map(int, Path(path).read_text().split())
    return on, queued


class NullExporter:
    """An exporter that takes every request and sends it nowhere (``--diagnose``)."""

    online = True

    def ready(self) -> bool:
        return True

    def send(self, request: Any) -> str:
        return "sent"

    def spool(self, request: Any) -> bool:
        return True

    def shutdown(self) -> None:
        pass


# --only's keys for the diagnostic modes
DIAGNOSTIC = {
    "log-only": "log_batch only (sender held, queue discarded)",
    "null": "sender to a null sink",
    "mean": "H3Profiler (mean loss only)",
}


def training(
    url: str,
    token: str,
    data_dir: Path,
    data,
    rounds: int,
    sync: bool,
    diagnose: bool = False,
    block_s: float = 3.0,
    pin: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Epochs of a real training loop: per round, one block of epochs (``block_s`` seconds)
    of each logging mode, in rotating order; each logging block is compared with the
    unprofiled block of its round.

    The sender posts once a second: with modes alternating, its work would land in the
    unprofiled blocks as often as in the profiled ones. So during every block that is not
    its mode's, a sender is paused (:func:`sender_paused`): all of its work, and the
    daemon's answer to it, is charged to its mode's blocks, as it would be in a run that
    logs every step. Adjacent blocks cancel the machine's drift, which on these shared
    hosts moved whole 15-second segments by ±20 %."""
    x, y = data.x_train, data.y_train
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    # The model restarts from the same weights every 50 rounds: trained on, the MLP fits
    # MNIST-1D, its gradients shrink into denormal floats and its epochs grew 2.3× slower
    # over 1 000 epochs here. Denormals are flushed for the same reason.
    torch.set_flush_denormal(True)
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def restart() -> None:
        nonlocal opt
        model.load_state_dict(start)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
    sync_run = http.post("/v1/runs", json={"name": "bench-sync"}).json()["id"]
    seq = {"n": 0}

    def epoch(log, calls: list[int]) -> float:
        """One epoch; each ``log`` call's duration, as the loop pays it, goes to ``calls``."""
        t = time.perf_counter_ns
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            losses = nn.functional.cross_entropy(model(x[b]), y[b], reduction="none")
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            a = t()
            log(loss, losses, b)
            calls.append(t() - a)
        return time.perf_counter() - t0

    def sync_log(loss, losses, b) -> None:
        s = seq["n"]
        seq["n"] += 1
        http.post(
            f"/v1/runs/{sync_run}/batches",
            json={"batches": [{"seq": s, "t": time.time(), "loss": loss.item(),
                               "losses": losses.tolist(), "indices": b.tolist()}]},
        )  # fmt: skip

    prof = H3Profiler("bench-train", url=url, data_dir=data_dir)
    daemon_pid = json.loads((data_dir / "daemon.json").read_text())["pid"]
    task = f"/proc/self/task/{threading.get_native_id()}"  # the training thread's
    stats = {"daemon": f"/proc/{daemon_pid}/stat", "training": f"{task}/stat"}
    # the time the training thread was neither running nor runnable: blocked, which in this
    # loop is waiting for the GIL (the host's load shows as run-queue time, not here)
    schedstat = f"{task}/schedstat"

    def per_sample(p: H3Profiler) -> Any:
        return lambda loss, losses, b: p.log_batch(loss, losses=losses, indices=b)

    profiled = "H3Profiler (per-sample losses + indices)"
    modes = {"unprofiled": lambda loss, losses, b: None, profiled: per_sample(prof)}
    live = {profiled: prof}  # the profiler whose sender runs in a mode's epochs; others wait
    after: dict[str, Any] = {}
    extra: list[H3Profiler] = []
    if diagnose:  # the profiler's cost taken apart (see --diagnose)
        held = H3Profiler("bench-train-held", url=url, data_dir=data_dir)
        null = H3Profiler("bench-train-null", url=url, data_dir=data_dir)
        assert null._proc is not None and held._proc is not None
        null._proc.exporter, null._proc.on_tick = NullExporter(), None
        log_only, no_http = "log_batch only (sender held, queue discarded)", "sender to a null sink"
        modes[log_only], modes[no_http] = per_sample(held), per_sample(null)
        live[no_http] = null

        def discard(proc: Any = held._proc) -> None:
            proc.dropped += len(proc.batches)  # counted as lost: the run's accounting adds up
            proc.batches.clear()

        after[log_only] = discard
        scalar = H3Profiler("bench-train-scalar", url=url, data_dir=data_dir)
        mean_only = "H3Profiler (mean loss only)"
        modes[mean_only] = lambda loss, losses, b: scalar.log_batch(loss)
        live[mean_only] = scalar
        extra += [held, null, scalar]
        if only:  # --only: of the diagnostic modes, these
            keep = {DIAGNOSTIC[k] for k in only}
            for m in [m for m in DIAGNOSTIC.values() if m not in keep]:
                del modes[m]
    if sync:
        modes["sync HTTP POST per batch"] = sync_log
    times: dict[str, list[float]] = {m: [] for m in modes}
    blocked: dict[str, list[float]] = {m: [] for m in modes}  # share of each block's wall
    calls: dict[str, list[int]] = {m: [] for m in modes}  # ns per log call, in the loop
    if pin:  # the training thread alone on CPU 0; every sender thread and the daemon on CPU 1
        os.sched_setaffinity(threading.get_native_id(), {0})
        others = [p._proc._thread.native_id for p in (prof, *extra)]
        others += [int(t) for t in os.listdir(f"/proc/{daemon_pid}/task")]
        for tid in others:
            os.sched_setaffinity(tid, {1})
    warm = [epoch(modes["unprofiled"], []) for _ in range(10)]
    # Each mode trains for a block of per_block epochs (at least block_s seconds) a round. The
    # sender posts on a 1 s timer; paused through the other modes' epochs, it would find its
    # timer due at every resumption and post once per epoch: with single-epoch blocks it
    # sent 4-9 requests per second of its mode's training, of a few hundred batches each,
    # against the one request a second of a run, so its per-request costs were charged
    # several times over. Blocks of a few seconds give it a run's rhythm.
    per_block = max(1, math.ceil(block_s / statistics.median(warm)))
    cpu = {m: dict.fromkeys([*stats, "sender"], 0.0) for m in modes}
    # each mode's /proc files: its own sender thread's too, if it has a live one
    mode_stats = {
        m: {**stats, "sender": f"/proc/self/task/{live[m]._proc._thread.native_id}/stat"}
        if m in live
        else stats
        for m in modes
    }
    names = list(modes)
    senders = {prof, *extra}  # held's sender is never live: always paused
    for r in range(rounds):
        if r % max(1, 50 // per_block) == 0:  # every ~50 epochs of each mode
            restart()
        for m in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
            with contextlib.ExitStack() as stack:
                for p in senders - {live.get(m)}:
                    stack.enter_context(sender_paused(p))
                st = mode_stats[m]
                before = {k: cpu_s(v) for k, v in st.items()}
                (on0, queued0), t0 = sched_ns(schedstat), time.perf_counter_ns()
                times[m].append(sum(epoch(modes[m], calls[m]) for _ in range(per_block)))
                (on1, queued1), wall = sched_ns(schedstat), time.perf_counter_ns() - t0
                blocked[m].append((wall - (on1 - on0) - (queued1 - queued0)) / wall)
                for k, v in st.items():
                    cpu[m][k] += cpu_s(v) - before[k]
                if m in after:
                    after[m]()
        if (r + 1) % 10 == 0:
            print(
                f"round {r + 1}/{rounds} ({per_block} epochs a block): "
                + ", ".join(
                    f"{m} {1e3 * statistics.median(t[-10:]) / per_block:.2f} ms"
                    for m, t in times.items()
                ),
                flush=True,
            )
    res = prof.stop(timeout_s=300)
    for p in extra:
        p.stop(timeout_s=60, report=False)
    assert res["batches_posted"] == res["batches_logged"], res
    http.close()
    others = [m for m in modes if m != "unprofiled"]
    return {
        "epochs": times,  # seconds per block of per_block epochs
        "per_block": per_block,
        # each logging block against the unprofiled block of its round (run side by side)
        "ratios": {
            m: [a / u - 1 for a, u in zip(times[m], times["unprofiled"], strict=True)]
            for m in others
        },
        "cpu": {m: {k: v / sum(times[m]) for k, v in c.items()} for m, c in cpu.items()},
        "blocked": {m: statistics.median(b) for m, b in blocked.items()},
        "batches_per_epoch": (len(y) + 63) // 64,
        # the log call as the loop pays it (caches cold after a training step), over the
        # unprofiled mode's empty call (the timer and the call itself)
        "call_us": {
            m: (statistics.median(c) - statistics.median(calls["unprofiled"])) / 1e3
            for m, c in calls.items()
        },
    }


@contextlib.contextmanager
def sender_paused(prof: H3Profiler) -> Iterator[None]:
    """The profiler's sender does nothing while the block runs: its lock is taken at a
    moment when no request is in flight, so the worker waits at its next pop. The sender's
    work for the batches logged in profiled epochs is then done in profiled epochs only."""
    proc = prof._proc
    assert proc is not None
    while True:
        proc._lock.acquire()
        if proc._inflight is None:
            break
        proc._lock.release()
        time.sleep(0.001)
    try:
        yield
    finally:
        proc._lock.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, help="override the number of interleaved repeats")
    ap.add_argument(
        "--no-sync", action="store_true", help="leave out the slow sync-HTTP training arm"
    )
    ap.add_argument(
        "--rounds", type=int, help="training: rounds of one block per mode (default 60)"
    )
    ap.add_argument(
        "--block-s",
        type=float,
        default=3.0,
        help="training: seconds of each mode's block of epochs per round (default 3)",
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="training: three more modes that take the profiler's cost apart: log_batch alone "
        "(its sender held, the queue discarded), the sender converting to a null sink "
        "(no HTTP, no daemon work, no η fetch), and logging the mean loss only",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=sorted(DIAGNOSTIC),
        help="training: of --diagnose's modes, only these (more rounds in the same time)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="training: the training thread alone on CPU 0, the senders and the daemon on "
        "CPU 1 (does H3's own work cost the loop by landing on its core?)",
    )
    add_out(ap, "client_overhead.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calls = 20_000 if args.quick else 200_000
    repeats = args.repeats or (5 if args.quick else 21)
    data = load("mnist1d")
    res: dict[str, Any] = {"import": import_times(5 if args.quick else 21)}
    timer = statistics.median(per_call_ns(lambda: None, calls))
    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon(Path(tmp), H3D_POWER_BACKENDS="estimated") as (url, token),
    ):
        res["log"] = log_batch_costs(url, Path(tmp), calls, timer)
        res["sender"] = sender_throughput(url, Path(tmp), repeats, 20_000)
        res["train"] = training(
            url,
            token,
            Path(tmp),
            data,
            args.rounds or (8 if args.quick else 60),
            sync=not (args.quick or args.no_sync),
            diagnose=args.diagnose or bool(args.only),
            block_s=args.block_s,
            pin=args.pin,
            only=args.only,
        )
    args.command = command(ap, args)
    write(args, res, calls, repeats)


def write(args, res: dict[str, Any], calls: int, repeats: int) -> None:
    imp, log, snd, tr = res["import"], res["log"], res["sender"], res["train"]
    lines = [
        "# Client overhead benchmark",
        "",
        f"`{args.command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, torch {torch.__version__} "
        "with 1 thread, a real daemon on loopback (estimated CPU power backend); load average "
        f"{os.getloadavg()[0]:.1f} on its 2 cores when it finished. The ratios measured side by "
        "side are the figures to read.",
        "",
        f"**`import h3client`** ({imp['runs']} interleaved runs of each process, medians):",
        "",
        "| process | median wall ms | median CPU ms (user + sys) |",
        "|---|---:|---:|",
        f"| `python -c pass` (bare interpreter) | {imp['bare interpreter']:.1f} | {imp['cpu']['bare interpreter']:.1f} |",
        f"| `python -c 'import h3client'` | {imp['import h3client']:.1f} | {imp['cpu']['import h3client']:.1f} |",
        f"| `python -c 'import httpx'` (for scale) | {imp['import httpx']:.1f} | {imp['cpu']['import httpx']:.1f} |",
        "",
        f"`import h3client` over the bare interpreter: **{imp['over bare']:.1f} ms** wall, "
        f"**{imp['cpu over bare']:.1f} ms** CPU (the CPU time suffers less from the shared machine); "
        f"`python -X importtime` cumulative for h3client: **{imp['importtime']:.1f} ms** (median). "
        f"Heavy modules loaded by `import h3client`: {imp['heavy']}.",
        "",
        f"**log_batch on the calling thread** ({calls:,} calls each, timer cost subtracted):",
        "",
        "| loss passed | median µs | p99 µs |",
        "|---|---:|---:|",
    ]
    for kind in KINDS:
        med, p99 = log[kind]
        lines.append(f"| {kind} | {med:.2f} | {p99:.2f} |")
    med, p99, n = log["busy"]
    lines.append(
        f"| tensor + 64 per-sample losses, **while the sender is busy** ({n:,} calls) | {med:.2f} | {p99:.2f} |"
    )
    lines += [
        "",
        "**Sender throughput** (batches/s; conversion of one 2 000-batch request, medians of "
        f"{repeats} interleaved repeats; end to end: 20 000 batches logged then `stop()`, against the daemon):",
        "",
        "| batches carry | encode (to a loopback daemon) | encode + gzip (to a remote daemon) | end to end to a real daemon on loopback |",
        "|---|---:|---:|---:|",
    ]
    for kind in KINDS:
        s = snd[kind]
        lines.append(
            f"| {kind} | {s['encode']:,.0f} | {s['encode+gzip']:,.0f} | {s['end to end']:,.0f} |"
        )
    eps, ratios, k = tr["epochs"], tr["ratios"], tr["per_block"]
    base = statistics.median(eps["unprofiled"]) / k  # an epoch
    steps = tr["batches_per_epoch"] / base
    lines += [
        "",
        f"**Training loop** (MLP 40-256-256-10 on MNIST-1D, {tr['batches_per_epoch']} batches of "
        f"64 per epoch, {steps:,.0f} steps/s unprofiled; {len(eps['unprofiled'])} rounds of a block "
        f"of {k} epochs per mode in rotating order, so that each sender posts about once a "
        "second of its mode's training, as in a run; the sender paused outside its mode's blocks "
        "so that all its work is charged to them; the overhead is the median over rounds of "
        "(logging block / the round's unprofiled block − 1), with the quartiles of those ratios. CPU: each "
        "thread's or process's CPU seconds per second of the mode's epochs, from /proc. The log "
        "call in the loop: every call timed as the loop pays it, right after a training step, "
        "median over the unprofiled mode's empty call, and that as a share of the unprofiled "
        "step; it is the training thread's own part of the overhead, and far less noisy than the "
        "epoch ratios. Training thread blocked: the share of a block's wall time the thread was "
        "neither on a CPU nor waiting for one (its /proc schedstat), median over blocks; in this "
        "loop that is waiting for the GIL, which the sender holds while it converts and posts, "
        "and the host's load does not enter it. At least: the call's share of a step plus the "
        "blocked share above the unprofiled mode's (none when below), the two parts of the "
        "overhead read without the epoch ratios' noise; what it leaves out, the next step "
        "slowed by the caches the call and the sender used and by the other core's work "
        "(benchmarks/contention.py), only the epoch ratios see):",
        "",
        "| logging | median epoch ms | overhead, median of rounds | quartiles | at least "
        "| log call in the loop | of a step | training thread CPU | training thread blocked "
        "| sender thread CPU | daemon CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    step_us = 1e6 * base / tr["batches_per_epoch"]
    idle_blocked = tr["blocked"]["unprofiled"]
    for m, ts in eps.items():
        c, r = tr["cpu"][m], ratios.get(m)
        if r:
            q1, _, q3 = statistics.quantiles(r, n=4)
            over = f"**{100 * statistics.median(r):+.2f} %** | {100 * q1:+.2f} … {100 * q3:+.2f} %"
        else:
            over = "— | —"
        share = tr["call_us"][m] / step_us + max(0.0, tr["blocked"][m] - idle_blocked)
        least = f"{100 * share:+.2f} %" if r else "—"
        lines.append(
            f"| {m} | {1e3 * statistics.median(ts) / k:.2f} | {over} | {least} "
            f"| {tr['call_us'][m]:.2f} µs "
            f"| {100 * tr['call_us'][m] / step_us:.2f} % | {100 * c['training']:.1f} % "
            f"| {100 * tr['blocked'][m]:.3f} % "
            f"| {100 * c['sender']:.2f} % | {100 * c['daemon']:.2f} % |"
        )
    lines += [
        "",
        "Budgets (DESIGN.md §8, issue 17): `import h3client` ≤ 50 ms over a bare interpreter; "
        "log_batch ≤ 5 µs median, also while the sender is busy; profiler overhead ≤ 0.5 % of "
        "wall time; sender ≥ 20 000 batches/s with 64 per-sample losses and indices.",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
