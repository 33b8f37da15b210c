"""How a device is split between runs on one node: one rule, stored as share rows.

Concurrent runs never take more than the device between them, a run alone gets all of it,
and a figure reads the same live and after the run finished. Each figure here is checked
against a hand computation from the rows the daemon stored.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from h3d import analysis
from h3d.attribution import busy_cpu_s
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import make_engine, make_sessionmaker, session_scope

Rows = list[tuple[float, float]]  # (t, power_w)


def _db(daemon: Any) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{daemon.data_dir / 'h3d.db'}?mode=ro", uri=True)


def _samples(daemon: Any) -> Rows:
    with _db(daemon) as con:
        return [(t, p) for t, p in con.execute("SELECT t, power_w FROM power_samples ORDER BY t")]


def _trapezoid(rows: Rows, a: float, b: float) -> float:
    """The stored samples' trapezoid over [a, b], edges interpolated (no gaps here)."""
    e = 0.0
    for (ta, pa), (tb, pb) in zip(rows, rows[1:], strict=False):
        lo, hi = max(ta, a), min(tb, b)
        if hi <= lo or tb <= ta:
            continue
        p_lo = pa + (pb - pa) * (lo - ta) / (tb - ta)
        p_hi = pa + (pb - pa) * (hi - ta) / (tb - ta)
        e += 0.5 * (p_lo + p_hi) * (hi - lo)
    return e


def _metric(text: str, run_id: str) -> float:
    m = re.search(rf'^h3d_run_energy_joules_total\{{run="{run_id}"[^}}]*\}} (\S+)$', text, re.M)
    assert m is not None, text
    return float(m.group(1))


def test_overlapping_runs_without_a_pid_split_the_device(daemon_factory: Any) -> None:
    """Two runs created over REST without a pid (remote clients): each alone gets the whole
    device, the overlap is split evenly, and the two add up to what the device drew. Before,
    each got the whole device (sum 2.0 x the overlap) while /metrics split it."""
    daemon = daemon_factory(H3D_POWER_BACKENDS="constant:100")
    with daemon.client() as api:
        a = api.post("/v1/runs", json={"name": "a"}).json()["id"]
        time.sleep(1.2)
        b = api.post("/v1/runs", json={"name": "b"}).json()["id"]
        time.sleep(1.2)
        live = {r: api.get(f"/v1/runs/{r}/energy").json()["energy_j"] for r in (a, b)}
        metrics = api.get("/metrics").text
        api.patch(f"/v1/runs/{a}", json={"status": "finished"}).raise_for_status()
        time.sleep(1.2)
        api.patch(f"/v1/runs/{b}", json={"status": "finished"}).raise_for_status()
        runs = {r: api.get(f"/v1/runs/{r}").json() for r in (a, b)}
        e = {r: api.get(f"/v1/runs/{r}/energy").json() for r in (a, b)}
    daemon.stop()  # every reading and share row stored
    # live, the stored rows give what the sampler's running totals gave up to the last share
    # row stored: one flush interval (1 s, 100 W split in two) and a write behind at most
    for r in (a, b):
        assert _metric(metrics, r) - 100.0 <= live[r] <= _metric(metrics, r) * 1.05 + 2.0
    rows = _samples(daemon)
    ta, tb = runs[a]["created_at"], runs[b]["created_at"]
    fa, fb = runs[a]["finished_at"], runs[b]["finished_at"]
    alone_a, both, alone_b = (
        _trapezoid(rows, ta, tb),
        _trapezoid(rows, tb, fa),
        _trapezoid(rows, fa, fb),
    )
    assert both > 80.0  # the runs overlapped for over a second
    assert e[a]["energy_j"] == pytest.approx(alone_a + both / 2, rel=0.02)
    assert e[b]["energy_j"] == pytest.approx(both / 2 + alone_b, rel=0.02)
    union = _trapezoid(rows, ta, fb)
    assert e[a]["energy_j"] + e[b]["energy_j"] == pytest.approx(union, rel=0.01)
    assert e[a]["energy_j"] + e[b]["energy_j"] <= union * 1.001
    # a few rows per run: one per change of the split, extended while it holds
    with _db(daemon) as con:
        (n,) = con.execute("SELECT count(*) FROM run_shares WHERE run_id = ?", (a,)).fetchone()
    assert n <= 4


def test_a_run_alone_without_a_pid_gets_the_whole_device(daemon_factory: Any) -> None:
    daemon = daemon_factory(H3D_POWER_BACKENDS="constant:100")
    with daemon.client() as api:
        r = api.post("/v1/runs", json={"name": "alone"}).json()["id"]
        time.sleep(1.0)
        api.patch(f"/v1/runs/{r}", json={"status": "finished"}).raise_for_status()
        e = api.get(f"/v1/runs/{r}/energy").json()
    assert e["energy_j"] == pytest.approx(e["device_energy_j"], rel=1e-6)
    assert e["by_device"][0]["attribution"] == "whole_device"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def test_a_late_rank_keeps_its_share_from_its_start(daemon_factory: Any) -> None:
    """Rank 1 (idle) joins at T0; rank 0 (busy), started at T0 too, is heard of 2.5 s later
    and says its CPU time at T0. Its share counts from T0: the union rows are amended, never
    dropped on a key collision, and rank 0 gets nearly all of the run's energy. Before, the
    run got about a third of it and the idle rank more than the busy one."""
    daemon = daemon_factory(H3D_POWER_BACKENDS="constant:100")
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 8: pass"]
    )
    idle = subprocess.Popen(["sleep", "8"])
    try:
        time.sleep(0.3)
        t0, cpu0, busy0 = time.time(), _cpu(busy.pid), busy_cpu_s()
        rid = os.urandom(16).hex()
        base = {"id": rid, "name": "ddp", "world_size": 2, "host": "localhost", "created_at": t0}
        with daemon.client() as api:
            late = {"rank": 0, "pid": busy.pid, "cpu_s": cpu0}
            api.post("/v1/runs", json={**base, "rank": 1, "pid": idle.pid, "cpu_s": _cpu(idle.pid)})
            time.sleep(2.5)
            api.post("/v1/runs", json={**base, **late}).raise_for_status()
            time.sleep(1.5)
            share = (_cpu(busy.pid) - cpu0) / (busy_cpu_s() - busy0)  # as this test saw it
            for rank in (0, 1):
                body = {"status": "finished", "rank": rank}
                api.patch(f"/v1/runs/{rid}", json=body).raise_for_status()
            run = api.get(f"/v1/runs/{rid}").json()
            e = api.get(f"/v1/runs/{rid}/energy").json()
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    daemon.stop()  # every reading and share row stored
    with _db(daemon) as con:
        union = con.execute(
            "SELECT t0, t1, share FROM run_shares WHERE run_id = ? AND rank = -1 ORDER BY t0",
            (rid,),
        ).fetchall()
    # the union rows tile the run's window: no overlap, no hole
    for (_a0, a1, _s), (b0, _b1, _t) in zip(union, union[1:], strict=False):
        assert b0 == pytest.approx(a1, abs=1e-6)
    assert union[0][0] <= run["created_at"] + 1e-6 and union[-1][1] >= run["finished_at"] - 0.05
    rows = _samples(daemon)
    hand = sum(s * _trapezoid(rows, max(a, t0), b) for a, b, s in union)
    assert e["energy_j"] == pytest.approx(hand, rel=0.02)
    assert e["energy_j"] == pytest.approx(share * e["device_energy_j"], rel=0.3)
    ranks = {r["rank"]: r["energy_j"] for r in e["by_rank"]}
    assert ranks[0] > 0.9 * e["energy_j"] and ranks[1] < 0.1 * e["energy_j"], ranks
    assert sum(ranks.values()) == pytest.approx(e["energy_j"])


def test_rank_rows_count_over_their_own_interval(tmp_path: Path) -> None:
    """A rank's row covers [t0, t1], whatever the union's pieces are: one back-dated row of
    rank 0 over [0, 6] spans three union pieces. Before, it counted only in the union piece
    that began at its own start."""
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as s:
        run = repo.create_run(
            s, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=0.0,
            run_id="r" * 32, node="n", rank=0, world_size=2,
        )  # fmt: skip
        repo.create_run(
            s, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=0.0,
            run_id="r" * 32, node="n", rank=1, world_size=2,
        )  # fmt: skip
        dev = repo.upsert_device(
            s, name="cpu", kind="cpu", source="rapl", model="", uuid_=None, now=0.0, node="n"
        )
        samples = [{"device_id": dev.id, "t": t / 2, "power_w": 100.0, "energy_j": None}
                   for t in range(13)]  # fmt: skip
        repo.add_power_samples(s, rows=samples)
        pieces = [(-1, 0.0, 2.0, 0.8), (-1, 2.0, 4.0, 0.8), (-1, 4.0, 6.0, 0.8)]
        pieces += [(0, 0.0, 6.0, 0.6), (1, 0.0, 2.0, 0.2), (1, 2.0, 4.0, 0.2), (1, 4.0, 6.0, 0.2)]
        repo.add_run_shares(
            s,
            rows=[
                {
                    "run_id": run.id,
                    "node": "n",
                    "rank": r,
                    "kind": "cpu",
                    "t0": a,
                    "t1": b,
                    "share": v,
                }
                for r, a, b, v in pieces
            ],  # fmt: skip
        )
        run.finished_at = 6.0
        e = analysis.run_energy(s, run=run, interval_s=0.5)
    assert e["energy_j"] == pytest.approx(0.8 * 600.0)
    ranks = {r["rank"]: r["energy_j"] for r in e["by_rank"]}
    assert ranks == pytest.approx({0: 0.6 * 600.0, 1: 0.2 * 600.0})


def test_energy_above_idle_is_taken_over_the_run_not_per_piece(tmp_path: Path) -> None:
    """Half the run above the idle baseline, half below it: energy above idle is Σ share ×
    (energy − idle × covered time) over the pieces, clamped only as a whole. Before, each
    piece was clamped at 0, so the time below idle was dropped and the figure inflated."""
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as s:
        run = repo.create_run(
            s, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=0.0, node="n"
        )
        dev = repo.upsert_device(
            s, name="cpu", kind="cpu", source="rapl", model="", uuid_=None, now=0.0, node="n"
        )
        repo.set_idle_power(s, device_id=dev.id, idle_power_w=50.0)
        samples = [(t / 2, 150.0 if t <= 10 else 20.0) for t in range(21)]
        repo.add_power_samples(
            s,
            rows=[
                {"device_id": dev.id, "t": t, "power_w": p, "energy_j": None} for t, p in samples
            ],
        )
        pieces = [(0.0, 5.0, 0.9), (5.0, 10.0, 0.9)]
        repo.add_run_shares(
            s,
            rows=[
                {
                    "run_id": run.id,
                    "node": "n",
                    "rank": -1,
                    "kind": "cpu",
                    "t0": a,
                    "t1": b,
                    "share": v,
                }
                for a, b, v in pieces
            ],  # fmt: skip
        )
        run.finished_at = 10.0
        e = analysis.run_energy(s, run=run, interval_s=0.5)
    hand = sum(v * (_trapezoid(samples, a, b) - 50.0 * (b - a)) for a, b, v in pieces)
    assert hand == pytest.approx(0.9 * (882.5 - 500.0))  # 150 W to 5 s, 20 W from 5.5 s
    assert e["energy_j"] == pytest.approx(0.9 * 882.5)
    assert e["active_energy_j"] == pytest.approx(hand)


def test_a_running_runs_energy_only_grows_as_share_rows_arrive(tmp_path: Path) -> None:
    """A running run's last share row ends where it was stored, not at now: stretched to now
    at 0.8, the run read 1600 J at t=20 and 1000 J once the row for [10, 20] at 0.2 arrived
    (its live energy and CO2e fell between two reads). A finished run keeps its last share
    to its end."""
    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)

    def share(s: Any, run_id: str, a: float, b: float, v: float) -> None:
        row = {"run_id": run_id, "node": "n", "rank": -1, "kind": "cpu"}
        repo.add_run_shares(s, rows=[row | {"t0": a, "t1": b, "share": v}])

    with session_scope(make_sessionmaker(engine)) as s:
        run = repo.create_run(
            s, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=0.0, node="n"
        )
        dev = repo.upsert_device(
            s, name="cpu", kind="cpu", source="rapl", model="", uuid_=None, now=0.0, node="n"
        )
        repo.add_power_samples(
            s,
            rows=[
                {"device_id": dev.id, "t": t / 2, "power_w": 100.0, "energy_j": None}
                for t in range(61)
            ],
        )
        share(s, run.id, 0.0, 10.0, 0.8)
        first = analysis.run_energy(s, run=run, interval_s=0.5, now=20.0)["energy_j"]
        share(s, run.id, 10.0, 20.0, 0.2)
        second = analysis.run_energy(s, run=run, interval_s=0.5, now=20.0)["energy_j"]
        run.finished_at = 30.0
        done = analysis.run_energy(s, run=run, interval_s=0.5)["energy_j"]
    assert first == pytest.approx(800.0) and second == pytest.approx(1000.0)
    assert done == pytest.approx(1000.0 + 0.2 * 1000.0)  # the last share held to the end
