"""The test suite's daemon zygote: a process that imports what ``h3d serve`` imports once,
then forks each test's daemon from that state.

A test daemon spawned as ``python -m h3d serve`` spends most of its start importing FastAPI,
SQLAlchemy and uvicorn (0.6-1 s of CPU on these 2-core hosts), and the suite starts some
300 of them. A forked daemon runs the same ``h3d.cli.main(["serve", ...])`` with the same
environment, data dir, port and log file; only its imports are already done. Tests of the
start itself (``tests/h3d/test_serve_startup.py``, the CLI's and the client's autostart)
spawn ``h3d`` as users do; ``H3_TEST_SPAWN=1`` makes every test daemon a real spawn.

The protocol, one JSON line each way on stdin/stdout:
    {"argv": [...], "env": {...}, "cwd": "...", "log": "...", "status": "..."}
    -> {"pid": N}
A child's exit code, as ``subprocess.Popen.returncode`` gives it (negative: the signal),
is written to the file ``status`` once the zygote reaps it. The zygote starts no thread
(fork after threads would copy their locks held), and exits when its stdin closes.
"""

from __future__ import annotations

import json
import os
import select
import sys


def preload() -> None:
    """What ``h3d serve`` imports before it answers, in the order it imports it."""
    from h3d import cli

    cli._import_fastapi_deferred()
    import uvicorn  # noqa: F401
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.asyncio  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401

    import h3d.app  # noqa: F401
    import h3d.security  # noqa: F401
    import h3d.storage.migrate  # noqa: F401

    try:  # the store's driver for the tests on PostgreSQL
        import psycopg  # noqa: F401
        import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
    except ImportError:
        pass


def child(req: dict, out_fd: int) -> None:
    """In the forked child: become ``python -m h3d serve ...`` as a spawn would be."""
    os.close(out_fd)
    fd = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.environ.clear()
    os.environ.update(req["env"])
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in extra if p not in sys.path]  # as the spawn's would start
    os.chdir(req["cwd"])
    from h3d import cli

    sys.argv = [cli.__file__.replace("cli.py", "__main__.py"), *req["argv"]]
    code = 1
    try:
        code = cli.main(req["argv"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = STATUS.pop(pid, None)
        if path is not None:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(tmp, path)  # whole, never half-written


STATUS: dict[int, str] = {}


def main() -> None:
    preload()
    out = os.dup(1)  # the replies' channel; the children's stdout is their log
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.02)
        reap()
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return  # the test worker is gone
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(req, out)
            STATUS[pid] = req["status"]
            os.write(out, json.dumps({"pid": pid}).encode() + b"\n")


if __name__ == "__main__":
    main()
