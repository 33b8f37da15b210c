"""Write-side API fixes: what a body may be sent as and hold, what a large one costs the
event loop, and the 503 at the connection limit.

Real daemons on loopback (``h3d serve`` subprocesses, or the app served in-process by
uvicorn where a test must see which thread did the work), real SQLite files, real HTTP.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from h3d.api.schemas import BatchIn
from h3d.app import create_app
from h3d.config import Settings
from tests import conftest
from tests.conftest import Daemon, free_port


def new_run(api: httpx.Client, **kw: Any) -> str:
    r = api.post("/v1/runs", json={"name": "w", **kw})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return dict(body["error"])


# --- bug 2: a body without a Content-Type -------------------------------------------------


def test_a_json_body_sent_without_a_content_type_gets_the_send_it_as_json_422(
    api: httpx.Client,
) -> None:
    rid = new_run(api)
    bodies = [
        ("POST", "/v1/runs", {"name": "a"}),
        ("PATCH", f"/v1/runs/{rid}", {"name": "b"}),
        ("POST", f"/v1/runs/{rid}/batches", {"batches": [{"seq": 0, "t": time.time(), "loss": 1.0}]}),
        ("POST", f"/v1/runs/{rid}/epochs", {"epochs": [{"epoch": 0, "t": time.time()}]}),
    ]  # fmt: skip
    for method, url, body in bodies:
        request = api.build_request(method, url, content=json.dumps(body).encode())
        assert "content-type" not in request.headers  # httpx's content= sends none
        e = error(api.send(request), 422, "validation_error")
        assert "send it as JSON, with Content-Type: application/json" in e["message"], e
    # nothing was stored: the run is as created, with no batch and no epoch
    run = api.get(f"/v1/runs/{rid}").json()
    assert (run["name"], run["n_batches"], run["n_epochs"]) == ("w", 0, 0)
    # the same bodies with the type are taken
    for method, url, body in bodies:
        assert api.request(method, url, json=body).status_code in (200, 201)


# --- bug 4: since=nan ---------------------------------------------------------------------


def test_a_since_that_is_not_a_finite_number_is_a_422_naming_it(api: httpx.Client) -> None:
    new_run(api)
    for value in ("nan", "NaN", "inf", "-inf"):
        e = error(api.get("/v1/runs", params={"since": value}), 422, "validation_error")
        assert e["message"].startswith("query.since: "), e
    assert api.get("/v1/runs", params={"since": "0"}).json()["count"] >= 1


# --- bug 8: config integers beyond 2**53 - 1 ----------------------------------------------


def test_a_config_integer_no_json_reader_keeps_is_refused_like_1e309(api: httpx.Client) -> None:
    for big in (2**53, -(2**53), 2**64, int("9" * 4000)):
        for config in ({"seed": big}, {"a": [{"b": big}]}):
            body = json.dumps({"name": "big", "config": config}).encode()
            r = api.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
            e = error(r, 422, "validation_error")
            assert "2**53 - 1" in e["message"] and e["message"].startswith("body.config"), e
    assert api.get("/v1/runs", params={"name": "big"}).json()["count"] == 0
    edge = {"hi": 2**53 - 1, "lo": -(2**53 - 1), "flag": True, "f": 1e308}
    r = api.post("/v1/runs", json={"name": "edge", "config": edge})
    assert r.status_code == 201 and r.json()["config"] == edge, r.text


# --- bug 11: epoch metrics ----------------------------------------------------------------


def test_an_epochs_metrics_are_bounded_in_count_and_name_length(api: httpx.Client) -> None:
    rid = new_run(api)
    t = time.time()

    def post(metrics: dict[str, float]) -> httpx.Response:
        epoch = {"epoch": 0, "t": t, "metrics": metrics}
        return api.post(f"/v1/runs/{rid}/epochs", json={"epochs": [epoch]})

    e = error(post({f"m{i}": 1.0 for i in range(257)}), 422, "validation_error")
    assert "at most 256" in e["message"], e
    e = error(post({"x" * 101: 1.0}), 422, "validation_error")
    assert "at most 100 characters" in e["message"], e
    assert api.get(f"/v1/runs/{rid}").json()["n_epochs"] == 0
    at_limit = {f"{i:03d}".ljust(100, "m"): float(i) for i in range(256)}
    assert post(at_limit).json() == {"accepted": 1, "duplicates": 0}
    (epoch,) = api.get(f"/v1/runs/{rid}/report").json()["epochs"]
    assert epoch["metrics"] == at_limit


# --- bug 9: a large body is parsed and validated off the event loop -----------------------


@pytest.fixture
def served_here(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], threading.Thread]]:
    """The daemon's app served by uvicorn in a thread of this process (a real SQLite file,
    real HTTP on loopback): its URL, auth headers, and the thread running its event loop."""
    app = create_app(Settings(data_dir=tmp_path / "data", power_backends="constant:50"))
    token = (tmp_path / "data" / "token").read_text().strip()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url, {"Authorization": f"Bearer {token}"}, thread
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_large_row_form_body_is_parsed_and_checked_in_a_worker_thread(
    served_here: tuple[str, dict[str, str], threading.Thread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validating a batch calls ``BatchIn.sample_count`` (its length check), as does the
    endpoint's row check (a batch's default ``n``): where it runs is where the work runs.
    In the event loop, a 30 MiB body held every other request (``/healthz`` too) for a
    second or more; a small body is still read in the loop (no thread hop)."""
    url, auth, loop_thread = served_here
    seen: list[int] = []
    count = BatchIn.sample_count

    def recording(self: BatchIn) -> int | None:
        seen.append(threading.get_ident())
        return count(self)

    monkeypatch.setattr(BatchIn, "sample_count", recording)
    with httpx.Client(base_url=url, headers=auth, timeout=60) as api:
        rid = new_run(api)
        t = time.time() - 100
        big = [{"seq": i, "t": t + i, "loss": 2.0, "losses": [0.5] * 500} for i in range(300)]
        assert len(json.dumps({"batches": big}, separators=(",", ":"))) > 256 * 1024
        r = api.post(f"/v1/runs/{rid}/batches", json={"batches": big})
        assert r.json() == {"accepted": 300, "duplicates": 0}, r.text
        assert seen and loop_thread.ident not in seen, "parsed or checked in the event loop"
        seen.clear()
        small = [{"seq": 1000, "t": t, "loss": 2.0, "losses": [0.5, 0.25]}]
        r = api.post(f"/v1/runs/{rid}/batches", json={"batches": small})
        assert r.json() == {"accepted": 1, "duplicates": 0}, r.text
        assert set(seen) == {loop_thread.ident}
        # a large invalid body is refused as any invalid body is, naming the batch
        bad = [*big[:-1], {**big[-1], "seq": 5000, "t": "now"}]
        e = error(api.post(f"/v1/runs/{rid}/batches", json={"batches": bad}), 422,
                  "validation_error")  # fmt: skip
        assert e["message"].startswith("body.batches.299.t"), e
        run = api.get(f"/v1/runs/{rid}").json()
        assert (run["n_batches"], run["last_seq"]) == (301, 1000)


# --- bug 13: the 503 at the connection limit ----------------------------------------------


@pytest.fixture
def open_files(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Start this test's daemons with an open-files limit of ``n`` (soft and hard), so that
    their connection limit is small: (n - 128) // 2."""

    def limit(n: int) -> None:
        real_popen = subprocess.Popen

        def popen(*args: Any, **kw: Any) -> Any:
            def set_limit() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

            return real_popen(*args, preexec_fn=set_limit, **kw)

        monkeypatch.setattr(subprocess, "Popen", popen)
        monkeypatch.setattr(conftest, "SPAWN", True)  # spawned through that Popen

    return limit


def _first_answer(s: socket.socket) -> bytes:
    """The head of the first answer on ``s``; with all of the answer if the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data.startswith(b"HTTP/1.1 100"):
        while chunk := s.recv(65536):  # the 503 closes the connection
            data += chunk
    return data


def test_at_the_connection_limit_a_request_gets_the_json_503(
    daemon_factory: Callable[..., Daemon], open_files: Callable[[int], None]
) -> None:
    """Requests that wait for their body (``Expect: 100-continue``: the 100 says that the
    daemon serves the request) until every connection is busy; the next one gets the 503."""
    open_files(200)  # a connection limit of 36
    d = daemon_factory()
    busy: list[socket.socket] = []
    head = (
        f"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {d.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=20)
            busy.append(s)
            s.sendall(head)
            answer = _first_answer(s)
            if not answer.startswith(b"HTTP/1.1 100"):
                break
        assert 30 <= len(busy) <= 40, len(busy)
        status, _, rest = answer.partition(b"\r\n")
        fields, _, body = rest.partition(b"\r\n\r\n")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.decode().partition(":") for line in fields.split(b"\r\n"))
        )
        assert status.startswith(b"HTTP/1.1 503"), answer
        assert headers["content-type"] == "application/json", headers
        assert headers["retry-after"] == "1" and headers["connection"] == "close", headers
        e = json.loads(body)["error"]
        assert e["code"] == "overloaded" and "retry" in e["message"], e
    finally:
        for s in busy:
            s.close()
    deadline = time.monotonic() + 30  # the daemon sees the connections close, and serves again
    while (code := _healthz(d)) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert code == 200


def _healthz(d: Daemon) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{d.url}/healthz", timeout=5).status_code
    return 0
