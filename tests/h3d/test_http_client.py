"""How the CLI's commands reach a daemon (h3d/_http.py), run as a user runs them: whatever
stands in the way (another program on the port, a wrong token, a daemon that goes away, a
data dir that is a file) is one line on stderr, never a traceback."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    IMPERSONATIONS,
    Daemon,
    Listener,
    another_program_on_a_port,
    data_dir_with_a_token,
    free_port,
)
from tests.h3d.test_cli import h3d, one_error_line


@contextlib.contextmanager
def a_web_server(root: Path) -> Iterator[str]:
    """A plain static web server (not h3d) serving ``root``: 404 pages in HTML."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, directory=str(root), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def a_peer_that_hangs_up() -> Iterator[str]:
    """A port where every connection is accepted, read, and closed without an answer (a
    daemon killed while it serves the request)."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = sock.accept()
                with conn:
                    conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        sock.close()


def test_with_no_token_a_program_on_the_port_is_probed_not_asked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"  # a data dir no daemon ever ran in: no token
    empty.mkdir(mode=0o700)
    with another_program_on_a_port() as port:  # answers "ok" (text) to everything
        for cmd in (["runs"], ["show", "x"], ["export", "x"], ["compare", "x"]):
            r = h3d(empty, *cmd, H3D_PORT=str(port))
            assert r.returncode == 1, r.stdout
            line = one_error_line(r)
            assert f"no h3d daemon answers at http://127.0.0.1:{port}" in line, line
            # the start hint is runnable as printed: this data dir, and a free port
            assert f"`h3d serve --data-dir {empty} --port 0`" in line, line
    with Listener(IMPERSONATIONS[0]) as stub:  # an h3d look-alike answering JSON to all
        r = h3d(empty, "runs", H3D_PORT=str(stub.port))
        line = one_error_line(r)
        assert r.returncode == 1 and "GET /v1/runs is not an h3d daemon's" in line, line
        r = h3d(empty, "show", "x", H3D_PORT=str(stub.port))
        line = one_error_line(r)
        assert r.returncode == 1 and "/report is not an h3d daemon's: it has no" in line, line
        assert stub.tokens_seen == []


def test_with_no_token_another_data_dirs_daemon_is_named(daemon: Daemon, tmp_path: Path) -> None:
    empty = tmp_path / "empty"  # no token here: none was sent, none was refused
    r = h3d(empty, "runs", H3D_PORT=str(daemon.port))
    line = one_error_line(r)
    assert r.returncode == 1 and f"no daemon serves {empty}" in line, line
    assert f"{empty} has no token" in line and "refuses" not in line, line


def test_an_answer_not_in_h3ds_shape_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Listener(IMPERSONATIONS[1]) as stub:  # JSON, but no h3d's: {"id": "x", ...}
        r = h3d(data, "runs", H3D_URL=stub.url)
        line = one_error_line(r)
        assert r.returncode == 1 and f"{stub.url} to GET /v1/runs" in line, line
        assert "is not an h3d daemon's: it has no 'data'" in line, line
        r = h3d(data, "status", H3D_URL=stub.url)
        assert r.returncode == 1 and "is not an h3d daemon's" in one_error_line(r)
    with another_program_on_a_port() as port:  # 200 "ok", not JSON
        r = h3d(data, "show", "x", H3D_URL=f"http://127.0.0.1:{port}")
        line = one_error_line(r)
        assert r.returncode == 1 and "GET /v1/runs/resolve is not JSON" in line, line
    (tmp_path / "www").mkdir()
    with a_web_server(tmp_path / "www") as url:  # 404 in HTML
        r = h3d(data, "show", "x", H3D_URL=url)
        line = one_error_line(r)
        assert r.returncode == 1 and "<" not in line, line
        assert f"{url} answered GET /v1/runs/resolve with 404" in line, line
        assert "not as an h3d daemon does" in line, line


def test_a_wrong_h3d_token_is_named_as_such(daemon: Daemon, tmp_path: Path) -> None:
    # the data dir's own daemon (daemon.json, the lock) refuses the token given in H3D_TOKEN
    r = h3d(daemon, "runs", H3D_TOKEN="wrong")
    line = one_error_line(r)
    assert r.returncode == 1, r.stdout
    pid = daemon.proc.pid if daemon.proc else None
    assert (
        f"the daemon of {daemon.data_dir} (pid {pid}) at {daemon.url} refuses the token in "
        "H3D_TOKEN" in line
    ), line
    assert "no daemon serves" not in line and "start one" not in line, line
    # a daemon on the port, of no data dir here: the token named is still H3D_TOKEN's
    mine = tmp_path / "mine"
    r = h3d(mine, "show", "x", H3D_PORT=str(daemon.port), H3D_TOKEN="wrong")
    line = one_error_line(r)
    assert f"the daemon at {daemon.url} refuses the token in H3D_TOKEN" in line, line
    assert "no daemon serves" not in line, line
    # the data dir's own token, refused by another data dir's daemon: as before
    mine = data_dir_with_a_token(tmp_path / "other", "not-that-daemons")
    r = h3d(mine, "runs", H3D_PORT=str(daemon.port))
    line = one_error_line(r)
    assert f"no daemon serves {mine}" in line and "refuses this one's token" in line, line


def test_a_daemon_that_goes_away_or_a_bad_url_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with a_peer_that_hangs_up() as url:
        r = h3d(data, "runs", H3D_URL=url)
    line = one_error_line(r)
    assert r.returncode == 1 and f"the daemon at {url} went away during GET /v1/runs" in line
    for bad in ("notaurl", "ftp://127.0.0.1:1"):
        r = h3d(data, "runs", H3D_URL=bad)
        line = one_error_line(r)
        assert r.returncode == 1 and f"{bad} is not a URL h3d can use" in line, line
    r = h3d(data, "runs", H3D_URL="http://[::1")
    assert r.returncode == 1 and "is not a URL h3d can use" in one_error_line(r)


def test_a_read_timeout_is_one_line(tmp_path: Path) -> None:
    from h3d._http import DaemonClient, DaemonDown
    from h3d.config import Settings

    c = DaemonClient(Settings(data_dir=tmp_path), url="http://127.0.0.1:1")
    down = c.transport_problem(httpx.ReadTimeout("timed out"), "GET /v1/runs")
    assert isinstance(down, DaemonDown)
    assert (
        str(down)
        == "the daemon at http://127.0.0.1:1 did not answer GET /v1/runs in time (timed out)"
    )


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path, under: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    data = afile / under if under else afile
    port = str(free_port())
    for cmd in (["status"], ["runs"], ["show", "x"], ["stop"]):
        r = h3d(data, *cmd, H3D_PORT=port)
        assert r.returncode != 0, r.stdout
        assert one_error_line(r) == (
            f"h3d: {afile} is not a directory; name another data dir (--data-dir or H3D_DATA_DIR)"
        ), cmd
    r = h3d(data, "runs", H3D_URL=f"http://127.0.0.1:{port}")  # the token is read there
    assert r.returncode == 1 and f"{afile} is not a directory" in one_error_line(r)


def test_the_start_hint_names_the_data_dir(tmp_path: Path) -> None:
    d4 = tmp_path / "d4"
    port = free_port()  # nothing listens there: `h3d serve` can take it
    for cmd in ("runs", "status"):
        r = h3d(d4, cmd, H3D_PORT=str(port))
        line = one_error_line(r)
        assert r.returncode == 1 and f"http://127.0.0.1:{port}" in line, line
        assert f"`h3d serve --data-dir {d4}`" in line, line
