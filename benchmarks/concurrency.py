"""The daemon under many concurrent writers and readers, over real HTTP on loopback.

For each configuration a fresh real ``h3d serve`` (SQLite in a temporary data dir, or a
PostgreSQL schema created for the run and dropped after) takes W writer threads and R reader
threads at once:

- each writer owns a run and posts requests of 100 batches × 64 per-sample losses, in the
  wire format h3client sends (packed float32/int64, gzip); every 10th request (every 2nd
  under ``--quick``, whose writers send fewer than 10) is sent twice (a client retrying after
  its timeout), so the store must dedupe;
- readers loop over GET /v1/runs/{id}/eta, GET /v1/runs/{id}, GET /v1/runs and /metrics on
  the writers' runs until the writers are done.

Every request is timed from send to response. At the end the store is checked directly
(SQL, not the API): every run holds exactly the batches and per-sample vectors sent, once,
and its counters equal what was stored. Bodies are encoded before the clock starts.

    python benchmarks/concurrency.py [--quick] [--pg URL] [--out PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import add_out, daemon, machine, write_report  # noqa: E402

N_BATCHES = 100
PER_SAMPLE = 64
BUDGET = {"errors": 0, "write_p99_s": 2.0, "rows_per_s": 5000.0}


def body(seq0: int, t0: float) -> bytes:
    batches = []
    for s in range(seq0, seq0 + N_BATCHES):
        losses = array("f", (0.5 + ((s * 31 + i) % 101) / 50 for i in range(PER_SAMPLE)))
        idx = array("q", range(s * PER_SAMPLE, (s + 1) * PER_SAMPLE))
        batches.append(
            {
                "seq": s,
                "t": t0 + s * 1e-3,
                "loss": 1.0 + (s % 97) / 97,
                "n": PER_SAMPLE,
                "epoch": s // 1000,
                "losses_f32": base64.b64encode(losses.tobytes()).decode(),
                "indices_i64": base64.b64encode(idx.tobytes()).decode(),
            }
        )
    raw = json.dumps({"batches": batches, "nonfinite_as_null": True}).encode()
    return gzip.compress(raw, compresslevel=1)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


@contextlib.contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A schema of its own on the PostgreSQL server; the daemon's URL points into it."""
    name = f"h3bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f"CREATE SCHEMA {name}"))
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{name}"
    finally:
        with eng.connect() as c:
            c.execute(text(f"DROP SCHEMA {name} CASCADE"))
        eng.dispose()


def run_config(
    writers: int,
    readers: int,
    requests: int,
    db_url: str | None,
    label: str,
    retry_every: int = 10,
) -> dict[str, Any]:
    """One configuration; each writer sends its ``retry_every``-th requests twice."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        env = {"H3D_POWER_BACKENDS": "constant:50", "H3D_SAMPLE_INTERVAL_S": "0.1"}
        if db_url:
            env["H3D_DB_URL"] = db_url
        with daemon(data, **env) as (url, token):
            headers = {"Authorization": f"Bearer {token}"}
            timeout = httpx.Timeout(60.0)
            with httpx.Client(base_url=url, headers=headers, timeout=timeout) as c:
                runs = [
                    c.post("/v1/runs", json={"name": f"w{i}"}).json()["id"] for i in range(writers)
                ]
            t0 = time.time()
            plans = []
            for _w in range(writers):
                seqs = [k * N_BATCHES for k in range(requests)]
                order = []
                for k, s in enumerate(seqs):
                    order.append(s)
                    if k % retry_every == retry_every - 1:  # a retry of a request already sent
                        order.append(s)
                plans.append([(s, body(s, t0)) for s in order])
            write_lat: list[float] = []
            read_lat: list[float] = []
            errors: list[str] = []
            accepted = [0] * writers
            duplicates = [0] * writers
            lock = threading.Lock()
            done = threading.Event()
            start = threading.Barrier(writers + readers + 1)

            def timed(
                send: Callable[[], httpx.Response], what: str, latencies: list[float]
            ) -> httpx.Response | None:
                """One request: its latency, or the error it met; the response if it was 200."""
                s = time.perf_counter()
                try:
                    r = send()
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"{what}: {type(exc).__name__}")
                    return None
                dt = time.perf_counter() - s
                with lock:
                    latencies.append(dt)
                    if r.status_code != 200:
                        errors.append(f"{what}: {r.status_code} {r.text[:100]}")
                        return None
                return r

            def writer(i: int) -> None:
                h = {**headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
                with httpx.Client(base_url=url, headers=h, timeout=timeout) as c:
                    start.wait()
                    for _seq, b in plans[i]:
                        r = timed(
                            lambda: c.post(f"/v1/runs/{runs[i]}/batches", content=b),  # noqa: B023
                            "write",
                            write_lat,
                        )
                        if r is not None:
                            with lock:
                                accepted[i] += r.json()["accepted"]
                                duplicates[i] += r.json()["duplicates"]

            def reader(j: int) -> None:
                rng = random.Random(j)
                paths = ["/v1/runs/{}/eta", "/v1/runs/{}", "/v1/runs?limit=20", "/metrics"]
                with httpx.Client(base_url=url, headers=headers, timeout=timeout) as c:
                    start.wait()
                    while not done.is_set():
                        p = rng.choice(paths).format(rng.choice(runs))
                        timed(lambda: c.get(p), f"read {p}", read_lat)  # noqa: B023

            load_before = os.getloadavg()[0]
            threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
            threads += [threading.Thread(target=reader, args=(j,)) for j in range(readers)]
            for t in threads:
                t.start()
            start.wait()
            wall0 = time.perf_counter()
            for t in threads[:writers]:
                t.join()
            wall = time.perf_counter() - wall0
            done.set()
            for t in threads[writers:]:
                t.join()
            # exactly once, checked in the store itself
            with httpx.Client(base_url=url, headers=headers, timeout=timeout) as c:
                counters = {rid: c.get(f"/v1/runs/{rid}").json() for rid in runs}
        sql_url = db_url or f"sqlite:///{data / 'h3d.db'}"
        eng = create_engine(sql_url)
        with eng.connect() as conn:
            stored = dict(
                conn.execute(text("SELECT run_id, count(*) FROM batches GROUP BY run_id")).all()
            )
            vectors = dict(
                conn.execute(
                    text("SELECT run_id, count(*) FROM sample_losses GROUP BY run_id")
                ).all()
            )
        eng.dispose()
    expected = requests * N_BATCHES
    exact = all(
        stored.get(rid) == expected
        and vectors.get(rid) == expected
        and counters[rid]["n_batches"] == expected
        and accepted[i] == expected
        for i, rid in enumerate(runs)
    )
    rows = writers * expected
    return {
        "label": label,
        "load": load_before,
        "writers": writers,
        "readers": readers,
        "requests": sum(len(p) for p in plans),
        "rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "write_p50_s": pct(write_lat, 0.5),
        "write_p99_s": pct(write_lat, 0.99),
        "write_max_s": max(write_lat) if write_lat else float("nan"),
        "reads": len(read_lat),
        "read_p50_s": pct(read_lat, 0.5),
        "read_p99_s": pct(read_lat, 0.99),
        "errors": len(errors),
        "error_sample": errors[:3],
        "exactly_once": exact,
        "duplicates_seen": sum(duplicates),
    }


def fmt(r: dict[str, Any]) -> str:
    return (
        f"| {r['label']} | {r['writers']} + {r['readers']} | {r['rows']} | "
        f"{r['rows_per_s']:.0f} | {r['write_p50_s']:.3f} | {r['write_p99_s']:.3f} | "
        f"{r['write_max_s']:.3f} | {r['read_p50_s']:.3f} | {r['read_p99_s']:.3f} | {r['reads']} | "
        f"{r['errors']} | {'yes' if r['exactly_once'] else 'NO'} ({r['duplicates_seen']} dups) | "
        f"{r['load']:.1f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pg", help="also run on this PostgreSQL URL (a schema is made and dropped)")
    add_out(ap, "concurrency.md")
    args = ap.parse_args()
    per = 2 if args.quick else 10
    retry_every = 2 if args.quick else 10
    configs: list[tuple[int, int, int]] = [(16, 4, 4 * per), (64, 4, per)]
    results = []
    for w, r, n in configs:
        res = run_config(w, r, n, None, "SQLite", retry_every)
        print(fmt(res), res["error_sample"], flush=True)
        results.append(res)
        if args.pg:
            with pg_schema(args.pg) as url:
                res = run_config(w, r, n, url, "PostgreSQL", retry_every)
            print(fmt(res), res["error_sample"], flush=True)
            results.append(res)
    big = [r for r in results if r["writers"] == 64]
    verdict = []
    for r in big:
        ok = (
            r["errors"] <= BUDGET["errors"]
            and r["write_p99_s"] < BUDGET["write_p99_s"]
            and r["rows_per_s"] >= BUDGET["rows_per_s"]
            and r["exactly_once"]
        )
        verdict.append(
            f"- {r['label']}, 64 writers + 4 readers: {'within' if ok else 'OVER'} budget"
        )
    lines = [
        "# Concurrency: many writers and readers against one daemon",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, by "
        "`python benchmarks/concurrency.py"
        + (" --quick" if args.quick else "")
        + (" --pg <url>" if args.pg else "")
        + "`. load = the machine's 1-minute load average as each configuration's clients "
        "started (it still holds part of the previous configuration's own load); well above "
        "1, other work shared the 2 cores, and the figures are lower bounds on throughput.",
        "",
        f"Each writer: its own run, requests of {N_BATCHES} batches × {PER_SAMPLE} per-sample "
        "losses (h3client's wire: packed float32/int64, gzip), one request in "
        f"{retry_every} sent twice (a retry). Readers: GET eta / run / run list / /metrics in a "
        "loop until the writers finish. Client threads share the machine with the daemon. "
        "rows = batches stored. Exactly once: the store (SQL) holds every batch and per-sample "
        "vector once and the run's counter equals it; the retried requests count as duplicates.",
        "",
        "| store | writers + readers | rows | rows/s | write p50 s | write p99 s | "
        "write max s | read p50 s | read p99 s | reads | errors | exactly once | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[fmt(r) for r in results],
        "",
        f"Budget at 64 writers + 4 readers: {BUDGET['errors']} errors, write p99 < "
        f"{BUDGET['write_p99_s']} s, ≥ {BUDGET['rows_per_s']:.0f} rows/s.",
        *verdict,
        "",
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
