"""The binary form of a batches body (``application/vnd.h3.columns``): the packed columns as
raw bytes after a JSON header, what the client sends (no base64 on either side).

A real ``h3d serve`` on loopback: the binary form stores exactly what the JSON columns form
stores, gzipped too; a body that does not fit the layout, or whose columns are invalid, is a
422 saying what is wrong and stores nothing; routes other than batches refuse the type.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import time
from typing import Any

import httpx
import pytest

from h3d.api.schemas import COLUMNS_MEDIA_TYPE, PACKED_COLUMNS, binary_columns
from tests.conftest import Daemon

BINARY = {"Content-Type": COLUMNS_MEDIA_TYPE}


def packed(seqs: list[int], per_sample: int = 3) -> dict[str, bytes]:
    """Batches ``seqs`` as packed columns: times, losses, ``per_sample`` losses and indices."""
    now = time.time()
    k = len(seqs)
    return {
        "seq_i64": struct.pack(f"<{k}q", *seqs),
        "t_f64": struct.pack(f"<{k}d", *(now - 1 + 0.01 * s for s in seqs)),
        "loss_f64": struct.pack(f"<{k}d", *(2.0 - 0.01 * s for s in seqs)),
        "sizes_i64": struct.pack(f"<{k}q", *([per_sample] * k)),
        "losses_f32": struct.pack(
            f"<{k * per_sample}f", *(0.5 + 0.125 * i for i in range(k * per_sample))
        ),
        "indices_i64": struct.pack(f"<{k * per_sample}q", *range(100, 100 + k * per_sample)),
    }


def binary_body(cols: dict[str, Any], **meta: Any) -> bytes:
    """The binary form: packed columns by their lengths in the header, lists as they are."""
    header = {k: len(v) if isinstance(v, bytes) else v for k, v in cols.items()}
    blocks = [cols[name] for name in PACKED_COLUMNS if name in cols]
    return json.dumps({**meta, "columns": header}).encode() + b"\n" + b"".join(blocks)


def json_body(cols: dict[str, Any], **meta: Any) -> dict[str, Any]:
    header = {
        k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in cols.items()
    }
    return {**meta, "columns": header}


def new_run(api: httpx.Client, name: str, **kw: Any) -> str:
    r = api.post("/v1/runs", json={"name": name, **kw})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture
def api(daemon: Daemon) -> httpx.Client:
    with daemon.client() as c:
        yield c


def stored(api: httpx.Client, run_id: str) -> tuple[list[list[str]], list[list[str]]]:
    """The run's batches and per-sample losses as CSV rows, without the header."""
    rows = []
    for path in ("export.csv", "samples.csv"):
        r = api.get(f"/v1/runs/{run_id}/{path}")
        assert r.status_code == 200, r.text
        rows.append([line.split(",") for line in r.text.splitlines()[1:]])
    return rows[0], rows[1]


def test_the_binary_form_stores_what_the_json_form_stores(api: httpx.Client) -> None:
    cols = {**packed(list(range(50))), "epoch": [0] * 25 + [1] * 25}
    a, b, c = (new_run(api, n) for n in ("json", "binary", "gzipped"))
    r = api.post(f"/v1/runs/{a}/batches", json=json_body(cols))
    assert r.json() == {"accepted": 50, "duplicates": 0}, r.text
    body = binary_body(cols)
    r = api.post(f"/v1/runs/{b}/batches", content=body, headers=BINARY)
    assert r.json() == {"accepted": 50, "duplicates": 0}, r.text
    r = api.post(
        f"/v1/runs/{c}/batches",
        content=gzip.compress(body),
        headers={**BINARY, "Content-Encoding": "gzip"},
    )
    assert r.json() == {"accepted": 50, "duplicates": 0}, r.text
    want = stored(api, a)
    assert len(want[0]) == 50 and len(want[1]) == 150
    assert stored(api, b) == want == stored(api, c)
    # idempotent on seq, as the JSON form: a resend stores nothing twice
    r = api.post(f"/v1/runs/{b}/batches", content=body, headers=BINARY)
    assert r.json() == {"accepted": 0, "duplicates": 50}, r.text


def test_rank_and_nonfinite_as_null_come_in_the_header(api: httpx.Client) -> None:
    cols = packed([0, 1], per_sample=2)
    cols["loss_f64"] = struct.pack("<2d", float("nan"), 1.5)
    run = new_run(api, "rank", world_size=4, rank=3, id="ab" * 16)
    body = binary_body(cols, rank=3, nonfinite_as_null=True)
    r = api.post(f"/v1/runs/{run}/batches", content=body, headers=BINARY)
    assert r.json() == {"accepted": 2, "duplicates": 0}, r.text
    batches, _ = stored(api, run)
    assert [row[4] for row in batches] == ["3", "3"]  # seq,t,epoch,step,rank,...
    assert batches[0][-1] == "" and float(batches[1][-1]) == 1.5
    # without nonfinite_as_null the NaN is refused, as in JSON
    body = binary_body(packed([2]) | {"loss_f64": struct.pack("<d", float("inf"))})
    r = api.post(f"/v1/runs/{run}/batches", content=body, headers=BINARY)
    assert r.status_code == 422, r.text


#: Bodies that are not in the binary layout, and words of the 422 each gets.
NOT_THE_LAYOUT = [
    (b'{"columns":{"seq_i64":8}}', "no newline"),
    (b'{"columns":\n' + bytes(8), "header is not valid JSON"),
    (b"[1]\n", '"columns"'),
    (b'{"columns":{"seq_i64":"AAAAAAAAAAA="}}\n', "length in bytes"),
    (b'{"columns":{"seq_i64":true}}\n' + bytes(1), "length in bytes"),
    (b'{"columns":{"seq_i64":16}}\n' + bytes(8), "8 left in the body"),
    (b'{"columns":{"seq_i64":8,"t_f64":8,"loss_f64":8}}\n' + bytes(25), "1 bytes after"),
]


def test_a_body_not_in_the_layout_is_a_422_that_says_why(api: httpx.Client) -> None:
    run = new_run(api, "bad")
    for body, words in NOT_THE_LAYOUT:
        r = api.post(f"/v1/runs/{run}/batches", content=body, headers=BINARY)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == "validation_error" and words in error["message"], error
        assert COLUMNS_MEDIA_TYPE in error["message"]
    assert stored(api, run) == ([], [])


def test_invalid_columns_are_the_json_forms_422(api: httpx.Client) -> None:
    run = new_run(api, "cols")
    cols = packed([0, 1])
    cols["seq_i64"] = cols["seq_i64"][:15]  # not whole int64 values
    r = api.post(f"/v1/runs/{run}/batches", content=binary_body(cols), headers=BINARY)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["details"][0]["loc"] == ["body", "columns", "seq_i64"], error
    assert "not a whole number of 8-byte values" in error["message"]
    cols = packed([0, 1])
    cols["indices_i64"] = cols["indices_i64"][:8]  # one index for six losses
    r = api.post(f"/v1/runs/{run}/batches", content=binary_body(cols), headers=BINARY)
    assert r.status_code == 422 and "one index for each loss" in r.text, r.text
    # the rows form has no binary layout: its header is refused by the model
    body = json.dumps({"batches": [], "columns": {}}).encode() + b"\n"
    r = api.post(f"/v1/runs/{run}/batches", content=body, headers=BINARY)
    assert r.status_code == 422, r.text
    assert stored(api, run) == ([], [])


def test_other_routes_refuse_the_binary_type(api: httpx.Client) -> None:
    run = new_run(api, "epochs")
    r = api.post(f"/v1/runs/{run}/epochs", content=b'{"epochs":[]}\n', headers=BINARY)
    assert r.status_code == 422, r.text
    assert "send it as JSON" in r.json()["error"]["message"]
    assert "(or as" not in r.json()["error"]["message"]
    # the batches route names both forms when refusing a third
    r = api.post(f"/v1/runs/{run}/batches", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and COLUMNS_MEDIA_TYPE in r.json()["error"]["message"], r.text


def test_the_openapi_documents_both_forms(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    content = spec["paths"]["/v1/runs/{run_id}/batches"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", COLUMNS_MEDIA_TYPE}


def test_binary_columns_reads_blocks_in_the_documented_order() -> None:
    cols = packed([4, 5])
    obj = binary_columns(binary_body(cols, nonfinite_as_null=True))
    assert obj["nonfinite_as_null"] is True
    assert obj["columns"] == cols  # each block where the header's lengths put it
