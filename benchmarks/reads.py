"""Run list and run page latency on a store holding a run of 100 000 batches (DESIGN.md §8:
p95 ≤ 50 ms).

Starts a real ``h3d serve`` (temporary data dir, SQLite, loopback port, the estimated power
model sampling every 100 ms), opens a run and posts 100 000 batches (100 epochs, one batch a
millisecond of run time, packed columns as the client sends them) plus its epochs, keeps the
run open until its last batch's time so that the daemon samples power over all of it, and
finishes it. ``--runs`` other small finished runs fill the run list. Then it times, over one
keep-alive connection, each request the dashboard makes: the run list (``limit=1000``, as
the dashboard asks), the run detail, and the rest of the run page (report, loss and energy
series); requests of all kinds interleaved, so that load drifts affect them alike.

    python benchmarks/reads.py [--batches 100000] [--repeats 100] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import add_out, daemon_client, machine, write_report  # noqa: E402
from benchmarks.ingest import body  # noqa: E402

PER_REQUEST = 1000


def fill(http: httpx.Client, batches: int, runs: int) -> tuple[str, float]:
    """The big run (finished) and ``runs`` small ones; (its id, seconds its posting took)."""
    run = http.post("/v1/runs", json={"name": "bench-reads", "n_train": 64_000}).json()["id"]
    t0 = time.time()
    start = time.perf_counter()
    for seq0 in range(0, batches, PER_REQUEST):
        n = min(PER_REQUEST, batches - seq0)
        r = http.post(
            f"/v1/runs/{run}/batches",
            content=body(seq0, n, 0, t0, "columns"),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200 and r.json()["accepted"] == n, r.text
    posting = time.perf_counter() - start
    epochs = batches // 1000
    r = http.post(
        f"/v1/runs/{run}/epochs",
        json={
            "epochs": [
                {"epoch": e, "t": t0 + (e + 1) - 1e-3, "accuracy": 0.5 + e / (2 * epochs)}
                for e in range(epochs)
            ]
        },
    )
    assert r.status_code == 200, r.text
    for i in range(runs):
        small = http.post("/v1/runs", json={"name": f"small-{i}", "tags": ["bench"]}).json()["id"]
        now = time.time()
        http.post(
            f"/v1/runs/{small}/batches",
            json={"batches": [{"seq": s, "t": now + s * 1e-3, "loss": 1.0} for s in range(10)]},
        ).raise_for_status()
        http.patch(f"/v1/runs/{small}", json={"status": "finished"}).raise_for_status()
    time.sleep(max(0.0, t0 + batches * 1e-3 + 0.2 - time.time()))  # the run's last batch
    http.patch(f"/v1/runs/{run}", json={"status": "finished"}).raise_for_status()
    return run, posting


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=199, help="other runs in the list")
    ap.add_argument("--repeats", type=int, default=100)
    add_out(ap, "reads.md")
    args = ap.parse_args()
    with daemon_client(H3D_POWER_BACKENDS="estimated") as http:
        run, posting = fill(http, args.batches, args.runs)
        paths = {
            "run list (`GET /v1/runs?limit=1000`)": "/v1/runs?limit=1000",
            "run detail (`GET /v1/runs/{id}`)": f"/v1/runs/{run}",
            "report (`/report`)": f"/v1/runs/{run}/report",
            "loss series (`/series?metric=loss&points=1000`)": (
                f"/v1/runs/{run}/series?metric=loss&points=1000"
            ),
            "energy series (`/series?metric=energy&points=500`)": (
                f"/v1/runs/{run}/series?metric=energy&points=500"
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        first: dict[str, float] = {}
        for k, p in paths.items():  # the first view of the page, then warm: caches, pages
            s = time.perf_counter()
            http.get(p).raise_for_status()
            first[k] = (time.perf_counter() - s) * 1e3
        detail = http.get(f"/v1/runs/{run}").json()
        assert detail["n_batches"] == args.batches and detail["status"] == "finished", detail
        listed = http.get("/v1/runs", params={"limit": 1000}).json()["data"]
        assert len(listed) == args.runs + 1
        report = http.get(f"/v1/runs/{run}/report").json()
        samples = sum(d["n_samples"] for d in report["energy"]["by_device"])
        for _ in range(args.repeats):
            for k, p in paths.items():
                s = time.perf_counter()
                r = http.get(p)
                times[k].append((time.perf_counter() - s) * 1e3)
                assert r.status_code == 200, r.text
    rows = []
    for k, ts in times.items():
        p50, p95 = statistics.median(ts), percentile(ts, 0.95)
        rows.append(f"| {k} | {first[k]:.1f} | {p50:.1f} | {p95:.1f} | {max(ts):.1f} |")
        print(f"{k:55s} p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  max {max(ts):6.1f} ms", flush=True)
    lines = [
        "# Run list and run page latency",
        "",
        f"`python benchmarks/reads.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{machine()}, SQLite file in a temp dir (WAL). A finished run of {args.batches:,} "
        f"batches ({args.batches // 1000} epochs, {args.batches * 1e-3:.0f} s of run time, "
        f"posted in {posting:.1f} s as packed columns, {PER_REQUEST} a request; "
        f"{samples} power samples in its window) and {args.runs} small finished runs. "
        f"{args.repeats} requests of each kind over one keep-alive connection, the kinds "
        "interleaved; client and daemon share the machine's cores. Budget (DESIGN.md §8): run "
        "list and run detail p95 ≤ 50 ms; the other rows are the rest of what the dashboard's "
        "run page fetches. First: the first request of each kind after the run finished, in "
        "the order listed (the report reads the run's batches; the daemon keeps an ended "
        "run's rows, so the series after it and every later request do not).",
        "",
        "| request | first ms | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
