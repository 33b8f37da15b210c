"""``h3client.Client``'s HTTP stack: what it builds, against a real daemon."""

from __future__ import annotations

from typing import Any

import pytest

from h3client import Client
from tests.conftest import Daemon


def test_a_plain_http_daemon_costs_no_ca_bundle_and_https_keeps_verifying(
    daemon: Daemon, ca_loads: list[str]
) -> None:
    # building a verifying SSL context costs 34-52 ms of CPU: a profiler's sender did it on
    # its first post, for a daemon on plain http that never uses it
    with Client(daemon.url, daemon.token) as c:
        run = c.create_run(name="plain-http")  # real round trips
        assert c.get_run(run["id"])["name"] == "plain-http"
    assert ca_loads == []
    with Client("https://127.0.0.1:1", "t") as c:
        assert c.http is not None
    assert ca_loads, "an https daemon is reached with certificate verification"


class ClosesAReusedConnection:
    """A loopback HTTP/1.1 server (the standard library's, keeping connections alive) that
    answers every request, except that the ``close_at``-th request it reads (1-based, over
    all connections) is met by closing its connection without an answer: what a client sees
    when it writes into a kept-alive connection that the server (uvicorn's keep-alive timer,
    h3d's request-head deadline) or a proxy is closing."""

    def __init__(self, close_at: int) -> None:
        import itertools
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.close_at = close_at
        self.requests: list[tuple[int, str]] = []  # (connection number, request line)
        server, numbers = self, itertools.count(1)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept alive

            def setup(self) -> None:
                super().setup()
                self.number = next(numbers)

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append((self.number, self.requestline))
                if len(server.requests) == server.close_at:
                    self.close_connection = True  # closed, no answer
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "12")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            do_GET = do_POST = do_DELETE = _answer  # noqa: N815 (the stdlib's names)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_request_cut_off_on_a_reused_connection_is_sent_again_when_it_can_be() -> None:
    """The sender's operations (stored once by their keys) and GETs go once more on a new
    connection; any other request is not repeated, and its caller is told."""
    from h3client.errors import H3ConnectionError

    server = ClosesAReusedConnection(close_at=2)
    try:
        with Client(server.url, "t") as c:
            c.post_json("r1", "epochs", '{"epochs": []}')  # opens the connection
            assert c.post_json("r1", "batches", b'{"columns": {}}\n', binary=True) == {"ok": True}
        # the second request was cut off on the first connection and sent again on a second
        assert [n for n, _ in server.requests] == [1, 1, 2]
        assert [line.split()[0] for _, line in server.requests] == ["POST"] * 3
    finally:
        server.close()

    server = ClosesAReusedConnection(close_at=2)
    try:
        with Client(server.url, "t") as c:
            c.request("GET", "/healthz")
            assert c.request("GET", "/v1/runs").json() == {"ok": True}
            assert [n for n, _ in server.requests] == [1, 1, 2]
        server.close_at = 5
        with Client(server.url, "t") as c:
            c.request("GET", "/healthz")  # the 4th request, on a third connection
            with pytest.raises(H3ConnectionError):
                c.request("DELETE", "/v1/runs/r1")  # not repeated: the daemon may have
        assert len(server.requests) == 5  # acted on it before the connection went
    finally:
        server.close()


def test_connections_are_not_reused_as_long_as_the_daemon_keeps_them() -> None:
    """An idle kept-alive connection is dropped by the client well before the daemon's
    keep-alive closes it (whose timer starts earlier, when it sends its response)."""
    from h3client import client as client_module
    from h3d.security import KEEP_ALIVE_S

    assert client_module.KEEPALIVE_S <= KEEP_ALIVE_S / 2
    with Client("http://127.0.0.1:1", "t") as c:
        pool = c.http._transport._pool  # type: ignore[attr-defined]  # httpx's, built here
        assert pool._keepalive_expiry == client_module.KEEPALIVE_S
