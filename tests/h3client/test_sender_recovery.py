"""The sender recovering from what it cannot help, against real daemons: nowhere to put a
request (it waits, not spins), a queue bound lower than a request (the sender is woken in
time), a daemon started again on another port (followed there), and an outage longer than
the daemon's run timeout (the reaped run is reopened)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from h3client import Client, H3Profiler
from h3client._exporter import HttpExporter, Request
from tests.conftest import Daemon, daemon_env, free_port


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def n_batches(url: str, data_dir: Path, run_id: str) -> int:
    with Client(url, data_dir=data_dir) as c:
        try:
            return int(c.get_run(run_id)["n_batches"])
        except Exception:  # not created yet
            return 0


class Proxy:
    """A TCP relay from a port of its own to the daemon's: ``cut()`` closes it and every
    connection through it (a network partition), ``heal()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._srv: socket.socket | None = None

    def heal(self) -> Proxy:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self._lock:
                self._socks += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._srv is not None:
            with contextlib.suppress(OSError):  # wakes the accept() blocked on it (Linux)
                self._srv.shutdown(socket.SHUT_RDWR)
            self._srv.close()
            self._srv = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def proxy_to() -> Iterator[Callable[[Daemon], Proxy]]:
    made: list[Proxy] = []

    def make(d: Daemon) -> Proxy:
        p = Proxy(d.port).heal()
        made.append(p)
        return p

    yield make
    for p in made:
        p.cut()


# --- bug 3: nowhere to put a request -------------------------------------------------------


def test_a_stop_with_neither_daemon_nor_disk_waits_for_the_retry_time_not_spinning(
    tmp_path: Path,
) -> None:
    """stop() woke the worker again at once after each pass that held its request back: the
    two threads ping-ponged (retrying the spool dir each time) for the whole timeout."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "spool").write_text("")  # a file where the spool dir should be: no spool
    prof = H3Profiler(
        "nowhere", url=f"http://127.0.0.1:{free_port()}", data_dir=data, autostart=False,
        flush_interval_s=0.2,
    )  # fmt: skip
    exp = prof._exporter
    assert exp is not None
    tries = [0]
    spool = exp.spool

    def counted(req: Request) -> bool:
        tries[0] += 1
        return spool(req)

    exp.spool = counted  # type: ignore[method-assign]
    for k in range(150):
        prof.log_batch(1.0 + k)
    res = prof.stop(timeout_s=2)
    assert res["batches_logged"] == res["batches_lost"] == 150  # accounted as before
    # one try per retry time (at most flush_interval_s apart), and stop()'s own spooling:
    # not thousands
    assert tries[0] < 40, tries[0]


# --- bug 4: a small max_queue ----------------------------------------------------------------


def test_a_small_max_queue_wakes_the_sender_and_loses_nothing(daemon: Daemon) -> None:
    """The sender was woken at max_batch (2 000) queued batches only: with max_queue 50 the
    training thread dropped everything past 4 × 50 before the sender's next tick."""
    prof = H3Profiler(
        "small-queue", url=daemon.url, data_dir=daemon.data_dir, max_queue=50,
        flush_interval_s=60,  # no tick during the test: only a wake sends
    )  # fmt: skip
    proc = prof._proc
    assert proc is not None and prof.run_id is not None
    for r in range(8):
        for k in range(50):
            prof.log_batch(1.0 + 50 * r + k)
        wait_until(lambda: not proc.batches and not proc._busy, "the sender to take the queue", 10)
    res = prof.stop(timeout_s=30)
    assert res["batches_logged"] == 400 and res["batches_lost"] == 0
    assert res["batches_posted"] + res["batches_spooled"] == 400
    assert n_batches(daemon.url, daemon.data_dir, prof.run_id) == res["batches_posted"]


def test_the_sender_is_woken_at_the_overflow_threshold_with_room_past_it() -> None:
    from h3client._batching import BatchProcessor

    class Nowhere:
        def ready(self) -> bool:
            return False

        def send(self, req: Request) -> Any:
            return "down"

        def spool(self, req: Request) -> bool:
            return True

        def shutdown(self) -> None:
            pass

    for max_batch, max_queue, wake_at, hard_limit in (
        (2000, 50, 50, 2050),  # room for a full request past the overflow threshold
        (100, 100_000, 100, 400_000),
    ):
        p = BatchProcessor(Nowhere(), max_batch=max_batch, max_queue=max_queue)
        assert (p.wake_at, p.hard_limit) == (wake_at, hard_limit)
        assert p.close(timeout_s=5)


# --- bug 7: a daemon started again on another port ------------------------------------------


def test_a_daemon_restarted_on_another_port_is_found_through_daemon_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("H3D_URL", "H3D_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    env = daemon_env(data, H3D_POWER_BACKENDS="constant:50", H3D_LOG_LEVEL="WARNING")
    first = Daemon(data, env).start()
    second: Daemon | None = None
    try:
        prof = H3Profiler("moved", data_dir=data, autostart=False, flush_interval_s=0.05)
        assert prof.run_id is not None and prof._client is not None
        assert prof._client.url == first.url  # found through daemon.json
        for k in range(100):
            prof.log_batch(1.0 + k)
        wait_until(lambda: n_batches(first.url, data, str(prof.run_id)) == 100, "100 posted")
        first.kill()  # its daemon.json stays, naming its port
        for k in range(100, 200):
            prof.log_batch(1.0 + k)
        exp = prof._exporter
        assert exp is not None
        wait_until(lambda: not exp.online, "the sender to see the outage")
        port = free_port()
        while port == first.port:
            port = free_port()
        second = Daemon(data, env, port=port).start()  # as autostart's --port 0 does
        for k in range(200, 300):
            prof.log_batch(1.0 + k)
        res = prof.stop(timeout_s=30)
        assert not res["offline"] and res["flushed"]
        assert res["batches_logged"] == 300 and res["batches_lost"] == 0
        assert res["batches_rejected"] == 0
        with Client(second.url, data_dir=data) as c:
            run = c.get_run(prof.run_id)
        assert run["status"] == "finished" and run["n_batches"] == 300
        assert not (data / "spool" / f"{prof.run_id}.jsonl").exists()
    finally:
        first.stop()
        if second is not None:
            second.stop()


# --- bug 8: an outage longer than the daemon's run timeout ------------------------------------


def test_an_outage_longer_than_the_run_timeout_reopens_the_reaped_run(
    daemon_factory: Callable[..., Daemon],
    proxy_to: Callable[[Daemon], Proxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reaper failed the run during a partition; the live profiler came back, its spool
    was replayed (H3-Replay is let in), and every later batch was refused (409)."""
    d = daemon_factory("reaping", H3D_RUN_TIMEOUT_S="1", H3D_RUN_REAP_EVERY_S="0.1")
    px = proxy_to(d)
    monkeypatch.setattr(socket, "gethostname", lambda: "remote-host")  # timed out, not followed
    prof = H3Profiler("partition", url=px.url, data_dir=d.data_dir, flush_interval_s=0.05)
    run_id = str(prof.run_id)
    exp = prof._exporter
    assert exp is not None
    for k in range(100):
        prof.log_batch(1.0 + k)
    wait_until(lambda: n_batches(d.url, d.data_dir, run_id) == 100, "100 posted")
    px.cut()
    for k in range(100, 200):
        prof.log_batch(1.0 + k)
    wait_until(lambda: not exp.online, "the sender to see the partition")

    def reaped() -> bool:
        with Client(d.url, data_dir=d.data_dir) as c:
            return bool(c.get_run(run_id)["status"] == "failed")

    wait_until(reaped, "the reaper to fail the run")
    px.heal()
    for k in range(200, 300):
        prof.log_batch(1.0 + k)
    res = prof.stop(timeout_s=30)
    assert res["batches_rejected"] == res["batches_lost"] == 0
    assert res["batches_posted"] + res["batches_spooled"] == 300
    assert not res["offline"] and res["flushed"]
    with Client(d.url, data_dir=d.data_dir) as c:
        run = c.get_run(run_id)
    assert run["status"] == "finished" and run["n_batches"] == 300


def test_any_http_answer_after_an_outage_counts_the_daemon_as_up(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A 4xx is an answer: the daemon is up (before, the sender stayed "offline": no report
    was fetched and stop() warned that the final status reached neither daemon nor spool)."""
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run_id = c.create_run(name="ended")["id"]
        c.update_run(run_id, status="finished")
    client = Client(daemon.url, data_dir=daemon.data_dir)
    exp = HttpExporter(client, run_id)
    try:
        exp.offline("an outage")
        exp._retry_at = 0.0  # its back-off has passed
        assert exp.send(Request("update", b'{"status": "finished"}')) == "sent"  # done before
        assert exp.online
        exp.offline("another outage")
        exp._retry_at = 0.0
        assert exp.send(Request("epochs", b'{"epochs": [{"epoch": -1}]}')) == "rejected"
        assert exp.online
    finally:
        exp.shutdown()


# --- the h3-report fixer's note: a found URL and a wrong H3D_TOKEN ---------------------------


def test_a_found_url_that_cannot_prove_the_given_token_says_so(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With H3D_TOKEN given, the error blamed the data dir ("start its daemon"), whose daemon
    was running: what it could not prove is that it holds the token given."""
    from h3client import H3ClientError

    monkeypatch.delenv("H3D_URL", raising=False)
    monkeypatch.setenv("H3D_TOKEN", "not-its-token")
    with Client(data_dir=daemon.data_dir) as c:
        assert c.url == daemon.url  # found through daemon.json
        with pytest.raises(H3ClientError) as e:
            c.list_runs()
    msg = str(e.value)
    assert daemon.url in msg and "the token given (H3D_TOKEN)" in msg
    assert "start its daemon" not in msg
