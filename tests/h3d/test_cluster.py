"""Many nodes on one PostgreSQL store: two daemons play two nodes of a cluster.

They use the real server at 127.0.0.1:5432 (trust auth), each test in a database of its own
that is dropped afterwards. Without a server the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from h3client import Client, H3Profiler
from h3d.storage import migrate
from h3d.storage.engine import make_engine
from tests.conftest import Daemon, free_port, profile_on_two_nodes


@pytest.fixture
def nodes(daemon_factory: Callable[..., Daemon]) -> Callable[..., Daemon]:
    """Start a daemon playing node ``name`` on the store at ``url`` (own data dir and port)."""

    def start(name: str, url: str, **env: str) -> Daemon:
        return daemon_factory(name, H3D_DB_URL=url, H3D_NODE=name, **env)

    return start


def test_one_run_spans_two_nodes_and_either_daemon_reports_it(
    nodes: Callable[..., Daemon], pg_url: str
) -> None:
    a = nodes("node-a", pg_url)
    b = nodes("node-b", pg_url)
    run_id = uuid.uuid4().hex
    profs = [
        H3Profiler("two-nodes", url=d.url, data_dir=d.data_dir, run_id=run_id, rank=r, world_size=2)
        for r, d in enumerate((a, b))
    ]
    for k in range(25):
        for r, p in enumerate(profs):
            p.log_batch(2.0 - 0.05 * k + 0.01 * r, epoch=k // 10)
        time.sleep(0.02)
    first = profs[0].stop(report=False)  # with its report it would wait for rank 1
    with Client(a.url, data_dir=a.data_dir) as c:
        assert c.get_run(run_id)["status"] == "running"  # rank 1 is not done yet
    profs[1].stop()
    assert first["batches_posted"] == 25
    time.sleep(0.5)  # both samplers have written their samples past the window's end

    reports = []
    for d in (a, b):
        with Client(d.url, data_dir=d.data_dir) as c:
            run = c.get_run(run_id)
            assert run["status"] == "finished" and run["n_batches"] == 50
            assert run["world_size"] == 2 and run["node"] in ("node-a", "node-b")
            assert run_id in {r["id"] for r in c.list_runs()["data"]}
            reports.append(c.report(run_id))
        with d.client() as api:  # a daemon lists its own node's devices
            assert {dev["node"] for dev in api.get("/v1/devices").json()["devices"]} == {
                d.env["H3D_NODE"]
            }
    for rep in reports:
        e = rep["energy"]
        assert [n["node"] for n in e["by_node"]] == ["node-a", "node-b"]
        assert all(n["energy_j"] > 0 for n in e["by_node"])
        assert [(r["rank"], r["node"]) for r in e["by_rank"]] == [(0, "node-a"), (1, "node-b")]
        assert e["energy_j"] == pytest.approx(sum(n["energy_j"] for n in e["by_node"]))
        # each node's 50 W device counted once, over the run's window
        assert 0 < e["device_energy_j"] <= 2 * 50.0 * rep["duration_s"] * 1.01
        assert rep["n_steps"] == 25
    assert reports[0]["energy"]["energy_j"] == pytest.approx(reports[1]["energy"]["energy_j"])
    shown = subprocess.run(
        [sys.executable, "-m", "h3d", "show", run_id], env=b.env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "2 ranks, 25 global steps" in shown.stdout
    for line in ("node node-a", "node node-b", "rank 0    node-a", "rank 1    node-b"):
        assert line in shown.stdout, shown.stdout


def test_daemons_starting_at_once_migrate_once(nodes: Callable[..., Daemon], pg_url: str) -> None:
    engine = make_engine(pg_url)
    daemons: list[Daemon] = []
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            daemons.append(nodes(name, pg_url, H3D_LOG_LEVEL="INFO"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("node-a", "node-b")]
    # Both daemons find an empty store and queue on the migration lock, held here so that
    # they surely meet there; once it is released one migrates and the other finds head.
    with migrate.migration_lock(engine):
        for t in threads:
            t.start()
        waiting = 0
        deadline = time.monotonic() + 120
        while waiting < 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
            with engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND database = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database())"
                    )
                ).scalar_one()
        assert waiting == 2 and not daemons and not errors  # both wait at the lock
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert migrate.current_revision(engine) == migrate.head_revision()
    logs = [d.log.read_text() for d in daemons]
    assert sum(log.count("database upgraded from empty") for log in logs) == 1
    assert sum(log.count("(created at head)") for log in logs) == 1
    assert sum(log.count("another h3d migrated it") for log in logs) == 1
    for d in daemons:
        assert httpx.get(f"{d.url}/healthz").status_code == 200
    engine.dispose()


def test_a_run_that_one_node_serves_is_not_reaped_by_the_other(
    nodes: Callable[..., Daemon], pg_url: str
) -> None:
    """Every daemon of a shared store sees every running run. Node b never serves this one:
    it must time it by node a's heartbeat on the store, not fail it after its own timeout."""
    timing = {"H3D_RUN_TIMEOUT_S": "2", "H3D_RUN_REAP_EVERY_S": "0.2"}
    a = nodes("node-a", pg_url, **timing)
    b = nodes("node-b", pg_url, **timing)
    with a.client() as api_a, b.client() as api_b:
        r = api_a.post("/v1/runs", json={"name": "served-by-a", "pid": 1, "host": "gpu-7"})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        t0 = time.monotonic()
        seq = 0
        while time.monotonic() - t0 < 6:  # three of b's timeouts, a request every 0.5 s
            got = api_a.post(
                f"/v1/runs/{run_id}/batches",
                json={"batches": [{"seq": seq, "t": time.time(), "loss": 1.0, "n": 8}]},
            )
            assert got.status_code == 200, (seq, got.text)  # a 409: someone failed the run
            seq += 1
            time.sleep(0.5)
        assert api_b.get(f"/v1/runs/{run_id}").json()["status"] == "running"
        # silent now: failed after the timeout, by one daemon or the other
        deadline = time.monotonic() + 10
        while (got := api_b.get(f"/v1/runs/{run_id}").json())["status"] == "running":
            assert time.monotonic() < deadline, "the silent run was never reaped"
            time.sleep(0.2)
        assert got["status"] == "failed"
        assert got["finished_at"] == pytest.approx(time.time() - 2, abs=2.0)


def test_integers_past_32_bits_are_stored_on_postgresql(
    nodes: Callable[..., Daemon], pg_url: str
) -> None:
    """PostgreSQL's INTEGER is 32-bit; the API takes integers up to 2**53 - 1, and a rank's
    seq (k * world_size + rank) passes 2**31 on a large job: each was a 500."""
    big = 2**31 + 7
    d = nodes("node-a", pg_url)
    with d.client() as api:
        r = api.post("/v1/runs", json={"name": "big", "n_train": 3_000_000_000, "pid": big})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        now = time.time()
        rows = [
            {"seq": big + i, "t": now + i, "loss": 1.0, "n": big, "step": big + i, "epoch": big}
            for i in range(2)
        ]
        r = api.post(f"/v1/runs/{run_id}/batches", json={"batches": rows})
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        r = api.post(f"/v1/runs/{run_id}/epochs", json={"epochs": [{"epoch": big, "t": now}]})
        assert r.status_code == 200, r.text
        got = api.get(f"/v1/runs/{run_id}").json()
    assert got["n_train"] == 3_000_000_000 and got["last_seq"] == big + 1
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT seq, n, step, epoch FROM batches ORDER BY seq")).all()
    engine.dispose()
    assert [tuple(r) for r in stored] == [(big + i, big, big + i, big) for i in range(2)]


def test_one_node_name_is_held_by_one_live_daemon(
    daemon_factory: Callable[..., Daemon], pg_url: str
) -> None:
    """Two daemons sampling as one node on one store wrote one device's samples twice over
    and split every run's share (a 5 s run at 100 W was stored as 11.8 J). The second is
    refused, naming the holder; a node stopped cleanly, or killed on this host, is free at
    once."""
    a = daemon_factory("a", H3D_DB_URL=pg_url, H3D_NODE="gpu-7")
    second = Daemon(
        a.data_dir.parent / "b", {**a.env, "H3D_DATA_DIR": str(a.data_dir.parent / "b")}
    )
    with pytest.raises(RuntimeError, match="h3d exited 2") as refused:  # one line, exit 2
        second.start(timeout_s=60)
    said = str(refused.value)
    assert "another h3d samples as node 'gpu-7'" in said and f"pid {a.proc.pid}" in said
    assert "Traceback" not in said and "serving on" not in said  # refused before serving
    a.stop()  # a clean stop releases the node
    second.start(timeout_s=60)
    second.kill()  # SIGKILL: no release; its process is gone, so the node is free at once
    a.start()
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        held = conn.execute(text("SELECT node, pid FROM node_leases")).all()
    engine.dispose()
    assert [tuple(r) for r in held] == [("gpu-7", a.proc.pid)]


def test_an_autostarted_daemon_refused_its_node_says_why_in_the_training_script(
    daemon_factory: Callable[..., Daemon],
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The profiler said only "no daemon at ...": the reason (a node in use) was in the
    autostarted daemon's log alone."""
    daemon_factory("a", H3D_DB_URL=pg_url, H3D_NODE="gpu-7")
    for k, v in {"H3D_DB_URL": pg_url, "H3D_NODE": "gpu-7", "H3D_LOG_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("H3D_PORT", str(free_port()))
    with caplog.at_level(logging.WARNING, logger="h3client"):
        prof = H3Profiler("refused", data_dir=tmp_path / "b")
        prof.log_batch(1.0)
        prof.stop(timeout_s=5)
    assert "the daemon it started exited: h3d: cannot start: another h3d samples as node" in (
        caplog.text
    )


def test_power_of_a_run_over_two_nodes_is_per_node_and_device(
    nodes: Callable[..., Daemon], pg_url: str, tmp_path: Path
) -> None:
    """Every node has its own ``constant:0``: by name alone, the two nodes' readings were
    interleaved into one saw-tooth (20, 200, 200, 20 ... W), and so was the run's total,
    on the API, the run page and in ``h3d show --html``."""
    a = nodes("node-a", pg_url, H3D_POWER_BACKENDS="constant:20")
    b = nodes("node-b", pg_url, H3D_POWER_BACKENDS="constant:200")
    run_id = uuid.uuid4().hex
    profile_on_two_nodes(a, b, run_id)
    series = f"/v1/runs/{run_id}/series"
    with a.client() as api:

        def power(**params: str) -> list[float]:
            r = api.get(series, params={"metric": "power", **params})
            assert r.status_code == 200, r.text
            return [p[1] for p in r.json()["points"]]

        total = power()
        assert len(total) >= 10 and total == pytest.approx([220.0] * len(total))
        assert set(power(node="node-a", device="constant:0")) == {20.0}
        assert set(power(node="node-b", device="constant:0")) == {200.0}
        assert set(power(node="node-b")) == {200.0}  # a node's devices summed
        r = api.get(series, params={"metric": "power", "device": "constant:0"})
        assert r.status_code == 422  # which node's? refused, naming both
        said = r.json()["error"]["message"]
        assert "node-a, node-b" in said and "node=" in said
        r = api.get(series, params={"metric": "power", "node": "node-c"})
        assert r.status_code == 422 and "node-c" in r.json()["error"]["message"]
        r = api.get(series, params={"metric": "loss", "node": "node-a"})
        assert r.status_code == 422 and "metric=power" in r.json()["error"]["message"]
    out = tmp_path / "two-nodes.html"
    shown = subprocess.run(
        [sys.executable, "-m", "h3d", "show", run_id, "--html", str(out)],
        env=b.env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    data = out.read_text().split('<script type="application/json" id="h3d-data">')[1]
    bundle = json.loads(data.split("</script>")[0])["bundle"]
    rows = bundle["report"]["energy"]["by_device"]
    assert [(d["node"], d["device"]) for d in rows] == [
        ("node-a", "constant:0"),
        ("node-b", "constant:0"),
    ]
    assert [{p[1] for p in pts} for pts in bundle["power"]] == [{20.0}, {200.0}]
