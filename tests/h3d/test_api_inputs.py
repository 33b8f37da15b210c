"""Input the store cannot keep, or that says something impossible, is a 4xx on every store.

A real ``h3d serve`` on SQLite and on PostgreSQL (the server at 127.0.0.1:5432; skipped
without one): text a store cannot hold (NUL, lone surrogates) is refused before it reaches
either; a run cannot end before it began; an epochs request is bounded, and storing one
never binds a parameter per epoch; run names are stripped as references are; a body Python
cannot parse is a 422 like any malformed JSON.
"""

from __future__ import annotations

import base64
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, text

from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, make_engine, make_sessionmaker, session_scope
from tests.conftest import Daemon

NUL_PATH = "a%00b"  # what a client sends for the run id "a\x00b"


@pytest.fixture
def served(daemon_factory: Callable[..., Daemon], store_url: str) -> Daemon:
    """A daemon on ``store_url`` whose reaper writes the heartbeats it saw every 0.2 s."""
    return daemon_factory("served", H3D_DB_URL=store_url, H3D_RUN_REAP_EVERY_S="0.2")


@pytest.fixture
def client(served: Daemon) -> Iterator[httpx.Client]:
    # no kept-alive connections: an error a test provokes must not cost the next request
    with served.client(limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


def err(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return dict(body["error"])


def new_run(api: httpx.Client, **kw: Any) -> dict[str, Any]:
    r = api.post("/v1/runs", json={"name": "r", **kw})
    assert r.status_code == 201, r.text
    return dict(r.json())


def raw_post(api: httpx.Client, url: str, body: bytes) -> httpx.Response:
    return api.post(url, content=body, headers={"Content-Type": "application/json"})


# --- text the store cannot keep ----------------------------------------------------------


def test_nul_and_lone_surrogates_are_a_422_on_every_store(
    client: httpx.Client, served: Daemon, store_url: str
) -> None:
    api, now = client, time.time()
    run = new_run(api)
    rid = run["id"]
    batch = {"seq": 0, "t": now, "loss": 1.0}
    bodies: list[tuple[str, str, Any]] = [
        ("POST", "/v1/runs", {"name": "a\x00b"}),
        ("POST", "/v1/runs", {"tags": ["a\x00"]}),
        ("POST", "/v1/runs", {"host": "h\x00"}),
        ("PATCH", f"/v1/runs/{rid}", {"name": "x\x00"}),
        ("PATCH", f"/v1/runs/{rid}", {"tags": ["ok", "\x00"]}),
        ("POST", f"/v1/runs/{rid}/batches", {"batches": [{**batch, "phase": "a\x00"}]}),
        (
            "POST",
            f"/v1/runs/{rid}/batches",
            {
                "columns": {
                    "seq_i64": base64.b64encode(struct.pack("<q", 0)).decode(),
                    "t_f64": base64.b64encode(struct.pack("<d", now)).decode(),
                    "loss_f64": base64.b64encode(struct.pack("<d", 1.0)).decode(),
                    "phase": ["tr\x00ain"],
                }
            },
        ),
        ("POST", f"/v1/runs/{rid}/epochs", {"epochs": [{"epoch": 0, "t": now, "phase": "\x00"}]}),
        (
            "POST",
            f"/v1/runs/{rid}/epochs",
            {"epochs": [{"epoch": 0, "t": now, "metrics": {"f1\x00": 0.5}}]},
        ),
    ]
    for method, url, body in bodies:
        e = err(api.request(method, url, json=body), 422, "validation_error")
        assert "NUL" in e["message"], e
    # lone surrogates: valid JSON escapes, no Unicode text (stored, they made every answer
    # holding them a 500: the runs list, the report)
    surrogates = [
        ("/v1/runs", b'{"name": "a\\ud800"}'),
        ("/v1/runs", b'{"tags": ["\\udfff"]}'),
        ("/v1/runs", b'{"config": {"k": "x\\ud800y"}}'),
        ("/v1/runs", b'{"config": {"\\udc00": 1}}'),
        (
            f"/v1/runs/{rid}/epochs",
            b'{"epochs": [{"epoch": 0, "t": 1e9, "metrics": {"\\ud800": 1}}]}',
        ),
    ]
    for url, raw in surrogates:
        e = err(raw_post(api, url, raw), 422, "validation_error")
        assert "surrogate" in e["message"] or "unicode string" in e["message"], e
    lookups: list[tuple[str, dict[str, str]]] = [
        ("/v1/runs", {"name": "a\x00"}),
        ("/v1/runs", {"tag": "\x00"}),
        ("/v1/runs/resolve", {"ref": "a\x00"}),
        ("/v1/compare", {"runs": f"{rid},a\x00b"}),
        (f"/v1/runs/{rid}/series", {"metric": "power", "device": "cpu\x00"}),
        # a cursor carries a run id, compared with the stored ones
        ("/v1/runs", {"cursor": base64.urlsafe_b64encode(b"1.0|a\x00").decode()}),
        # a NUL (or a space) in the cursor's text: the lenient decoder skipped it
        ("/v1/runs", {"cursor": base64.urlsafe_b64encode(b"1.0|ab").decode() + "\x00"}),
        ("/v1/runs", {"cursor": base64.urlsafe_b64encode(b"nan|ab").decode()}),
    ]
    for url, params in lookups:
        err(api.get(url, params=params), 422, "validation_error")
    for method, path, body in [
        ("GET", "", None),
        ("GET", "/energy", None),
        ("GET", "/eta", None),
        ("GET", "/series", None),
        ("GET", "/report", None),
        ("GET", "/export.csv", None),
        ("GET", "/samples.csv", None),
        ("PATCH", "", {"status": "failed"}),
        ("DELETE", "", None),
        ("POST", "/batches", {"batches": [batch]}),
        ("POST", "/epochs", {"epochs": []}),
    ]:
        r = api.request(method, f"/v1/runs/{NUL_PATH}{path}", json=body)
        e = err(r, 422, "validation_error")
        assert e["details"][0]["loc"] == ["path", "run_id"], e

    # nothing of it was stored; the run is as it was, and so is every list and report
    got = api.get(f"/v1/runs/{rid}").json()
    assert (got["name"], got["tags"], got["n_batches"], got["n_epochs"]) == ("r", [], 0, 0)
    assert api.get("/v1/runs").json()["count"] == 1
    assert api.get(f"/v1/runs/{rid}/report").status_code == 200

    # JSON fields may hold a NUL: JSON escapes it, and PostgreSQL's json type keeps it
    cfg = {"note": "a\x00b", "k\x00": 1}
    kept = new_run(api, config=cfg)
    assert api.get(f"/v1/runs/{kept['id']}").json()["config"] == cfg
    assert api.get("/v1/runs").status_code == 200

    # a request for an id the store cannot hold is not a heartbeat: the reaper writes the
    # heartbeats it saw in one statement, which such an id failed on PostgreSQL, again and
    # again (every run's heartbeat lost, so other daemons of the store reaped its runs)
    engine = create_engine(store_url)
    try:
        for _ in range(100):
            api.post(f"/v1/runs/{rid}/batches", json={"batches": [batch]})  # a real heartbeat
            with engine.connect() as conn:
                seen = conn.execute(text("SELECT seen_at FROM runs WHERE id = :r"), {"r": rid})
                if seen.scalar() is not None:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("the run's heartbeat never reached the store")
    finally:
        engine.dispose()
    assert "Traceback" not in served.log.read_text()


# --- finished_at -------------------------------------------------------------------------


def test_a_run_cannot_end_before_it_began(api: httpx.Client) -> None:
    t0 = time.time() - 100
    run = new_run(api, created_at=t0)
    url = f"/v1/runs/{run['id']}"
    e = err(
        api.patch(url, json={"status": "finished", "finished_at": 1000.0}), 422, "validation_error"
    )
    assert "before" in e["message"] and e["details"]["started_at"] == t0
    # finished_at says when the run ended: it needs the status that ends it
    for body in ({"finished_at": t0 + 10}, {"finished_at": t0 + 10, "name": "x"}):
        e = err(api.patch(url, json=body), 422, "validation_error")
        assert "finished_at needs a final status" in e["message"]
    got = api.get(url).json()
    assert (got["status"], got["finished_at"], got["name"]) == ("running", None, "r")
    r = api.patch(url, json={"status": "failed", "finished_at": t0})  # an end at the start
    assert r.status_code == 200 and r.json()["finished_at"] == t0

    # a rank's end is checked against its own start (its clock's, on its node)
    rid = "cd" * 16
    for rank, at in ((0, t0), (1, t0 + 50)):
        body = {"id": rid, "created_at": at, "rank": rank, "world_size": 2}
        assert api.post("/v1/runs", json=body).status_code == 201
    bad = {"status": "finished", "finished_at": t0 + 20, "rank": 1}
    e = err(api.patch(f"/v1/runs/{rid}", json=bad), 422, "validation_error")
    assert "rank 1" in e["message"]
    for rank, at in ((1, t0 + 60), (0, t0 + 70)):
        body = {"status": "finished", "finished_at": at, "rank": rank}
        assert api.patch(f"/v1/runs/{rid}", json=body).status_code == 200
    got = api.get(f"/v1/runs/{rid}").json()
    assert (got["status"], got["finished_at"]) == ("finished", t0 + 70)

    # no finished_at: the daemon's clock, but never before the start (a client clock an
    # hour ahead of the daemon's created the run)
    ahead = new_run(api, created_at=time.time() + 3600)
    r = api.patch(f"/v1/runs/{ahead['id']}", json={"status": "finished"})
    assert r.status_code == 200 and r.json()["finished_at"] == ahead["created_at"]


# --- epochs: bounded requests, no parameter per epoch ------------------------------------


def test_an_epochs_request_is_bounded_and_stored_whole_on_every_store(
    client: httpx.Client,
) -> None:
    api, now = client, time.time()
    rid = new_run(api)["id"]
    url = f"/v1/runs/{rid}/epochs"
    limit = 10_000
    many = [{"epoch": i, "t": now, "loss": 1.0} for i in range(limit + 1)]
    e = err(api.post(url, json={"epochs": many}), 413, "payload_too_large")
    assert f"{limit + 1} epochs" in e["message"] and str(limit) in e["message"].replace(" ", "")
    assert api.get(f"/v1/runs/{rid}").json()["n_epochs"] == 0
    r = api.post(url, json={"epochs": many[:limit]})
    assert r.status_code == 200 and r.json() == {"accepted": limit, "duplicates": 0}
    r = api.post(url, json={"epochs": many[limit - 10 : limit + 1]})  # 10 stored, 1 new
    assert r.json() == {"accepted": 1, "duplicates": 10}
    assert api.get(f"/v1/runs/{rid}").json()["n_epochs"] == limit + 1


def test_add_epochs_binds_no_parameter_per_epoch(store_url: str) -> None:
    """More epochs than a statement takes parameters (PostgreSQL: 65 535; SQLite: its
    build's limit, lowered here to its historical default, 999): stored, then found again."""
    sqlite = store_url.startswith("sqlite")
    n = 5_000 if sqlite else 70_000
    engine = make_engine(store_url)
    if sqlite:

        @event.listens_for(engine, "connect")
        def _few_variables(conn: sqlite3.Connection, _record: Any) -> None:
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    try:
        migrate.upgrade(engine)
        factory, now = make_sessionmaker(engine), time.time()
        with session_scope(factory) as s:
            kw: dict[str, Any] = {"config": {}, "tags": [], "pid": None, "host": None}
            rid = repo.create_run(s, name="e", n_train=None, now=now, **kw).id
        keys = ("epoch", "t", "phase", "accuracy", "loss", "val_loss", "metrics")
        epochs: list[dict[str, Any]] = [
            dict(zip(keys, (i, now, None, None, 1.0, None, {}), strict=True)) for i in range(n)
        ]
        for expected in ((n, 0), (0, n)):  # then every one is a duplicate
            with session_scope(factory) as s:
                assert repo.add_epochs(s, run_id=rid, epochs=epochs) == expected
        with session_scope(factory) as s:
            assert repo.get_run(s, run_id=rid).n_epochs == n
    finally:
        engine.dispose()


# --- run names ---------------------------------------------------------------------------


def test_run_names_are_stripped_as_references_are(api: httpx.Client) -> None:
    run = new_run(api, name="  spaced \t")
    assert run["name"] == "spaced"
    for ref in (" spaced ", "spaced"):
        r = api.get("/v1/runs/resolve", params={"ref": ref})
        assert r.status_code == 200 and r.json()["id"] == run["id"]
    e = err(api.post("/v1/runs", json={"name": "   "}), 422, "validation_error")
    assert "space" in e["message"]
    # absent or "": the default name, as before (what a client sends without a name)
    for body in ({}, {"name": None}, {"name": ""}):
        made = api.post("/v1/runs", json=body).json()
        assert made["name"] == f"run-{made['id'][:8]}"
    url = f"/v1/runs/{run['id']}"
    assert api.patch(url, json={"name": " renamed "}).json()["name"] == "renamed"
    for name in ("  ", ""):
        err(api.patch(url, json={"name": name}), 422, "validation_error")
    assert api.get("/v1/runs/resolve", params={"ref": "renamed "}).json()["id"] == run["id"]


def test_a_name_stored_with_spaces_before_is_found_as_typed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        migrate.upgrade(store.engine)

        def create(s: Any) -> str:  # as an older daemon stored it
            kw: dict[str, Any] = {"config": {}, "tags": [], "pid": None, "host": None}
            return repo.create_run(s, name=" old ", n_train=None, now=1e9, **kw).id

        rid = store.write(create)
        with store.read() as s:
            assert repo.resolve_run(s, ref=" old ").id == rid
    finally:
        store.close()


# --- a batch's or an epoch's time ---------------------------------------------------------


def columns(seqs: list[int], times: list[float]) -> dict[str, Any]:
    def b64(code: str, values: list[Any]) -> str:
        return base64.b64encode(struct.pack(f"<{len(values)}{code}", *values)).decode()

    return {
        "seq_i64": b64("q", seqs),
        "t_f64": b64("d", times),
        "loss_f64": b64("d", [1.0] * len(seqs)),
    }


def test_a_batch_or_epoch_time_outside_1970_to_tomorrow_is_a_422_naming_it(
    api: httpx.Client,
) -> None:
    """A ``t`` in milliseconds, 1e308 or -1e308 was stored: the run's last_t became 1e308,
    its marginal η null, its series' x axis jumped to 1e308 and back, for good (a resend
    is a duplicate). Old but valid times (a spool replayed late) are taken."""
    rid = new_run(api)["id"]
    url, now = f"/v1/runs/{rid}/batches", time.time()
    ok = [{"seq": 0, "t": now, "loss": 1.0}, {"seq": 1, "t": 1.0e9, "loss": 1.0}]
    assert api.post(url, json={"batches": ok}).json() == {"accepted": 2, "duplicates": 0}
    for seq, t in enumerate((now * 1000, 1e308, -1e308, -0.5, now + 2 * 86400), start=2):
        batch = {"seq": seq, "t": t, "loss": 1.0}
        e = err(api.post(url, json={"batches": [ok[0], batch]}), 422, "validation_error")
        assert e["message"].startswith(f"batch seq={seq}: t=") and e["details"]["seq"] == seq
        e = err(api.post(url, json={"columns": columns([9, seq], [now, t])}), 422,
                "validation_error")  # fmt: skip
        assert e["message"].startswith(f"batch seq={seq}: t=") and e["details"]["seq"] == seq
        epoch = {"epoch": seq, "t": t}
        e = err(api.post(f"/v1/runs/{rid}/epochs", json={"epochs": [epoch]}), 422,
                "validation_error")  # fmt: skip
        assert e["message"].startswith(f"epoch {seq}: t=") and e["details"]["epoch"] == seq
    r = api.post(url, json={"columns": columns([5, 6], [1.0e9, now])})
    assert r.json() == {"accepted": 2, "duplicates": 0}, r.text
    run = api.get(f"/v1/runs/{rid}").json()
    assert run["n_batches"] == 4 and run["last_t"] == now and run["n_epochs"] == 0


# --- bodies Python's JSON parser gives up on ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"config": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        b'{"pid": ' + b"9" * 5000 + b"}",
        b'{"name": "\xff"}',  # not UTF-8
        b"{",  # malformed, as before
    ],
    ids=["nested", "nested-config", "long-int", "not-utf8", "malformed"],
)
def test_an_unreadable_body_is_a_422_validation_error(api: httpx.Client, body: bytes) -> None:
    err(raw_post(api, "/v1/runs", body), 422, "validation_error")
    assert api.get("/v1/runs").json()["count"] == 0


def test_the_name_filter_ignores_case_on_every_store(client: httpx.Client) -> None:
    """``?name=`` matched ``mlp-normal`` for ``MLP`` on SQLite (its LIKE is case-blind)
    and not on PostgreSQL; ``%`` and ``_`` stay literal. Beyond ASCII, SQLite's LIKE and
    lower() are not case-blind: ``école`` missed ``ÉCOLE`` there."""
    for name in ("mlp-normal", "Big MLP", "cnn", "50%_off", "ÉCOLE normale", "Ωmega"):
        new_run(client, name=name)
    counts = {
        q: client.get("/v1/runs", params={"name": q}).json()["count"]
        for q in ("MLP", "mlp", "big", "%", "_", "0%_O", "école", "ÉCOLE", "ωMEGA", "é")
    }
    assert counts == {
        "MLP": 2, "mlp": 2, "big": 1, "%": 1, "_": 1, "0%_O": 1,
        "école": 1, "ÉCOLE": 1, "ωMEGA": 1, "é": 1,
    }  # fmt: skip


# --- what a refusal says ------------------------------------------------------------------


def test_refusals_say_what_is_wrong_and_codings_are_read_by_their_names(
    api: httpx.Client,
) -> None:
    """JSON sent as text/plain was "Input should be a valid dictionary or object"; an index
    of 2**53 "out of the 64-bit range"; an empty Content-Encoding (no coding) and x-gzip
    (gzip, RFC 9110 §8.4.1.3) were 415; PATCH ``{"rank": 0}`` was a 200 that did nothing."""
    import gzip
    import json

    body = json.dumps({"name": "plain"}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        e = err(api.post("/v1/runs", content=body, headers={"Content-Type": kind}), 422,
                "validation_error")  # fmt: skip
        assert "send it as JSON, with Content-Type: application/json" in e["message"], e
    for kind in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = api.post("/v1/runs", content=body, headers={"Content-Type": kind})
        assert r.status_code == 201, (kind, r.text)
    rid = r.json()["id"]
    batch = {"seq": 0, "t": time.time(), "loss": 1.0, "losses": [1.0], "indices": [2**53]}
    e = err(api.post(f"/v1/runs/{rid}/batches", json={"batches": [batch]}), 422,
            "validation_error")  # fmt: skip
    assert f"outside {-(2**53 - 1)}..{2**53 - 1}" in e["message"], e
    json_h = {"Content-Type": "application/json"}
    for coding, content in (("", body), ("x-gzip", gzip.compress(body)), ("X-GZIP", gzip.compress(body))):  # fmt: skip
        r = api.post("/v1/runs", content=content, headers={**json_h, "Content-Encoding": coding})
        assert r.status_code == 201 and r.json()["name"] == "plain", (coding, r.text)
    r = api.post("/v1/runs", content=body, headers={**json_h, "Content-Encoding": "br"})
    assert "Content-Encoding: gzip, or none" in err(r, 415, "unsupported_encoding")["message"]
    e = err(api.patch(f"/v1/runs/{rid}", json={"rank": 0}), 422, "validation_error")
    assert "rank needs a final status" in e["message"], e
    assert api.patch(f"/v1/runs/{rid}", json={}).json()["status"] == "running"  # the run, as is


# --- gzip bodies of many members ----------------------------------------------------------


def test_a_gzip_body_of_many_members_is_a_400_not_a_stall(api: httpx.Client) -> None:
    import gzip
    import json

    gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    bomb = gzip.compress(b"", mtime=0) * 200_000  # 4 MB: inflating it stalled the daemon 24 s
    r = api.post("/v1/runs", content=bomb, headers=gz)
    assert "more than 1000 members" in err(r, 400, "bad_encoding")["message"]
    # a few members, as `cat a.gz b.gz` makes, and zero padding after the last: all read
    body = json.dumps({"name": "in-three-members"}).encode()
    three = b"".join(gzip.compress(body[i : i + 9]) for i in range(0, len(body), 9)) + bytes(7)
    r = api.post("/v1/runs", content=three, headers=gz)
    assert r.status_code in (200, 201) and r.json()["name"] == "in-three-members", r.text


def test_gunzip_takes_time_linear_in_the_members() -> None:
    import gzip
    import zlib

    from h3d.middleware import _gunzip

    member = gzip.compress(b"x", mtime=0)
    many = member * 200_000 + gzip.compress(b"end", mtime=0) + bytes(3)
    t0 = time.monotonic()
    assert _gunzip(many, 1 << 25, max_members=300_000) == b"x" * 200_000 + b"end"
    # generous: linear takes well under a second; re-copying the rest per member took ~25 s
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="more than 1000 members"):
        _gunzip(member * 1001, 1 << 25)
    assert _gunzip(gzip.compress(b"y" * 5000), 4999) is None  # inflates past the limit
    for bad in (member[:-3], member + b"junk", member + bytes(2) + member):
        with pytest.raises(zlib.error):
            _gunzip(bad, 1 << 25)
