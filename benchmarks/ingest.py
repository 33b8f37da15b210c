"""Daemon ingest throughput over real HTTP: batch rows/s, per-sample losses/s, latency.

Starts a real ``h3d serve`` (temporary data dir, SQLite, loopback port), then for each
configuration POSTs pre-encoded bodies over one keep-alive connection and times each
request from send to response. Client-side encoding is done before the clock starts:
the figures are what the daemon sustains (parse, validate, store, commit), with client and
daemon sharing this machine's cores.

    python benchmarks/ingest.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import add_out, daemon_client, machine, write_report  # noqa: E402
from h3client._batching import encode_batches  # noqa: E402
from h3client.client import COLUMNS_MEDIA_TYPE, columns_as_json  # noqa: E402


def body(
    seq0: int, n_batches: int, per_sample: int, t0: float, form: str = "rows"
) -> tuple[bytes, str]:
    """A request of ``n_batches`` and its Content-Type: one JSON object per batch ("rows"),
    or the packed columns by the client's own encoder, as it sends them ("binary": raw bytes
    after a JSON header) or in their JSON form ("columns": base64 text, what the spool holds
    and a daemon older than the binary form reads)."""
    if form in ("columns", "binary"):
        items = [
            (s, t0 + s * 1e-3, 1.0 + (s % 97) / 97,
             [round(0.5 + ((s * 31 + i) % 101) / 50, 4) for i in range(per_sample)] if per_sample else None,
             list(range(s * per_sample, (s + 1) * per_sample)) if per_sample else None,
             64, s // 1000, None, None)
            for s in range(seq0, seq0 + n_batches)
        ]  # fmt: skip
        req, bad = encode_batches(items)
        assert req is not None and not bad and req.binary
        if form == "binary":
            return req.body, COLUMNS_MEDIA_TYPE
        return columns_as_json(req.body), "application/json"
    batches = []
    for s in range(seq0, seq0 + n_batches):
        b: dict[str, object] = {
            "seq": s,
            "t": t0 + s * 1e-3,
            "loss": 1.0 + (s % 97) / 97,
            "n": 64,
            "epoch": s // 1000,
        }
        if per_sample:
            b["losses"] = [round(0.5 + ((s * 31 + i) % 101) / 50, 4) for i in range(per_sample)]
            b["indices"] = list(range(s * per_sample, (s + 1) * per_sample))
        batches.append(b)
    return json.dumps({"batches": batches}).encode(), "application/json"


def measure(
    http: httpx.Client, n_batches: int, per_sample: int, requests: int, form: str = "rows"
) -> dict[str, Any]:
    run = http.post("/v1/runs", json={"name": f"bench-{n_batches}-{per_sample}"}).json()["id"]
    t0 = time.time()
    bodies = [body(i * n_batches, n_batches, per_sample, t0, form) for i in range(requests)]
    lat = []
    start = time.perf_counter()
    for b, kind in bodies:
        s = time.perf_counter()
        r = http.post(f"/v1/runs/{run}/batches", content=b, headers={"Content-Type": kind})
        lat.append(time.perf_counter() - s)
        assert r.status_code == 200 and r.json()["accepted"] == n_batches, r.text
    wall = time.perf_counter() - start
    stored = http.get(f"/v1/runs/{run}").json()["n_batches"]
    assert stored == n_batches * requests
    lat.sort()
    return {
        "form": form,
        "batches_per_request": n_batches,
        "per_sample": per_sample,
        "requests": requests,
        "rows_per_s": n_batches * requests / wall,
        "losses_per_s": n_batches * per_sample * requests / wall,
        "mb_per_request": len(bodies[0][0]) / 1e6,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smoke run (fewer requests)")
    add_out(ap, "ingest.md")
    args = ap.parse_args()
    configs = [
        (100, 0, 200, "rows"),
        (1000, 0, 40, "rows"),
        (10_000, 0, 8, "rows"),
        (100, 128, 60, "rows"),
        (1000, 128, 10, "rows"),
        (1000, 512, 4, "rows"),
        # packed columns (h3client's encoder): as JSON (base64), and as the client sends them
        (1000, 0, 40, "columns"),
        (100, 128, 60, "columns"),
        (1000, 128, 10, "columns"),
        (1000, 512, 4, "columns"),
        (1000, 0, 40, "binary"),
        (100, 128, 60, "binary"),
        (1000, 128, 10, "binary"),
        (1000, 512, 4, "binary"),
    ]
    if args.quick:
        configs = [(n, p, max(2, r // 10), f) for n, p, r, f in configs]
    rows = []
    with daemon_client(H3D_POWER_BACKENDS="estimated") as http:
        measure(http, 100, 8, 5)  # warm-up: imports, SQLite page cache
        for n, p, r, f in configs:
            res = measure(http, n, p, r, f)
            rows.append(res)
            print(
                f"{f:7s} {n:>6} batches/req x {p:>3} per-sample: {res['rows_per_s']:>9.0f} rows/s "
                f"{res['losses_per_s']:>10.0f} losses/s  p50 {res['p50_ms']:.1f} ms  p99 {res['p99_ms']:.1f} ms",
                flush=True,
            )
    lines = [
        "# Daemon ingest benchmark",
        "",
        f"`python benchmarks/ingest.py{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d')}, "
        f"{machine()}, SQLite file in a temp dir (WAL). "
        "Client and daemon share the machine; bodies are encoded before timing; one keep-alive connection. "
        "Form: `rows`, one JSON object per batch with per-sample values as JSON lists; `columns`, the packed "
        "columns of the client's encoder in their JSON form (base64 arrays, one per column: the spool's "
        "form); `binary`, the same columns as the client sends them (`application/vnd.h3.columns`: "
        "raw bytes after a one-line JSON header).",
        "",
        "| form | batches/request | per-sample losses/batch | requests | batch rows/s | per-sample losses/s | MB/request | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['form']} | {r['batches_per_request']} | {r['per_sample']} | {r['requests']} | {r['rows_per_s']:,.0f} | "
            f"{r['losses_per_s']:,.0f} | {r['mb_per_request']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    lines += [
        "",
        "Budgets (DESIGN.md §8): ≥ 20 000 batch rows/s and ≥ 200 000 per-sample losses/s sustained.",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
