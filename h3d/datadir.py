"""The data dir: private modes, and an exclusive lock held by the one daemon that uses it.

The lock is ``flock`` on ``<data dir>/h3d.lock`` (the daemon's pid written inside), held for
the daemon's whole life and released by the kernel when the process ends, however it ends:
a lock file left by a SIGKILLed daemon does not block the next start. ``h3d stop`` signals a
pid only if that pid is the process holding the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from h3d.errors import H3DError

LOCK_NAME = "h3d.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600


class DataDirBusy(H3DError):
    """Another process holds the data dir's lock."""

    status_code = 503
    code = "data_dir_busy"


def make_private(data_dir: Path) -> None:
    """Create the data dir 0700 (or tighten it) and make the files in it 0600.

    The token guards the API, so the store, its WAL and the spool must not be readable by
    other local users either. The process umask covers files SQLite creates later.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    with contextlib.suppress(PermissionError):
        os.chmod(data_dir, DIR_MODE)
    for p in data_dir.iterdir():
        with contextlib.suppress(PermissionError, FileNotFoundError):
            if p.is_file():
                os.chmod(p, FILE_MODE)
            elif p.is_dir():
                os.chmod(p, DIR_MODE)


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirBusy` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.path.parent)
            who = f"pid {holder}" if holder is not None else "another process"
            raise DataDirBusy(
                f"{self.path.parent} is in use by another h3d daemon ({who}); "
                "stop it (h3d stop) or use another --data-dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk: let go, the caller says why in one line
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _proc_locks_holder(path: Path) -> int | None:
    """The pid of the FLOCK holder of ``path`` from /proc/locks (Linux), if listed."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                return int(parts[4])
    return None


def lock_holder(data_dir: Path) -> int | None:
    """The pid holding the data dir's lock, or None if nobody holds it."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        with contextlib.suppress(OSError, ValueError):
            holder = _proc_locks_holder(path)
            if holder is not None:
                return holder
        try:  # no /proc/locks (macOS): the pid the holder wrote
            return int(os.read(fd, 32).decode().strip())
        except ValueError:
            return None
    finally:
        os.close(fd)
