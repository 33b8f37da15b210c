"""A batch's ``n`` defaults to its number of per-sample losses in every request form.

A real ``h3d serve`` on SQLite. L is the sample-weighted mean loss: the same batches sent as
``batches`` rows (``losses`` or ``losses_f32``, as older spool files and ``h3d import``
carry them) and as ``columns`` (as the client sends them) must give the same n, L and ΔI.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import struct
import time
from typing import Any

import httpx
import pytest

SIZES = [64 if i % 2 == 0 else 4 for i in range(20)]
MEANS = [3.0 - 0.1 * i for i in range(20)]


def b64(code: str, values: list[Any]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}{code}", *values)).decode()


def run_with(api: httpx.Client, body: dict[str, Any], t0: float) -> str:
    rid: str = api.post("/v1/runs", json={"name": "n", "created_at": t0}).json()["id"]
    r = api.post(f"/v1/runs/{rid}/batches", json=body)
    assert r.json() == {"accepted": 20, "duplicates": 0}, r.text
    r = api.patch(f"/v1/runs/{rid}", json={"status": "finished", "finished_at": t0 + 21})
    r.raise_for_status()
    return rid


def stored_n(api: httpx.Client, rid: str) -> list[str]:
    rows = list(csv.DictReader(io.StringIO(api.get(f"/v1/runs/{rid}/export.csv").text)))
    return [row["n"] for row in rows]


def test_per_sample_losses_weigh_as_samples_in_rows_and_columns(api: httpx.Client) -> None:
    """Rows carrying per-sample losses and no ``n`` stored n = null, so each batch weighed 1
    in L (a mean of batch means) and counted as 1 sample towards L₀'s 32: ΔI 2.669 bits,
    where the same batches as columns gave 2.605."""
    t0 = time.time() - 30
    ts = [t0 + 1 + i for i in range(20)]
    values = [[m] * s for m, s in zip(MEANS, SIZES, strict=True)]
    rows = [{"seq": i, "t": ts[i], "loss": MEANS[i], "losses": values[i]} for i in range(20)]
    packed = [
        {"seq": i, "t": ts[i], "loss": MEANS[i], "losses_f32": b64("f", values[i])}
        for i in range(20)
    ]
    cols = {
        "seq_i64": b64("q", list(range(20))),
        "t_f64": b64("d", ts),
        "loss_f64": b64("d", MEANS),
        "sizes_i64": b64("q", SIZES),
        "losses_f32": b64("f", [v for vs in values for v in vs]),
    }
    # an n column with nulls: those batches count their per-sample losses too
    with_nulls = {**cols, "n": [None if i % 3 else SIZES[i] for i in range(20)]}
    runs = [
        run_with(api, body, t0)
        for body in (
            {"batches": rows},
            {"batches": packed},
            {"columns": cols},
            {"columns": with_nulls},
        )
    ]
    # by hand: K = 2 (20 batches), L₀ over the first 64-sample batch, Lₜ over the last two
    lt = (MEANS[18] * 64 + MEANS[19] * 4) / 68
    bits = (MEANS[0] - lt) / math.log(2)
    for rid in runs:
        assert stored_n(api, rid) == [str(s) for s in SIZES]
        eta = api.get(f"/v1/runs/{rid}/eta").json()
        assert eta["loss_start"] == pytest.approx(MEANS[0], rel=1e-12)
        assert eta["loss_now"] == pytest.approx(lt, rel=1e-12)
        assert eta["info_gain_bits"] == pytest.approx(bits, rel=1e-12)


def test_an_explicit_n_wins_over_the_count(api: httpx.Client) -> None:
    t0 = time.time() - 30
    batch = {"seq": 0, "t": t0 + 1, "loss": 2.0, "losses": [2.0] * 8, "n": 100}
    rid: str = api.post("/v1/runs", json={"name": "n", "created_at": t0}).json()["id"]
    api.post(f"/v1/runs/{rid}/batches", json={"batches": [batch]}).raise_for_status()
    api.post(
        f"/v1/runs/{rid}/batches", json={"batches": [{"seq": 1, "t": t0 + 2, "loss": 1.0}]}
    ).raise_for_status()  # no per-sample losses, no n: unknown, as before
    assert stored_n(api, rid) == ["100", "1"]
