"""Read-side API answers over real HTTP against a real ``h3d serve``: 405 ``Allow`` headers,
non-finite windows, series lengths and means, compare's ids, the OpenAPI of /healthz and the
CSV exports, the export's columns, and the energy note of a run no reading covers."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from h3d import analysis
from h3d.app import create_app
from h3d.config import Settings


def new_run(api: httpx.Client, **kw: Any) -> str:
    r = api.post("/v1/runs", json={"name": "r", **kw})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def post(api: httpx.Client, rid: str, batches: list[dict[str, Any]], **kw: Any) -> None:
    r = api.post(f"/v1/runs/{rid}/batches", json={"batches": batches, **kw})
    assert r.status_code == 200, r.text


def test_a_405_names_the_methods_of_routes_the_openapi_leaves_out(daemon: Any) -> None:
    """POST / (and /docs, /openapi.json, /static/app.js) answered 405 with an empty ``Allow``:
    it was built from the OpenAPI paths, which leave those routes out."""
    for path in ("/", "/docs", "/openapi.json", "/static/app.js", "/healthz"):
        r = httpx.post(f"{daemon.url}{path}")
        assert r.status_code == 405, path
        assert "GET" in r.headers["allow"].split(", "), (path, r.headers["allow"])
    with daemon.client() as api:
        runs = api.options("/v1/runs")
        resolve = api.post("/v1/runs/resolve")
        one = api.post("/v1/runs/" + "ab" * 16)
    assert set(runs.headers["allow"].split(", ")) == {"GET", "POST"}
    assert resolve.headers["allow"] == "GET"  # a literal path wins over /v1/runs/{run_id}
    assert set(one.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE"}


def test_a_window_that_is_not_a_finite_number_is_refused_as_such(api: httpx.Client) -> None:
    """``window=nan`` was refused as "less than or equal to 2592000"."""
    rid = new_run(api)
    for route in ("eta", "report"):
        for bad in ("nan", "inf", "-inf"):
            r = api.get(f"/v1/runs/{rid}/{route}", params={"window": bad})
            assert r.status_code == 422, r.text
            assert "finite number" in r.json()["error"]["message"], (route, bad, r.text)


def test_the_eta_and_energy_series_give_the_points_asked_for(api: httpx.Client) -> None:
    """They were cut to 500 points whatever ``points`` asked (up to 20 000, as documented)."""
    rid = new_run(api)
    t0 = api.get(f"/v1/runs/{rid}").json()["created_at"]
    time.sleep(0.6)  # power readings to cover the batches
    n = 1200
    post(
        api,
        rid,
        [{"seq": i, "t": t0 + 0.5 * (i + 1) / n, "loss": 2.0 / (1 + i / 100)} for i in range(n)],
    )
    assert api.patch(f"/v1/runs/{rid}", json={"status": "finished"}).status_code == 200
    for metric in ("eta", "energy"):
        got = api.get(f"/v1/runs/{rid}/series", params={"metric": metric, "points": 1000}).json()
        # a grid of 1000 batch times, from the k-th (k = 50): those a reading covers
        assert 900 <= len(got["points"]) <= 1000, (metric, len(got["points"]))
        assert got["bucket_batches"] is None


def test_the_loss_series_as_bucket_means(api: httpx.Client) -> None:
    """``agg=mean``: each point the n-weighted mean loss and the mean time of a bucket of
    consecutive batches, with the bucket's size; LTTB stays the default."""
    rid = new_run(api)
    t0 = time.time()
    batches = [
        {"seq": i, "t": t0 + 0.01 * i, "loss": 1.0 + (i % 7) * 0.5 + (3.0 if i % 10 == 0 else 0.0)}
        for i in range(100)
    ]
    for b in batches:
        b["n"] = 1 + b["seq"] % 3
    batches[50]["loss"] = None  # a non-finite loss has no part in its bucket's mean
    post(api, rid, batches, nonfinite_as_null=True)
    got = api.get(f"/v1/runs/{rid}/series", params={"points": 30, "agg": "mean"}).json()
    assert got["metric"] == "loss" and got["bucket_batches"] == 4  # ceil(99 / 30)
    finite = [b for b in batches if b["loss"] is not None]
    assert len(got["points"]) == 25
    for j, (x, y) in enumerate(got["points"]):
        bucket = finite[4 * j : 4 * j + 4]
        w = sum(b["n"] for b in bucket)
        assert math.isclose(x, sum(b["t"] for b in bucket) / len(bucket), rel_tol=1e-12)
        assert math.isclose(y, sum(b["loss"] * b["n"] for b in bucket) / w, rel_tol=1e-12)
    lttb = api.get(f"/v1/runs/{rid}/series", params={"points": 30}).json()
    assert len(lttb["points"]) == 30 and lttb["bucket_batches"] is None
    every = api.get(f"/v1/runs/{rid}/series", params={"points": 500, "agg": "mean"}).json()
    assert every["bucket_batches"] == 1 and len(every["points"]) == 99
    r = api.get(f"/v1/runs/{rid}/series", params={"metric": "power", "agg": "mean"})
    assert r.status_code == 422 and "metric=loss only" in r.json()["error"]["message"]


def test_compare_takes_20_ids_with_spaces_and_counts_them(api: httpx.Client) -> None:
    """20 ids written "A, B, …" (678 characters) were a 422 "at most 660 characters"."""
    ids = [new_run(api, name=f"c{i}") for i in range(21)]
    r = api.get("/v1/compare", params={"runs": ", ".join(ids[:20])})
    assert r.status_code == 200, r.text
    assert [x["run_id"] for x in r.json()["runs"]] == ids[:20]
    r = api.get("/v1/compare", params={"runs": " , ".join(ids)})
    assert r.status_code == 422
    assert "1 to 20 comma-separated run ids, not 21" in r.json()["error"]["message"]


def test_the_openapi_declares_the_healthz_nonce_and_the_csv_media_type(daemon: Any) -> None:
    spec = httpx.get(f"{daemon.url}/openapi.json").json()
    params = spec["paths"]["/healthz"]["get"].get("parameters") or []
    nonce = next(p for p in params if p["name"] == "nonce")
    assert nonce["in"] == "query" and not nonce["required"]
    assert {"type": "string", "maxLength": 128} in nonce["schema"]["anyOf"]
    for path in ("/v1/runs/{run_id}/export.csv", "/v1/runs/{run_id}/samples.csv"):
        ok = spec["paths"][path]["get"]["responses"]["200"]
        assert list(ok["content"]) == ["text/csv"], (path, ok)
    # as declared: a nonce longer than 128 characters is refused, not silently unproven
    r = httpx.get(f"{daemon.url}/healthz", params={"nonce": "n" * 129})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("query.nonce")
    assert "proof" in httpx.get(f"{daemon.url}/healthz", params={"nonce": "n" * 128}).json()


def test_healthz_answers_while_every_threadpool_thread_is_taken(tmp_path: Path) -> None:
    """/healthz was a sync route: it queued behind sync routes (analysis requests) for a
    threadpool thread. With every thread taken it answers from the event loop; a sync
    route would wait for good, which ``fail_after`` turns into a failure."""
    app = create_app(Settings(data_dir=tmp_path / "data"))

    async def probe() -> httpx.Response:
        limiter = anyio.to_thread.current_default_thread_limiter()
        held = [object() for _ in range(int(limiter.total_tokens))]
        for h in held:
            await limiter.acquire_on_behalf_of(h)
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                with anyio.fail_after(10):
                    return await c.get("/healthz", params={"nonce": "n1"})
        finally:
            for h in held:
                limiter.release_on_behalf_of(h)

    r = anyio.run(probe)
    assert r.status_code == 200 and r.json()["status"] == "ok" and "proof" in r.json()


def rows(api: httpx.Client, rid: str) -> list[dict[str, str]]:
    r = api.get(f"/v1/runs/{rid}/export.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(r.text)))


def test_the_export_has_each_batchs_rank_and_the_weight_the_daemon_uses(
    api: httpx.Client,
) -> None:
    """The export had no rank column (a distributed run's ranks could not be told apart),
    and ``n`` was blank for a batch logged without it, which the daemon weighs as 1."""
    t0 = time.time()
    rid = new_run(api)
    post(
        api, rid, [{"seq": 0, "t": t0, "loss": 2.0}, {"seq": 1, "t": t0 + 0.1, "loss": 1.5, "n": 8}]
    )
    got = rows(api, rid)
    assert list(got[0]) == ["seq", "t", "epoch", "step", "rank", "phase", "n", "loss"]
    assert [(r["rank"], r["n"]) for r in got] == [("", "1"), ("", "8")]
    dist = "cd" * 16
    for rank in (0, 1):
        r = api.post("/v1/runs", json={"id": dist, "rank": rank, "world_size": 2})
        assert r.status_code in (200, 201), r.text
    post(api, dist, [{"seq": 0, "t": t0, "loss": 2.0}], rank=0)
    post(api, dist, [{"seq": 1, "t": t0 + 0.01, "loss": 1.9}], rank=1)
    assert [(r["seq"], r["rank"]) for r in rows(api, dist)] == [("0", "0"), ("1", "1")]


def test_a_run_no_reading_covers_says_so_though_no_device_is_listed(api: httpx.Client) -> None:
    """A run from before the daemon sampled: no device read any of it, so none is listed,
    and the note was null (the CLI then said "no device was readable" of a readable one)."""
    now = time.time()
    rid = new_run(api, created_at=now - 3600)
    r = api.patch(f"/v1/runs/{rid}", json={"status": "finished", "finished_at": now - 3590})
    assert r.status_code == 200, r.text
    e = api.get(f"/v1/runs/{rid}/energy").json()
    assert e["by_device"] == [] and e["energy_j"] is None
    assert e["active_energy_note"] == analysis.UNREAD_NOTE
    assert api.get(f"/v1/runs/{rid}/report").json()["energy"]["active_energy_note"] == (
        analysis.UNREAD_NOTE
    )
