"""What ``h3d serve`` does first: the data dir's lock before its heavy imports, a data dir
whose name no URL can hold in one line, and the lock where there is no ``flock`` (Windows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, daemon_env
from tests.h3d.test_cli import h3d, one_error_line

# Records, at the first import of each heavy package, which pid holds the data dir's lock.
_WATCH_IMPORTS = """
import json, sys
from pathlib import Path
from h3d.datadir import lock_holder

data, port = Path(sys.argv[1]), sys.argv[2]
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("sqlalchemy", "fastapi", "uvicorn") and name not in seen:
            seen[name] = lock_holder(data)
        return None

sys.meta_path.insert(0, Watch())
from h3d.cli import main
code = main(["serve", "--port", port])  # a port in use: it stops after the imports
loader = sys.modules.get("pydantic.plugin._loader")
scanned = loader is not None and loader._plugins is not None  # entry points looked up
print(json.dumps({"code": code, "seen": seen, "plugins_scanned": scanned}))
"""


def test_serve_holds_the_data_dir_before_its_heavy_imports(daemon: Daemon, tmp_path: Path) -> None:
    # A profiler that starts while `h3d serve` imports finds the data dir held and waits for
    # this daemon, rather than start one of its own that takes the data dir from it.
    data = tmp_path / "mine"
    r = subprocess.run(
        [sys.executable, "-c", _WATCH_IMPORTS, str(data), str(daemon.port)],
        env=daemon_env(data, H3D_POWER_BACKENDS="none", H3D_LOG_LEVEL="WARNING"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"] == 2 and "cannot listen on" in r.stderr, r.stderr
    pid = out["seen"]["sqlalchemy"]
    assert pid is not None and out["seen"] == {"sqlalchemy": pid, "fastapi": pid, "uvicorn": pid}
    # nor does it scan every installed distribution for pydantic plugins (its models are
    # its own)
    assert out["plugins_scanned"] is False


def test_a_data_dir_whose_name_is_not_utf8_is_one_line_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    # Latin-1 bytes in a name (0xE9, "é"): legal on Linux, found on disks from older systems
    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/lat\xe9n1"))
    for args in (("serve", "--port", "0"), ("db", "upgrade")):
        r = h3d(data, *args, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        line = one_error_line(r)
        assert "lat\\xe9n1 is not valid UTF-8" in line and "--db-url" in line, line
        assert not os.path.lexists(data)  # nothing made for a start that cannot run


# A Windows-like interpreter as far as locking goes: no fcntl, and msvcrt's byte-range lock
# (one byte at the file position, refused while another process holds it), played by a POSIX
# record lock on that byte. (subprocess, imported first, takes a module named msvcrt for Windows.)
_NO_FCNTL = """
import fcntl as posix, os, subprocess, sys, types

def locking(fd, mode, nbytes):
    start = os.lseek(fd, 0, os.SEEK_CUR)
    if mode == msvcrt.LK_UNLCK:
        posix.lockf(fd, posix.LOCK_UN, nbytes, start, os.SEEK_SET)
        return
    reading = posix.fcntl(fd, posix.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    kind = posix.LOCK_SH if reading else posix.LOCK_EX
    try:
        posix.lockf(fd, kind | posix.LOCK_NB, nbytes, start, os.SEEK_SET)
    except BlockingIOError:
        raise PermissionError(13, "Permission denied") from None

msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_NBLCK, msvcrt.locking = 0, 2, locking
sys.modules["msvcrt"], sys.modules["fcntl"] = msvcrt, None
import h3d.cli, h3d.app
from h3d.datadir import DataDirBusy, DataDirLock, lock_holder

data = h3d.cli.Path(sys.argv[1])
lock = DataDirLock(data)
try:
    lock.acquire()
except DataDirBusy as exc:
    print("busy:", exc.message, "holder:", lock_holder(data), flush=True)
else:
    print("held", flush=True)
    sys.stdin.readline()  # held until the test closes its stdin
"""


def _without_fcntl(data: Path) -> subprocess.Popen[str]:
    """A process that takes ``data``'s lock as h3d does without fcntl, and says how it went."""
    return subprocess.Popen(
        [sys.executable, "-c", _NO_FCNTL, str(data)],
        cwd=REPO,
        env=daemon_env(data),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_h3d_imports_and_locks_its_data_dir_without_fcntl(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    holder = _without_fcntl(data)
    try:
        assert holder.stdout is not None and holder.stderr is not None
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        second = _without_fcntl(data)
        out, err = second.communicate(timeout=60)
        assert out.startswith(f"busy: {data} is in use by another h3d daemon (pid {holder.pid})")
        assert out.rstrip().endswith(f"holder: {holder.pid}"), out + err
        assert (data / "h3d.lock").read_text() == f"{holder.pid}\n"  # readable past the lock
    finally:
        holder.communicate(timeout=60)  # its stdin closed: it lets go and exits
    free = _without_fcntl(data)  # the holder gone, the lock is free again
    out, err = free.communicate(timeout=60)
    assert out == "held\n", out + err


def test_a_lock_held_for_a_moment_is_not_another_daemon(tmp_path: Path) -> None:
    """A profiler or CLI command probes the data dir's lock by taking it shared for a few
    microseconds; a daemon starting at that moment took the probe for a daemon and exited."""
    import fcntl
    import threading

    from h3d.datadir import LOCK_NAME, DataDirBusy, DataDirLock

    tmp_path.chmod(0o700)
    probe = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.03, os.close, (probe,)).start()  # the probe lets go 30 ms later
    lock = DataDirLock(tmp_path)
    lock.acquire()
    try:  # a daemon that holds it for good is still refused
        with pytest.raises(DataDirBusy, match="in use by another h3d daemon"):
            DataDirLock(tmp_path).acquire()
    finally:
        lock.release()


_BUILD_APP = """
import json, sys
import fastapi.utils
from h3d.app import create_app
from h3d.config import Settings

from h3d.api import schemas

before = fastapi.utils.annotation_is_pydantic_v1
create_app(Settings(data_dir=sys.argv[1]))
models = [m for m in vars(schemas).values() if isinstance(m, type) and m.__module__ == schemas.__name__]
print(json.dumps({
    "v1": "pydantic.v1" in sys.modules,
    "restored": fastapi.utils.annotation_is_pydantic_v1 is before,
    "built": sorted(m.__name__ for m in models if m.__pydantic_complete__),
}))
"""


def test_building_the_app_builds_only_what_serving_needs(tmp_path: Path) -> None:
    # FastAPI imports pydantic.v1 (~20 ms of the start) to ask of each route's annotations
    # whether they are v1 models; none can be while it is not imported. The API's models
    # are built at their first use, but for the request bodies (h3d.api.schemas.Schema).
    r = subprocess.run(
        [sys.executable, "-c", _BUILD_APP, str(tmp_path / "data")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    bodies = ["BatchesIn", "EpochsIn", "RunCreate", "RunUpdate"]
    assert json.loads(r.stdout) == {"v1": False, "restored": True, "built": bodies}


def test_a_pydantic_v1_model_is_still_refused_once_pydantic_v1_is_loaded() -> None:
    import warnings

    from fastapi import FastAPI
    from fastapi.exceptions import PydanticV1NotSupportedError

    from h3d.api._routes import v1_checked_only_if_loaded

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic.v1 warns that it is deprecated
        from pydantic import v1

    class Old(v1.BaseModel):
        x: int

    def endpoint() -> None:
        return None

    app = FastAPI()
    with v1_checked_only_if_loaded(), pytest.raises(PydanticV1NotSupportedError):
        app.router.add_api_route("/old", endpoint, response_model=Old)
