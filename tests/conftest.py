"""Shared fixtures: settings factories and a real ``h3d serve`` process on a loopback port."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread: on a 2-core machine shared with a daemon subprocess, torch's default
# thread pool makes tiny models slower, and timings erratic, through oversubscription.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the daemon's and the client's tests run without torch
    pass


def torchrun(
    n: int,
    script: Path,
    *args: str,
    out: Path,
    env: dict[str, str] | None = None,
    launcher: Sequence[str] = (),
    timeout_s: float = 600,
) -> list[dict[str, Any]]:
    """Run ``script args... out`` on ``n`` ranks under ``torch.distributed.run`` (launcher
    options ``launcher``; one intra-op thread each); every rank writes ``out/rank<r>.json``,
    returned in rank order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", *launcher]
    proc = subprocess.run(
        [*cmd, str(script), *args, str(out)],
        cwd=REPO,
        env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def burn_cpu(seconds: float) -> None:
    """Keep this thread on the CPU for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def another_program_on_a_port() -> Iterator[int]:
    """A web server that is not h3d, answering 200 "ok" to every GET (a health check of its
    own at /healthz too), on a free loopback port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class Listener:
    """Another user's program on a loopback port that clients probe: it answers ``/healthz``
    as an h3d would, with the ``body`` given (or with what ``relay`` answers: the real
    daemon's, passed on), and records every request it gets (a client must send it no
    token, nor any run)."""

    def __init__(self, body: dict[str, Any] | None = None, relay: str | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                listener.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "body": self.rfile.read(length) if length else b"",
                    }
                )
                if relay is not None:  # what the real daemon answers, passed on as it is
                    data = httpx.get(relay + self.path, timeout=10).content
                elif self.path.startswith("/healthz"):
                    data = json.dumps(body).encode()
                else:
                    data = json.dumps({"id": "x", "status": "running"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer  # noqa: N815 (the stdlib's names)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def tokens_seen(self) -> list[str]:
        return [r["authorization"] for r in self.seen if r["authorization"]]


IMPERSONATIONS: list[dict[str, Any]] = [
    {"status": "ok", "version": "0.1.0", "authorized": True},  # says it takes the token
    {"status": "ok", "version": "0.1.0"},  # says nothing (as an h3d older than the field)
    {"status": "ok", "version": "0.1.0", "authorized": True, "proof": "0" * 64},  # a guess
]


def data_dir_with_a_token(path: Path, token: str = "the-victims-token") -> Path:
    """A data dir as a daemon that ran once leaves it: 0700, its token 0600."""
    path.mkdir(mode=0o700, parents=True)
    (path / "token").write_text(token + "\n")
    (path / "token").chmod(0o600)
    return path


def daemon_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("H3D_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["H3D_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


class ForkedProcess:
    """A daemon forked by the zygote (tests/_zygote.py), with the part of
    ``subprocess.Popen``'s surface the tests use. The zygote reaps it and writes its exit
    code, as ``Popen.returncode`` gives it, to ``status``."""

    def __init__(self, pid: int, status: Path, args: list[str]) -> None:
        self.pid = pid
        self.status = status
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.status.exists():
            self.returncode = int(self.status.read_text())
            self.status.unlink()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped, so the pid is still this process's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """This test process's daemon zygote (see tests/_zygote.py), started at first use."""

    _proc: subprocess.Popen[bytes] | None = None
    _lock = threading.Lock()
    _n = 0
    _dir = ""  # the exit-code files (not in a data dir, whose contents tests look at)

    @classmethod
    def fork(cls, argv: list[str], env: dict[str, str], log: Path) -> ForkedProcess:
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                cls._dir = tempfile.mkdtemp(prefix="h3-zygote-")
                atexit.register(shutil.rmtree, cls._dir, True)
                base = {k: v for k, v in os.environ.items() if not k.startswith("H3D_")}
                cls._proc = subprocess.Popen(
                    [sys.executable, str(REPO / "tests" / "_zygote.py")],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=REPO,
                    env={**base, "PYTHONPATH": str(REPO)},
                )
            cls._n += 1
            status = Path(cls._dir) / f"{cls._n}.exit"
            req = {
                "argv": argv,
                "env": env,
                "cwd": str(REPO),
                "log": str(log),
                "status": str(status),
            }
            assert cls._proc.stdin is not None and cls._proc.stdout is not None
            cls._proc.stdin.write(json.dumps(req).encode() + b"\n")
            cls._proc.stdin.flush()
            line = cls._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the daemon zygote exited {cls._proc.wait()}")
            return ForkedProcess(json.loads(line)["pid"], status, argv)


#: Real ``python -m h3d serve`` spawns for every test daemon, not zygote forks.
SPAWN = os.environ.get("H3_TEST_SPAWN") == "1"


class Daemon:
    """A real daemon process. ``restart()`` keeps the data dir and the port.

    Forked by the zygote (its imports already done, see tests/_zygote.py) when it runs this
    tree's h3d, else spawned as ``python -m h3d serve``."""

    def __init__(
        self, data_dir: Path, env: dict[str, str], port: int = 0, tree: Path = REPO
    ) -> None:
        self.data_dir = data_dir
        self.env = env
        self.port = port
        self.tree = tree  # the source tree whose h3d runs (another revision's, extracted)
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self.url = ""
        self.token = ""
        self.log = data_dir / "daemon-test.log"

    def start(self, timeout_s: float = 120.0) -> Daemon:
        # generous: a cold start (imports, migrations) on a shared 2-core machine can take 30 s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "daemon.json").unlink(missing_ok=True)
        argv = ["serve", "--port", str(self.port)]
        if self.tree == REPO and not SPAWN:
            self.log.touch()  # here, as a spawn's: a child killed before it opens it has one
            self.proc = Zygote.fork(argv, self.env, self.log)
        else:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "h3d", *argv],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.tree,
                )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"h3d exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.url = json.loads((self.data_dir / "daemon.json").read_text())["url"]
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    self.port = int(self.url.rsplit(":", 1)[1])
                    self.token = (self.data_dir / "token").read_text().strip()
                    return self
            except (FileNotFoundError, ValueError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.05)
        self.kill()  # not left serving somewhere after the test gave up on it
        raise RuntimeError(f"h3d did not become healthy:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30, **kw
        )


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(name: str = "data", **env: str) -> Daemon:
        env.setdefault("H3D_POWER_BACKENDS", "constant:50")
        env.setdefault("H3D_SAMPLE_INTERVAL_S", "0.02")
        env.setdefault("H3D_FLUSH_INTERVAL_S", "0.2")
        env.setdefault("H3D_LOG_LEVEL", "WARNING")
        d = Daemon(tmp_path / name, daemon_env(tmp_path / name, **env))
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


@pytest.fixture
def ca_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every CA-bundle load by an SSL context made during the test (what makes building a
    verifying context cost 34-52 ms of CPU), by the name of the method that loaded it."""
    import ssl

    loads: list[str] = []
    for name in ("load_verify_locations", "load_default_certs"):
        real = getattr(ssl.SSLContext, name)

        def counted(
            self: ssl.SSLContext, *a: Any, _real: Any = real, _name: str = name, **kw: Any
        ) -> Any:
            loads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(ssl.SSLContext, name, counted)
    return loads


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c


def profile_on_two_nodes(a: Daemon, b: Daemon, run_id: str, *, batches: int = 20) -> None:
    """One 2-rank run, rank 0 profiled through daemon ``a`` and rank 1 through ``b`` (two
    nodes of one store), ``batches`` batches a rank, both stopped, then half a second for
    both samplers to write their samples past the run's end."""
    from h3client import H3Profiler

    profs = [
        H3Profiler("two-tdps", url=d.url, data_dir=d.data_dir, run_id=run_id, rank=r, world_size=2)
        for r, d in enumerate((a, b))
    ]
    for k in range(batches):
        for p in profs:
            p.log_batch(2.0 - 0.05 * k)
        time.sleep(0.02)
    for p in profs[:-1]:  # a rank's stop waits for the run's end only with its report
        p.stop(report=False)
    profs[-1].stop()
    time.sleep(0.5)
