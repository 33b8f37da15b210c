"""The REST API driven over real HTTP against a real ``h3d serve`` process."""

from __future__ import annotations

import base64
import gzip
import json
import math
import struct
import time
from typing import Any

import httpx
import pytest


def make_run(api: httpx.Client, **kw: Any) -> dict[str, Any]:
    r = api.post("/v1/runs", json={"name": "r", **kw})
    assert r.status_code == 201, r.text
    return r.json()


def batches(start: int, count: int, *, t0: float | None = None, per_sample: int = 0) -> list[dict]:
    t0 = time.time() if t0 is None else t0
    out = []
    for s in range(start, start + count):
        b: dict[str, Any] = {"seq": s, "t": t0 + s * 0.01, "loss": 2.3 / (1 + s / 50), "n": 8}
        if per_sample:
            b["losses"] = [0.5 + 0.01 * i for i in range(per_sample)]
            b["indices"] = list(range(s * per_sample, (s + 1) * per_sample))
        out.append(b)
    return out


def err(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_healthz_is_open_and_v1_needs_the_token(daemon: Any) -> None:
    health = httpx.get(f"{daemon.url}/healthz").json()
    assert health["status"] == "ok" and health["authorized"] is False
    # whether this daemon takes the token sent: how a client tells its data dir's daemon
    # from another data dir's on the same port
    for token, taken in ((daemon.token, True), ("wrong", False)):
        r = httpx.get(f"{daemon.url}/healthz", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["authorized"] is taken
    r = httpx.get(f"{daemon.url}/v1/runs")
    assert r.status_code == 401 and err(r)["code"] == "unauthorized"
    r = httpx.get(f"{daemon.url}/v1/runs", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    mode = (daemon.data_dir / "token").stat().st_mode & 0o777
    assert mode == 0o600


def test_run_lifecycle(api: httpx.Client) -> None:
    run = make_run(api, config={"lr": 0.1}, tags=["a", "b"], pid=123, host="h", n_train=1000)
    assert run["status"] == "running" and run["tags"] == ["a", "b"] and run["n_batches"] == 0
    got = api.get(f"/v1/runs/{run['id']}").json()
    assert got["config"] == {"lr": 0.1} and got["pid"] == 123
    r = api.patch(f"/v1/runs/{run['id']}", json={"name": "renamed", "tags": ["c"]})
    assert r.json()["name"] == "renamed" and r.json()["tags"] == ["c"]
    r = api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
    assert r.json()["status"] == "finished" and r.json()["finished_at"] >= run["created_at"]
    r = api.patch(f"/v1/runs/{run['id']}", json={"status": "failed"})
    assert r.status_code == 409 and err(r)["code"] == "run_finished"
    # a client-chosen id and times (a run started offline, replayed later)
    rid = "ab" * 16
    r = api.post("/v1/runs", json={"id": rid, "created_at": 1000.0, "name": "offline"})
    assert r.status_code == 201 and r.json()["id"] == rid and r.json()["created_at"] == 1000.0
    r = api.post("/v1/runs", json={"id": rid})
    assert r.status_code == 409 and err(r)["code"] == "run_exists"
    assert api.post("/v1/runs", json={"id": "not-hex"}).status_code == 422
    r = api.patch(f"/v1/runs/{rid}", json={"status": "finished", "finished_at": 1010.0})
    assert r.json()["finished_at"] == 1010.0


def test_bulk_ingest_is_idempotent_on_seq(api: httpx.Client) -> None:
    run = make_run(api)
    url = f"/v1/runs/{run['id']}/batches"
    r = api.post(url, json={"batches": batches(0, 10_000, per_sample=4)})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 10_000, "duplicates": 0}
    # resend an overlapping window: only the new seqs count
    r = api.post(url, json={"batches": batches(9_990, 20)})
    assert r.json() == {"accepted": 10, "duplicates": 10}
    # a batch repeated inside one request counts once
    r = api.post(url, json={"batches": batches(20_000, 1) * 3})
    assert r.json() == {"accepted": 1, "duplicates": 2}
    got = api.get(f"/v1/runs/{run['id']}").json()
    assert got["n_batches"] == 10_011 and got["last_seq"] == 20_000


def test_gzip_bodies_are_accepted(api: httpx.Client) -> None:
    run = make_run(api)
    body = gzip.compress(json.dumps({"batches": batches(0, 100)}).encode())
    r = api.post(
        f"/v1/runs/{run['id']}/batches",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.json() == {"accepted": 100, "duplicates": 0}
    r = api.post(
        f"/v1/runs/{run['id']}/batches",
        content=b"\x1f\x8bnot gzip",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and err(r)["code"] == "bad_encoding"


def test_epochs_ingest(api: httpx.Client) -> None:
    run = make_run(api)
    ep = {"epoch": 0, "t": time.time(), "accuracy": 0.5, "metrics": {"lr": 0.01}}
    url = f"/v1/runs/{run['id']}/epochs"
    assert api.post(url, json={"epochs": [ep]}).json() == {"accepted": 1, "duplicates": 0}
    assert api.post(url, json={"epochs": [ep, {**ep, "epoch": 1}]}).json() == {
        "accepted": 1,
        "duplicates": 1,
    }
    body = json.dumps({"epochs": [{**ep, "epoch": 2, "accuracy": math.inf}]})
    r = api.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and err(r)["code"] == "nonfinite_loss"


def test_paging_and_filters(api: httpx.Client) -> None:
    ids = [
        make_run(api, name=f"p{i}", tags=["even" if i % 2 == 0 else "odd"])["id"] for i in range(7)
    ]
    api.patch(f"/v1/runs/{ids[0]}", json={"status": "finished"})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/runs", params=params).json()
        assert page["count"] == 7
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each exactly once
    assert api.get("/v1/runs", params={"tag": "even"}).json()["count"] == 4
    assert api.get("/v1/runs", params={"status": "finished"}).json()["count"] == 1
    assert api.get("/v1/runs", params={"name": "p3"}).json()["count"] == 1
    assert api.get("/v1/runs", params={"since": time.time() + 60}).json()["count"] == 0
    r = api.get("/v1/runs", params={"cursor": "garbage!"})
    assert r.status_code == 422


def test_error_codes(api: httpx.Client, daemon: Any) -> None:
    r = api.get("/v1/runs/nope")
    assert r.status_code == 404 and err(r)["code"] == "run_not_found"
    r = api.post("/v1/runs/nope/batches", json={"batches": batches(0, 1)})
    assert r.status_code == 404
    run = make_run(api)
    url = f"/v1/runs/{run['id']}/batches"
    # 422 with the field's path
    r = api.post(url, json={"batches": [{"seq": -1, "t": 1.0, "loss": 1.0}]})
    e = err(r)
    assert r.status_code == 422 and e["code"] == "validation_error"
    assert e["details"][0]["loc"] == ["body", "batches", 0, "seq"]
    r = api.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = api.post(
        url,
        json={"batches": [{"seq": 0, "t": 1.0, "loss": 1.0, "losses": [1.0], "indices": [1, 2]}]},
    )
    assert r.status_code == 422
    # NaN / inf rejected naming the batch; nothing of the request is written
    good = batches(0, 5)
    bad = {"seq": 5, "t": time.time(), "loss": float("nan")}
    r = api.post(
        url,
        content=json.dumps({"batches": [*good, bad]}),
        headers={"Content-Type": "application/json"},
    )
    e = err(r)
    assert r.status_code == 422 and e["code"] == "nonfinite_loss" and e["details"]["seq"] == 5
    bad_vec = {"seq": 6, "t": time.time(), "loss": 1.0, "losses": [1.0, float("inf")]}
    r = api.post(
        url,
        content=json.dumps({"batches": [bad_vec]}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "seq=6" in err(r)["message"]
    r = api.post(url, json={"batches": [{"seq": 7, "t": 1.0, "loss": None}]})
    assert r.status_code == 422 and err(r)["code"] == "nonfinite_loss"
    assert api.get(f"/v1/runs/{run['id']}").json()["n_batches"] == 0
    # ... unless sent as null with the documented flag
    r = api.post(
        url,
        json={
            "batches": [*good, {"seq": 5, "t": time.time(), "loss": None, "losses": [None, 1.0]}],
            "nonfinite_as_null": True,
        },
    )
    assert r.json() == {"accepted": 6, "duplicates": 0}
    assert api.get(f"/v1/runs/{run['id']}").json()["n_nonfinite"] == 1
    # 413 over the size limit
    r = api.post(
        url, content=b"x" * (65 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and err(r)["code"] == "payload_too_large"
    bomb = gzip.compress(b" " * (70 * 1024 * 1024))
    r = api.post(
        url, content=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    # 409 into a finished run
    api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
    r = api.post(url, json={"batches": [*good, *batches(100, 1)]})
    assert r.status_code == 409 and err(r)["code"] == "run_finished"
    assert err(r)["details"] == {"status": "finished", "not_stored": 1}
    # ... but a replay of what it holds is acknowledged: the 409 never means "stored"
    assert api.post(url, json={"batches": good}).json() == {"accepted": 0, "duplicates": 5}
    r = api.post(f"/v1/runs/{run['id']}/epochs", json={"epochs": [{"epoch": 0, "t": 1.0}]})
    assert r.status_code == 409
    # unknown route and wrong method are JSON too
    assert err(api.get("/v1/nothing"))["code"] == "not_found"
    assert api.delete("/v1/runs").status_code == 405


@pytest.mark.parametrize(
    "body",
    [
        None,
        b"",
        b"[]",
        b'{"batches": "x"}',
        b'{"batches": [{"seq": "a"}]}',
        b'{"batches": [{"seq": 1e400, "t": 1, "loss": 1}]}',
        b'{"batches": [{"seq": 1, "t": "NaN", "loss": 1}]}',
        b'{"batches": [{"seq": 1, "t": NaN, "loss": 1}]}',
        b'{"batches": [{"seq": 99999999999999999999, "t": 1, "loss": 1}]}',
        b'{"batches": [{"seq": 1, "t": 1, "loss": 1, "losses": [1], "indices": [99999999999999999999]}]}',
        b'{"batches": [{"seq": 1, "t": 1, "loss": 1, "losses": [1e39]}]}',
        b'{"batches": [], "extra": 1}',
        b"\xff\xfe",
    ],
)
def test_malformed_bodies_are_4xx_never_500(api: httpx.Client, body: bytes | None) -> None:
    run = make_run(api)
    r = api.post(
        f"/v1/runs/{run['id']}/batches", content=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_energy_eta_series_report_export_compare(api: httpx.Client) -> None:
    run = make_run(api, n_train=800)
    t0 = time.time()
    sent = []
    seq = 0
    for epoch in range(3):
        time.sleep(0.4)
        now = time.time()
        chunk = [
            {
                "seq": seq + i,
                "t": now - 0.3 + i * 0.01,
                "loss": 2.0 * math.exp(-(seq + i) / 40),
                "n": 8,
                "epoch": epoch,
                "phase": "warmup" if epoch == 0 else "thermodynamic",
            }
            for i in range(25)
        ]
        seq += 25
        sent += chunk
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": chunk}).raise_for_status()
        api.post(
            f"/v1/runs/{run['id']}/epochs",
            json={"epochs": [{"epoch": epoch, "t": time.time(), "accuracy": 0.5 + 0.1 * epoch}]},
        ).raise_for_status()
    api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
    done = api.get(f"/v1/runs/{run['id']}").json()
    duration = done["finished_at"] - done["created_at"]
    energy = api.get(f"/v1/runs/{run['id']}/energy").json()
    # the constant:50 test backend draws exactly 50 W: energy ≈ 50 W × the window
    assert energy["energy_j"] == pytest.approx(50.0 * duration, rel=0.05)
    assert energy["source"] == "estimated" and energy["measured"] is False
    assert energy["by_device"][0]["method"] == "trapezoid"
    assert energy["by_device"][0]["granularity_s"] is None  # unknown, never the sampling period
    assert energy["by_device"][0]["below_granularity"] is False
    eta = api.get(f"/v1/runs/{run['id']}/eta", params={"window": 0.5}).json()
    k = eta["smoothing_batches"]
    losses = [b["loss"] for b in sent]
    l0, lt = losses[0], sum(losses[-k:]) / k  # 75 batches: L0 from the first one
    assert eta["loss_start"] == pytest.approx(l0) and eta["loss_now"] == pytest.approx(lt)
    assert eta["info_gain_bits"] == pytest.approx((l0 - lt) / math.log(2))
    assert eta["eta_bits_per_j"] == pytest.approx(
        eta["info_gain_bits"] / energy["energy_j"], rel=1e-6
    )
    assert eta["info_gain_total_bits"] == pytest.approx(800 * eta["info_gain_bits"])
    assert (
        eta["marginal_eta_bits_per_j"] is not None and eta["window_energy_j"] < energy["energy_j"]
    )
    s = api.get(f"/v1/runs/{run['id']}/series", params={"metric": "loss", "points": 10}).json()
    assert len(s["points"]) == 10 and s["points"][0][1] == pytest.approx(losses[0])
    p = api.get(f"/v1/runs/{run['id']}/series", params={"metric": "power", "points": 50}).json()
    assert p["points"] and all(v == pytest.approx(50.0) for _t, v in p["points"])
    assert api.get(f"/v1/runs/{run['id']}/series", params={"metric": "eta"}).json()["points"]
    # cumulative energy at each point, summed step by step: 50 W since the run's start
    es = api.get(f"/v1/runs/{run['id']}/series", params={"metric": "energy", "points": 20})
    pts = es.json()["points"]
    assert len(pts) >= 10 and all(b[1] >= a[1] for a, b in zip(pts, pts[1:], strict=False))
    for t, e in pts:
        assert e == pytest.approx(50.0 * (t - done["created_at"]), rel=0.05, abs=1.0)
    assert api.get(f"/v1/runs/{run['id']}/series", params={"metric": "bogus"}).status_code == 422
    rep = api.get(f"/v1/runs/{run['id']}/report").json()
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1, 2]
    assert rep["epochs"][2]["accuracy"] == pytest.approx(0.7)
    assert [p["phase"] for p in rep["phases"]] == ["warmup", "thermodynamic"]
    total_epoch_energy = sum(e["energy_j"] for e in rep["epochs"])
    assert total_epoch_energy <= energy["energy_j"] * 1.001
    # the phases tile the epochs: warmup is epoch 0 and costs what epoch 0 cost (it left out
    # the time before its first batch and after its last)
    ph, ep = rep["phases"], rep["epochs"]
    assert ph[0]["energy_j"] == pytest.approx(ep[0]["energy_j"], rel=1e-9)
    assert ph[1]["energy_j"] == pytest.approx(ep[1]["energy_j"] + ep[2]["energy_j"], rel=1e-9)
    assert ph[0]["t_end"] == ph[1]["t_start"] == ep[0]["t_end"]
    csv_text = api.get(f"/v1/runs/{run['id']}/export.csv").text.splitlines()
    assert csv_text[0] == "seq,t,epoch,step,rank,phase,n,loss" and len(csv_text) == 76
    assert float(csv_text[1].split(",")[-1]) == pytest.approx(losses[0])
    other = make_run(api)
    cmp = api.get("/v1/compare", params={"runs": f"{run['id']},{other['id']}"}).json()
    assert [c["run_id"] for c in cmp["runs"]] == [run["id"], other["id"]]
    assert cmp["runs"][0]["final_accuracy"] == pytest.approx(0.7)
    assert api.get("/v1/compare", params={"runs": f"{run['id']},nope"}).status_code == 404
    assert t0 <= done["created_at"] + 1


def test_a_report_asked_for_at_the_end_sees_the_whole_run(daemon_factory: Any) -> None:
    """Readings the sampler has not stored yet are read too (its read overlay): a client that
    asks the moment its run ends gets the whole window's energy, though the next scheduled
    flush is a minute away."""
    d = daemon_factory(H3D_FLUSH_INTERVAL_S="60")
    with d.client() as api:
        run = make_run(api)
        time.sleep(0.3)
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
        done = api.get(f"/v1/runs/{run['id']}").json()
        energy = api.get(f"/v1/runs/{run['id']}/report").json()["energy"]
    assert energy["energy_j"] == pytest.approx(
        50.0 * (done["finished_at"] - done["created_at"]), rel=0.05
    )


def test_devices_and_sampler_stats(api: httpx.Client) -> None:
    time.sleep(0.3)
    d = api.get("/v1/devices").json()
    assert d["devices"][0]["name"] == "constant:0" and d["devices"][0]["status"] == "ok"
    assert d["devices"][0]["note"] == ""  # a start-up fallback or caveat would be here
    assert d["sampler"]["ticks"] > 3 and d["sampler"]["achieved_hz"] > 5


def test_everything_survives_a_restart(daemon: Any) -> None:
    with daemon.client() as api:
        run = make_run(api, tags=["keep"])
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches(0, 500, per_sample=3)})
        api.post(
            f"/v1/runs/{run['id']}/epochs",
            json={"epochs": [{"epoch": 0, "t": time.time(), "accuracy": 0.9}]},
        )
        before = api.get(f"/v1/runs/{run['id']}/export.csv").text
    daemon.kill()  # SIGKILL: no clean shutdown
    daemon.start()
    with daemon.client() as api:
        got = api.get(f"/v1/runs/{run['id']}").json()
        assert got["n_batches"] == 500 and got["n_epochs"] == 1 and got["tags"] == ["keep"]
        assert api.get(f"/v1/runs/{run['id']}/export.csv").text == before
        r = api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches(0, 501)})
        assert r.json() == {"accepted": 1, "duplicates": 500}


def test_prometheus_metrics(daemon: Any) -> None:
    with daemon.client() as api:
        run = make_run(api, name="prom")
        api.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches(0, 50)})
        done = make_run(api, name="done")
        api.patch(f"/v1/runs/{done['id']}", json={"status": "finished"})
    time.sleep(0.3)
    r = httpx.get(f"{daemon.url}/metrics")  # run ids and names: not for every local user
    assert r.status_code == 401 and err(r)["code"] == "unauthorized"
    with daemon.client() as api:
        text = api.get("/metrics").text
    assert "# TYPE h3d_device_energy_joules_total counter" in text
    energy = [ln for ln in text.splitlines() if ln.startswith("h3d_device_energy_joules_total{")]
    assert 'device="constant:0"' in energy[0] and float(energy[0].split()[-1]) > 0
    assert 'h3d_device_power_watts{device="constant:0",source="estimated"} 50.0' in text
    assert f'h3d_run_energy_joules_total{{run="{run["id"]}"' in text
    assert done["id"] not in text  # only running runs are exported
    # η from the running energy total and the loss at both ends (the run was followed
    # from its start); the storage of readings is healthy
    assert f'h3d_run_efficiency_bits_per_joule{{run="{run["id"]}"' in text
    assert "h3d_storage_up 1.0" in text and "h3d_storage_dropped_readings_total 0.0" in text
    first = float(energy[0].split()[-1])
    with daemon.client() as api:  # within a second: the same rendering
        assert api.get("/metrics").text == text
    time.sleep(1.3)
    with daemon.client() as api:
        again = api.get("/metrics").text
    later = next(
        ln for ln in again.splitlines() if ln.startswith("h3d_device_energy_joules_total{")
    )
    assert float(later.split()[-1]) == pytest.approx(first + 50 * 1.3, rel=0.3)


def test_dashboard_is_served_and_reads_the_api_with_the_token(daemon: Any) -> None:
    page = httpx.get(f"{daemon.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    js = httpx.get(f"{daemon.url}/static/app.js")  # the page's script is a separate file
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "Authorization" in js.text and "sessionStorage" in js.text
    assert daemon.token not in page.text + js.text  # the page never embeds the token


def test_packed_per_sample_losses_are_stored_like_lists(daemon: Any) -> None:
    import base64
    from array import array

    from h3d.storage import repository as repo
    from h3d.storage.engine import make_engine, make_sessionmaker, session_scope

    def b64(code: str, values: list) -> str:
        return base64.b64encode(array(code, values).tobytes()).decode()

    with daemon.client() as api:
        run = make_run(api)
        url = f"/v1/runs/{run['id']}/batches"
        packed = {
            "seq": 0,
            "t": time.time(),
            "loss": 1.0,
            "losses_f32": b64("f", [0.5, 1.5]),
            "indices_i64": b64("q", [7, 2**40]),
        }
        plain = {
            "seq": 1,
            "t": time.time(),
            "loss": 1.0,
            "losses": [0.5, 1.5],
            "indices": [7, 2**40],
        }
        assert api.post(url, json={"batches": [packed, plain]}).json() == {
            "accepted": 2,
            "duplicates": 0,
        }
        nan_batch = {
            "seq": 2,
            "t": time.time(),
            "loss": 1.0,
            "losses_f32": b64("f", [1.0, float("inf")]),
        }
        r = api.post(url, json={"batches": [nan_batch]})
        assert r.status_code == 422 and err(r)["details"]["field"] == "losses_f32"
        assert (
            api.post(url, json={"batches": [nan_batch], "nonfinite_as_null": True}).status_code
            == 200
        )
        for bad in (
            {"losses_f32": "!!"},
            {"losses_f32": b64("f", [1.0]), "indices_i64": b64("q", [1, 2])},
            {"losses_f32": "AAA="},
            {"losses_f32": "AAAA=="},  # padding after a whole quantum
            {"losses_f32": "AAAA\nAAAA"},
            {"losses_f32": 5},
            {"losses": [1.0], "losses_f32": b64("f", [1.0])},
        ):
            r = api.post(url, json={"batches": [{"seq": 9, "t": 1.0, "loss": 1.0, **bad}]})
            assert r.status_code == 422, bad
    engine = make_engine(f"sqlite:///{daemon.data_dir / 'h3d.db'}")
    with session_scope(make_sessionmaker(engine)) as s:
        assert repo.sample_losses(s, run_id=run["id"], seq=0) == repo.sample_losses(
            s, run_id=run["id"], seq=1
        )
        losses, _idx = repo.sample_losses(s, run_id=run["id"], seq=2)
        assert losses[0] == 1.0 and losses[1] != losses[1]  # inf stored as missing (NaN)
    engine.dispose()


def test_per_sample_losses_come_back_as_csv(daemon: Any) -> None:
    """What log_batch(losses=, indices=) stored is served: one row per sample, in seq order,
    float32 values exactly, non-finite and absent fields empty, across export pages."""
    import csv
    import io

    import numpy as np

    with daemon.client() as api:
        run = make_run(api)
        url = f"/v1/runs/{run['id']}/batches"
        first = [
            {"seq": 0, "t": 1.0, "loss": 1.0, "epoch": 0, "losses": [0.5, 0.1, None],
             "indices": [3, 4, 2**40]},
            {"seq": 1, "t": 1.1, "loss": 1.0, "epoch": 0},  # no per-sample losses: no rows
            {"seq": 2, "t": 1.2, "loss": 1.0, "epoch": 1, "losses": [2.25]},  # no indices
        ]  # fmt: skip
        rng = np.random.default_rng(0)
        many = [
            {"seq": k, "t": 2.0 + k, "loss": 1.0, "epoch": 2,
             "losses": rng.random(4).tolist(), "indices": [4 * k + j for j in range(4)]}
            for k in range(3, 503)
        ]  # fmt: skip
        for chunk in (first, many):
            body = {"batches": chunk, "nonfinite_as_null": True}
            assert api.post(url, json=body).json()["accepted"] == len(chunk)
        r = api.get(f"/v1/runs/{run['id']}/samples.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0] == ["seq", "epoch", "index", "loss"]
        assert rows[1:5] == [
            ["0", "0", "3", "0.5"],
            ["0", "0", "4", f"{np.float32(0.1):.9g}"],
            ["0", "0", str(2**40), ""],  # sent as non-finite: stored as missing
            ["2", "1", "", "2.25"],  # logged without indices
        ]
        assert len(rows) == 1 + 4 + 500 * 4  # every sample once, past the 200-batch pages
        expected = [(b["seq"], i, np.float32(v)) for b in many for i, v in
                    zip(b["indices"], b["losses"], strict=True)]  # fmt: skip
        got = [(int(a), int(i), np.float32(v)) for a, _e, i, v in rows[5:]]
        assert got == expected  # float32 values read back exactly
        empty = make_run(api)
        r = api.get(f"/v1/runs/{empty['id']}/samples.csv")
        assert r.status_code == 200 and r.text.strip() == "seq,epoch,index,loss"
        r = api.get(f"/v1/runs/{'0' * 32}/samples.csv")
        assert r.status_code == 404 and err(r)["code"] == "run_not_found"


def columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``rows`` (the row form, per-sample values as lists) as a columnar body."""
    import base64
    from array import array

    def b64(code: str, values: list) -> str:
        return base64.b64encode(array(code, values).tobytes()).decode()

    nan = float("nan")
    sizes = [len(r["losses"]) if "losses" in r else -1 for r in rows]
    out: dict[str, Any] = {
        "seq_i64": b64("q", [r["seq"] for r in rows]),
        "t_f64": b64("d", [r["t"] for r in rows]),
        "loss_f64": b64("d", [nan if r["loss"] is None else r["loss"] for r in rows]),
    }
    if max(sizes, default=-1) >= 0:
        out["sizes_i64"] = b64("q", sizes)
        out["losses_f32"] = b64("f", [v for r in rows for v in r.get("losses", [])])
        out["indices_i64"] = b64("q", [v for r in rows for v in r.get("indices", [])])
    for name in ("n", "epoch", "step", "phase"):
        if any(name in r for r in rows):
            out[name] = [r.get(name) for r in rows]
    return out


def test_columnar_batches_are_stored_as_the_same_rows(daemon: Any) -> None:
    """The client's columnar form and the row form store the same rows, per-sample values
    included; the columnar form is validated as strictly."""
    from h3d.storage import repository as repo
    from h3d.storage.engine import make_engine, make_sessionmaker, session_scope
    from h3d.storage.models import Batch

    t0 = time.time()
    rows: list[dict[str, Any]] = [
        {"seq": 0, "t": t0, "loss": 2.5, "losses": [2.0, 3.0], "indices": [4, 2**40]},
        {"seq": 1, "t": t0 + 0.1, "loss": None, "n": 5, "epoch": 0, "phase": "warmup"},
        {"seq": 2, "t": t0 + 0.2, "loss": 1.0, "losses": [], "indices": [], "step": 7},
        {"seq": 3, "t": t0 + 0.3, "loss": 0.5, "losses": [0.25, float("nan"), 0.75],
         "indices": [1, 2, 3]},
    ]  # fmt: skip
    plain = [
        {**r, "losses": [None if v != v else v for v in r["losses"]]} if "losses" in r else r
        for r in rows
    ]
    with daemon.client() as api:
        a = make_run(api)
        b = make_run(api, id="c0" * 16, rank=2, world_size=3)  # its batches carry rank 2
        r = api.post(
            f"/v1/runs/{a['id']}/batches", json={"batches": plain, "nonfinite_as_null": True}
        )
        assert r.json() == {"accepted": 4, "duplicates": 0}, r.text
        body = {"columns": columns(rows), "nonfinite_as_null": True, "rank": 2}
        r = api.post(f"/v1/runs/{b['id']}/batches", json=body)
        assert r.json() == {"accepted": 4, "duplicates": 0}, r.text
        again = api.post(f"/v1/runs/{b['id']}/batches", json=body)  # idempotent on seq
        assert again.json() == {"accepted": 0, "duplicates": 4}
        url = f"/v1/runs/{b['id']}/batches"
        strict = api.post(url, json={"columns": columns([{**rows[0], "seq": 9, "loss": None}])})
        assert strict.status_code == 422 and err(strict)["code"] == "nonfinite_loss"
        assert err(strict)["details"] == {"seq": 9, "field": "loss_f64"}
        inf = columns([rows[0], {**rows[3], "seq": 10, "losses": [1.0, float("inf"), 2.0]}])
        r = api.post(url, json={"columns": inf})
        assert r.status_code == 422 and err(r)["details"] == {"seq": 10, "field": "losses_f32"}
        # +inf and -inf together (math.fsum raises on them: that was a 500), on every path
        both = [1.0, float("inf"), float("nan"), float("-inf")]
        signed = {"seq": 11, "t": t0, "loss": 1.0, "losses": both, "indices": [1, 2, 3, 4]}
        packed = base64.b64encode(struct.pack("<4f", *both)).decode()
        c_url = f"/v1/runs/{make_run(api)['id']}/batches"
        for body in (
            {"columns": columns([signed])},
            {"batches": [{"seq": 11, "t": t0, "loss": 1.0, "losses_f32": packed}]},
        ):
            r = api.post(c_url, json=body)
            assert r.status_code == 422 and err(r)["details"]["seq"] == 11, r.text
            kept = api.post(c_url, json={**body, "nonfinite_as_null": True})
            assert kept.status_code == 200, kept.text
        good = columns(rows[:1])
        for bad in (
            {"sizes_i64": columns(rows[:2])["sizes_i64"]},  # two sizes for one batch
            {"t_f64": columns([{**rows[0], "t": float("inf")}])["t_f64"]},
            {"seq_i64": columns([{**rows[0], "seq": -1}])["seq_i64"]},
            {"indices_i64": columns(rows[3:])["indices_i64"]},  # 3 indices for 2 losses
            {"sizes_i64": None},
            {"n": [1, 2]},
            {"phase": ["x" * 33]},
            {"loss_f64": "AAA="},
            {"extra": 1},
        ):
            r = api.post(url, json={"columns": {**good, **bad}})
            assert r.status_code == 422 and err(r)["code"] == "validation_error", (bad, r.text)
        both = {"columns": good, "batches": plain[:1]}
        for bad_body in (both, {}, {"columns": None}):
            r = api.post(url, json=bad_body)
            assert r.status_code == 422, bad_body
        # without an n column, n is each batch's number of per-sample losses
        c = columns([{k: v for k, v in r.items() if k != "n"} for r in rows])
        c["seq_i64"] = columns([{**r, "seq": r["seq"] + 100} for r in rows])["seq_i64"]
        assert api.post(url, json={"columns": c, "nonfinite_as_null": True}).status_code == 200
    engine = make_engine(f"sqlite:///{daemon.data_dir / 'h3d.db'}")
    fields = ("seq", "t", "loss", "n", "epoch", "step", "phase")
    with session_scope(make_sessionmaker(engine)) as s:
        got = {}
        for run in (a, b):
            got[run["id"]] = [
                tuple(getattr(x, f) for f in fields)
                for x in s.query(Batch).filter_by(run_id=run["id"]).order_by(Batch.seq)
            ]
            ranks = {x.rank for x in s.query(Batch).filter_by(run_id=run["id"])}
            assert ranks == ({None} if run is a else {2, None})  # the last post had no rank
        assert got[a["id"]] == got[b["id"]][:4] and len(got[a["id"]]) == 4
        assert [x[3] for x in got[b["id"]][4:]] == [2, None, 0, 3]
        for seq in (0, 2, 3):
            la, ia = repo.sample_losses(s, run_id=a["id"], seq=seq)
            lb, ib = repo.sample_losses(s, run_id=b["id"], seq=seq)
            assert ia == ib and str(la) == str(lb), seq  # str: NaN equals NaN
    engine.dispose()


def test_overlapping_identical_posts_leave_the_counters_exact(daemon: Any) -> None:
    """A client retrying after its timeout while the first request still runs sends the
    same body twice at once: the counters count stored rows, once."""
    from concurrent.futures import ThreadPoolExecutor

    with daemon.client() as api:
        run = make_run(api)
    url = f"/v1/runs/{run['id']}/batches"
    t0 = time.time()
    clients = [daemon.client() for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            accepted = 0
            for rep in range(5):
                body = {"batches": batches(rep * 500, 500, t0=t0, per_sample=2)}
                results = list(pool.map(lambda c, b=body: c.post(url, json=b), clients))
                assert all(r.status_code == 200 for r in results)
                accepted += sum(r.json()["accepted"] for r in results)
                assert sum(r.json()["duplicates"] for r in results) == 3 * 500
    finally:
        for c in clients:
            c.close()
    assert accepted == 2500
    with daemon.client() as api:
        got = api.get(f"/v1/runs/{run['id']}").json()
    assert got["n_batches"] == 2500 and got["last_seq"] == 2499


def test_runs_whose_process_is_gone_are_reaped_as_failed(daemon_factory: Any) -> None:
    import subprocess

    d = daemon_factory(
        "reap", H3D_RUN_EXIT_GRACE_S="0.5", H3D_RUN_TIMEOUT_S="3", H3D_RUN_REAP_EVERY_S="0.2"
    )
    trainer = subprocess.Popen(["sleep", "60"])
    with d.client() as api:
        local = make_run(api, pid=trainer.pid)
        remote = make_run(api, pid=1, host="node-7.example")  # not followable: heartbeat
        alive = make_run(api)
        trainer.kill()  # SIGKILL: no "finished" will ever come
        trainer.wait()
        deadline = time.monotonic() + 10
        while api.get(f"/v1/runs/{local['id']}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the dead run was not reaped"
            time.sleep(0.1)
        got = api.get(f"/v1/runs/{local['id']}").json()
        assert got["status"] == "failed" and got["finished_at"] is not None
        r = api.post(f"/v1/runs/{local['id']}/batches", json={"batches": batches(0, 1)})
        assert r.status_code == 409
        # the remote run keeps running while it sends, and is failed after its timeout
        for i in range(3):
            api.post(f"/v1/runs/{alive['id']}/batches", json={"batches": batches(i, 1)})
            time.sleep(1.0)
        assert api.get(f"/v1/runs/{alive['id']}").json()["status"] == "running"
        deadline = time.monotonic() + 10
        while api.get(f"/v1/runs/{remote['id']}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the silent remote run was not reaped"
            time.sleep(0.2)


def test_a_quiet_local_run_whose_process_runs_is_never_timed_out(daemon_factory: Any) -> None:
    """A run quiet for longer than H3D_RUN_TIMEOUT_S (data preparation before its first
    batch, a long evaluation) was failed while its process ran here, and every later
    request refused (409). Its followed process is its heartbeat; a silent remote run is
    still failed after the timeout, and the local one once its process exits."""
    import subprocess

    d = daemon_factory(
        "quiet", H3D_RUN_EXIT_GRACE_S="0.5", H3D_RUN_TIMEOUT_S="1", H3D_RUN_REAP_EVERY_S="0.2"
    )
    trainer = subprocess.Popen(["sleep", "60"])
    try:
        with d.client() as api:
            local = make_run(api, pid=trainer.pid)
            remote = make_run(api, pid=1, host="node-7.example")  # not followable: timed out
            deadline = time.monotonic() + 10
            while api.get(f"/v1/runs/{remote['id']}").json()["status"] == "running":
                assert time.monotonic() < deadline, "the silent remote run was not reaped"
                time.sleep(0.2)
            time.sleep(1.5)  # the local run: silent for more than twice the timeout
            assert api.get(f"/v1/runs/{local['id']}").json()["status"] == "running"
            r = api.post(f"/v1/runs/{local['id']}/batches", json={"batches": batches(0, 5)})
            assert r.status_code == 200, r.text
            trainer.kill()
            trainer.wait()
            deadline = time.monotonic() + 10
            while api.get(f"/v1/runs/{local['id']}").json()["status"] == "running":
                assert time.monotonic() < deadline, "the run whose process exited was not reaped"
                time.sleep(0.1)
            assert api.get(f"/v1/runs/{local['id']}").json()["n_batches"] == 5
    finally:
        trainer.kill()
        trainer.wait()


def test_a_run_whose_joined_ranks_all_ended_waits_the_grace_not_the_timeout(
    daemon_factory: Any,
) -> None:
    """Only rank 0 of a 2-rank job made a profiler (or rank 1 died before making its own):
    rank 0 finished and its process exited, and the run stayed running for the hour of
    H3D_RUN_TIMEOUT_S. It is failed after the exit grace, at its last activity; a run whose
    joined rank is still running is not."""
    d = daemon_factory(
        "ranks-ended",
        H3D_RUN_EXIT_GRACE_S="0.5",
        H3D_RUN_TIMEOUT_S="600",
        H3D_RUN_REAP_EVERY_S="0.2",
    )
    with d.client() as api:
        lone = make_run(api, id="1d" * 16, rank=0, world_size=2, pid=1, host="elsewhere")
        going = make_run(api, id="2d" * 16, rank=0, world_size=2, pid=1, host="elsewhere")
        api.post(f"/v1/runs/{lone['id']}/batches", json={"rank": 0, "batches": batches(0, 2)})
        r = api.patch(f"/v1/runs/{lone['id']}", json={"status": "finished", "rank": 0})
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        deadline = time.monotonic() + 10
        while api.get(f"/v1/runs/{lone['id']}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the run waited for the timeout"
            time.sleep(0.1)
        got = api.get(f"/v1/runs/{lone['id']}").json()
        assert got["status"] == "failed" and got["finished_at"] is not None
        assert api.get(f"/v1/runs/{going['id']}").json()["status"] == "running"


def test_a_restarted_daemon_fails_a_run_whose_process_died_meanwhile(
    daemon_factory: Any,
) -> None:
    """The training process died while the daemon was down. The restarted daemon does not
    follow a process that is gone: the run takes no share of the devices (it split them with
    the runs that came after, up to all of each), is failed after the exit grace (not the
    timeout), at its last activity (not the restart)."""
    import sqlite3
    import subprocess

    d = daemon_factory(
        "restart-dead",
        H3D_POWER_BACKENDS="constant:100",
        H3D_RUN_EXIT_GRACE_S="0.5",
        H3D_RUN_TIMEOUT_S="600",
        H3D_RUN_REAP_EVERY_S="0.2",
    )
    trainer = subprocess.Popen(["sleep", "60"])
    with d.client() as api:
        dead = make_run(api, pid=trainer.pid)
        api.post(f"/v1/runs/{dead['id']}/batches", json={"batches": batches(0, 1)})
        time.sleep(0.6)  # its heartbeat reaches the store
    d.stop()
    con = sqlite3.connect(f"file:{d.data_dir / 'h3d.db'}?mode=ro", uri=True)
    with con:
        (last,) = con.execute("SELECT seen_at FROM runs WHERE id = ?", (dead["id"],)).fetchone()
    con.close()
    assert last is not None
    trainer.kill()
    trainer.wait()
    time.sleep(1.0)
    d.start()
    with d.client() as api:
        deadline = time.monotonic() + 10
        while api.get(f"/v1/runs/{dead['id']}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the dead run waited for the timeout"
            time.sleep(0.1)
        got = api.get(f"/v1/runs/{dead['id']}").json()
        assert got["status"] == "failed" and got["finished_at"] == pytest.approx(last)
        energy = api.get(f"/v1/runs/{dead['id']}/energy").json()["energy_j"]
        alone = make_run(api)
        time.sleep(1.5)
        api.patch(f"/v1/runs/{alone['id']}", json={"status": "finished"}).raise_for_status()
        done = api.get(f"/v1/runs/{alone['id']}").json()
        e = api.get(f"/v1/runs/{alone['id']}/energy").json()["energy_j"]
        assert e == pytest.approx(100.0 * (done["finished_at"] - done["created_at"]), rel=0.05)
        assert api.get(f"/v1/runs/{dead['id']}/energy").json()["energy_j"] == energy


def test_hostile_inputs_are_4xx_with_the_error_body(api: httpx.Client) -> None:
    deep: Any = 1
    for _ in range(300):
        deep = {"a": deep}
    raw = {
        "deep config": json.dumps({"config": deep}),
        "NaN in config": '{"config": {"lr": NaN}}',
        "1e309 in config": '{"config": {"lr": 1e309}}',
        "absurd created_at": '{"created_at": -1.7e308}',
        "future created_at": json.dumps({"created_at": time.time() + 10 * 86400}),
        "1 MB tag": json.dumps({"tags": ["x" * 1_000_000]}),
        "big config": json.dumps({"config": {"blob": "x" * 100_000}}),
        "bool pid": '{"pid": true}',
    }
    for what, body in raw.items():
        r = api.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (what, r.text[:200])
        assert err(r)["code"] == "validation_error", what
    run = make_run(api)
    url = f"/v1/runs/{run['id']}/batches"
    for what, b in {
        "string seq": {"seq": "3", "t": time.time(), "loss": 1.0},
        "bool seq": {"seq": True, "t": time.time(), "loss": 1.0},
        "unknown key": {"seq": 3, "t": time.time(), "loss": 1.0, "lsos": 2.0},
    }.items():
        r = api.post(url, json={"batches": [b]})
        assert r.status_code == 422 and err(r)["code"] == "validation_error", what
    # gzip with two members: both are read (cat a.gz b.gz), nothing dropped silently
    part1 = json.dumps({"batches": batches(0, 3)}).encode()
    two = gzip.compress(part1[:20]) + gzip.compress(part1[20:])
    r = api.post(
        url, content=two, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert r.json() == {"accepted": 3, "duplicates": 0}
    truncated = gzip.compress(part1)[:-10]
    r = api.post(
        url,
        content=truncated,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and err(r)["code"] == "bad_encoding"
    assert api.get(f"/v1/runs/{run['id']}").json()["n_batches"] == 3  # nothing partial


def test_browser_defences_host_check_csp_and_offline_docs(daemon: Any) -> None:
    # a DNS-rebinding page reaches 127.0.0.1 under its own name: refused before auth
    r = httpx.get(f"{daemon.url}/metrics", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and err(r)["code"] == "bad_host"
    for host in ("localhost", "127.0.0.1", f"localhost:{daemon.port}"):
        assert httpx.get(f"{daemon.url}/healthz", headers={"Host": host}).status_code == 200
    page = httpx.get(f"{daemon.url}/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp  # docs/dashboard.md
    assert "script-src 'self';" in csp and "style-src 'self';" in csp
    assert page.headers["x-frame-options"] == "DENY"
    docs = httpx.get(f"{daemon.url}/docs")
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # works on an air-gapped cluster
    js = httpx.get(f"{daemon.url}/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    # OPTIONS names every method the path has
    with daemon.client() as api:
        r = api.options("/v1/runs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "POST"}


def test_a_rank_the_run_cannot_have_is_refused_and_a_rank_ends_once(api: httpx.Client) -> None:
    """In a run of 2 ranks, batches of rank 7 and of rank 2**40 were stored (n_batches 22,
    its ranks' counts 20); a rank's "finished" then "failed" got 200 twice, the second
    dropped. A rank that has not joined yet is taken (a replayed spool may come first)."""
    rid = "ab" * 16
    r = api.post("/v1/runs", json={"id": rid, "rank": 0, "world_size": 2})
    assert r.status_code == 201, r.text
    url = f"/v1/runs/{rid}/batches"
    early = api.post(url, json={"rank": 1, "batches": batches(0, 2)})  # before rank 1 joins
    assert early.json() == {"accepted": 2, "duplicates": 0}, early.text
    for body in (
        {"rank": 7, "batches": batches(10, 2)},
        {"batches": [{**batches(10, 1)[0], "rank": 2**40}, *batches(11, 1)]},
        {"rank": 2, "columns": columns(batches(10, 2))},
    ):
        r = api.post(url, json=body)
        e = err(r)
        assert r.status_code == 422 and e["code"] == "validation_error", r.text
        assert "is not a rank of run" in e["message"] and e["details"]["world_size"] == 2
    single = make_run(api)["id"]
    r = api.post(f"/v1/runs/{single}/batches", json={"rank": 1, "batches": batches(0, 1)})
    assert r.status_code == 422 and "one process" in err(r)["message"], r.text
    r = api.post(f"/v1/runs/{single}/batches", json={"rank": 0, "batches": batches(0, 1)})
    assert r.json() == {"accepted": 1, "duplicates": 0}, r.text
    assert api.get(f"/v1/runs/{rid}").json()["n_batches"] == 2
    # one rank's final status: repeated, a 200; contradicted, a 409 as a run's
    done = {"status": "finished", "rank": 0}
    assert api.patch(f"/v1/runs/{rid}", json=done).status_code == 200
    assert api.patch(f"/v1/runs/{rid}", json=done).status_code == 200
    r = api.patch(f"/v1/runs/{rid}", json={"status": "failed", "rank": 0})
    assert r.status_code == 409 and err(r)["code"] == "run_finished", r.text
    assert err(r)["details"] == {"status": "finished", "rank": 0}
    assert api.get(f"/v1/runs/{rid}").json()["status"] == "running"  # rank 1 has not ended
