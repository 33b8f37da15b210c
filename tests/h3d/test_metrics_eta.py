"""``h3d_run_efficiency_bits_per_joule`` is η of ``/v1/runs/{id}/eta``: the same ΔI.

A real ``h3d serve`` (constant power); live runs, one single-process and one of two ranks
whose loss curve is over the global step (the k-th batch of every rank is step k).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

import httpx
import pytest


def metric(text: str, name: str, rid: str) -> float | None:
    m = re.search(rf'^{name}\{{run="{rid}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else None


def scrape_until_eta(api: httpx.Client, rids: list[str]) -> str:
    """/metrics once it exports η for every run of ``rids`` (a rendering serves a second)."""
    deadline = time.monotonic() + 30
    while True:
        text = api.get("/metrics").text
        if all(metric(text, "h3d_run_efficiency_bits_per_joule", r) for r in rids):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.2)


def test_metrics_eta_of_a_distributed_run_is_over_global_steps(api: httpx.Client) -> None:
    """/metrics took L₀ from the lowest seq (rank 0's 3.0) and Lₜ from the last K raw rows
    of both ranks, with K from both ranks' batch count: 2.24 bits where /v1 says 0.80
    (2.8× the η)."""
    dist = uuid.uuid4().hex
    for rank in (0, 1):
        body: dict[str, Any] = {"id": dist, "name": "dist", "rank": rank, "world_size": 2}
        api.post("/v1/runs", json=body).raise_for_status()
    single = api.post("/v1/runs", json={"name": "single"}).json()["id"]
    t = time.time()
    batches = []
    for k in range(20):  # the client numbers a rank's k-th batch k·world_size + rank
        batches.append({"seq": 2 * k, "t": t, "loss": 3.0 - 0.05 * k, "n": 32, "rank": 0})
        batches.append({"seq": 2 * k + 1, "t": t, "loss": 1.0 - 0.01 * k, "n": 32, "rank": 1})
    api.post(f"/v1/runs/{dist}/batches", json={"batches": batches}).raise_for_status()
    one = [{"seq": k, "t": t, "loss": 3.0 - 0.05 * k, "n": 32} for k in range(20)]
    api.post(f"/v1/runs/{single}/batches", json={"batches": one}).raise_for_status()
    text = scrape_until_eta(api, [dist, single])
    # by hand: step k's loss is the mean of the ranks' (n = 32 each); K = 2 of 20 steps
    steps = [(3.0 - 0.05 * k + 1.0 - 0.01 * k) / 2 for k in range(20)]
    by_hand = (steps[0] - (steps[18] + steps[19]) / 2) / math.log(2)
    for rid, expected in ((dist, by_hand), (single, (3.0 - 2.075) / math.log(2))):
        eta = metric(text, "h3d_run_efficiency_bits_per_joule", rid)
        energy = metric(text, "h3d_run_energy_joules_total", rid)
        assert eta is not None and energy is not None and energy > 0
        rest = api.get(f"/v1/runs/{rid}/eta").json()
        assert rest["info_gain_bits"] == pytest.approx(expected, rel=1e-12)
        assert eta * energy == pytest.approx(rest["info_gain_bits"], rel=1e-9)
