"""The data dir: this user's alone, private modes, and an exclusive lock held by the one
daemon that uses it.

A data dir or token that another user owns, or may write, is refused (:func:`check_private`):
whoever could write there could have put a token of theirs in it. :func:`make_private`
changes the modes of H3's own files only (:data:`OWN_FILES`, the spool), never through a link.

The lock is ``flock`` on ``<data dir>/h3d.lock`` (the daemon's pid written inside), held for
the daemon's whole life and released by the kernel when the process ends, however it ends:
a lock file left by a SIGKILLed daemon does not block the next start. ``h3d stop`` signals a
pid only if that pid is the process holding the lock. Windows has no ``flock``: there the
lock is ``msvcrt.locking`` on one byte of the file past its pid (:data:`_WINDOWS_LOCK_AT`),
which Windows also drops when the process ends.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import stat
import time
from pathlib import Path

from h3d.errors import H3DError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

LOCK_NAME = "h3d.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600


class DataDirBusy(H3DError):
    """Another process holds the data dir's lock."""

    status_code = 503
    code = "data_dir_busy"


#: The SQLite store's file as the daemon's last clean stop left it
#: (h3d.storage.migrate.record_clean_stop), written through a .tmp.
CLEAN_STOP = "store.clean"

#: What a starting daemon writes once it reads power, before it serves (h3d.power.early),
#: through ``sampling.tmp``: the pid of the daemon that an autostarting profiler waits for.
SAMPLING_NAME = "sampling.json"

#: H3's own entries in a data dir: the only ones :func:`make_private` touches. The store
#: (the default SQLite file and SQLite's side files, the migration lock), the token, what a
#: serving daemon writes (``daemon.json`` through ``daemon.tmp``, ``sampling.json``, the
#: lock, the log of a daemon a client or the demo started, the store's clean stop) and the
#: client's autostart lock.
OWN_FILES = frozenset(
    {
        CLEAN_STOP,
        CLEAN_STOP + ".tmp",
        "token",
        "daemon.json",
        "daemon.tmp",
        SAMPLING_NAME,
        "sampling.tmp",
        LOCK_NAME,
        "h3d.db",
        "h3d.db-wal",
        "h3d.db-shm",
        "h3d.db-journal",
        "h3d.db.migrate-lock",
        "h3d.log",
        "autostart.lock",
    }
)
#: The cached live carbon intensity (``carbon-live-<zone>.json``, written through a .tmp).
OWN_PATTERNS = ("carbon-live-*.json", "carbon-live-*.tmp")
#: The client's spool: every regular file in it is H3's (``<run id>.jsonl``, ``.skipped``).
SPOOL_NAME = "spool"


class UnsafeDataDir(PermissionError):
    """A data dir, or a token, that another local user owns or may write: never used.

    Another user who created ``/tmp/h3d-alice`` first, or who may write into it, could have
    put a token (or a ``daemon.json``) of their own there: the daemon would take their token,
    and the client would hand them the runs.
    """

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename else str(self.strerror)


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_private(path: Path, st: os.stat_result, what: str) -> None:
    """Raise :class:`UnsafeDataDir` unless ``st`` (``path``'s, described as ``what``: "it",
    "its token") is owned by this user and writable by nobody else."""
    me = os.getuid()
    instead = "use a directory that only you own and can write (one under $HOME, under "
    instead += "$XDG_RUNTIME_DIR, or made by `mktemp -d`)"
    if st.st_uid != me:
        why = f"{what} is owned by {_user(st.st_uid)}, not by {_user(me)}"
    elif st.st_mode & 0o022:
        who = {0o020: "its group", 0o002: "other users", 0o022: "its group and other users"}
        why = f"{what} is writable by {who[st.st_mode & 0o022]} (mode {stat.S_IMODE(st.st_mode):o})"
        instead = f"`chmod go-w` it if nothing in it is another user's, or {instead}"
    else:
        return
    raise UnsafeDataDir(
        errno.EPERM,
        f"{why}: another local user could have put a token or daemon.json of theirs there "
        f"and read the runs, so h3d does not use it; {instead}",
        str(path),
    )


def not_a_directory(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot be a data dir when a file stands in its place (or in a
    parent's), in the words ``h3d serve`` uses; None when no file does."""
    there = next((p for p in (data_dir, *data_dir.parents) if p.exists()), data_dir)
    if there.is_dir():
        return None
    return f"{there} is not a directory; name another data dir (--data-dir or H3D_DATA_DIR)"


def check_data_dir(data_dir: Path) -> None:
    """The data dir and its token, if they exist, are this user's and writable by nobody
    else (:func:`check_private`); the directory's owner is the one that counts, wherever a
    symbolic link to it leads."""
    try:
        st = os.stat(data_dir)
    except FileNotFoundError:
        return
    check_private(data_dir, st, "it")
    token = data_dir / "token"
    try:
        fd = os.open(token, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except PermissionError:  # another user's, most likely: say so, not "Permission denied"
        check_private(data_dir, os.stat(token), "its token")
        raise
    try:
        check_private(data_dir, os.fstat(fd), "its token")
    finally:
        os.close(fd)


def _tighten(path: Path, mode: int, *, directory: bool = False) -> None:
    """``path`` to ``mode`` if it is a regular file (a directory) of this user's: never
    through a symbolic link (``O_NOFOLLOW``: a link is left as it is, and so is what it
    points to), never a FIFO or a device."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # gone, a link (ELOOP), not a directory, not readable
        return
    try:
        st = os.fstat(fd)
        kind = stat.S_ISDIR if directory else stat.S_ISREG
        if kind(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != mode:
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_private(data_dir: Path) -> None:
    """Create the data dir 0700 (or tighten it), and make H3's own files in it 0600.

    The token guards the API, so the store, its WAL and the spool must not be readable by
    other local users either. The process umask covers files SQLite creates later. Only
    H3's files are touched (:data:`OWN_FILES`, the spool and the files in it), never through
    a symbolic link: a data dir named in a project folder leaves the project's files and
    folders as they were. A data dir or token that another user owns, or may write, is
    refused (:class:`UnsafeDataDir`) before anything is written there.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    check_data_dir(data_dir)
    os.chmod(data_dir, DIR_MODE)
    for name in OWN_FILES:
        _tighten(data_dir / name, FILE_MODE)
    with contextlib.suppress(OSError):
        for entry in os.scandir(data_dir):
            if any(fnmatch.fnmatchcase(entry.name, p) for p in OWN_PATTERNS):
                _tighten(Path(entry.path), FILE_MODE)
    spool = data_dir / SPOOL_NAME
    _tighten(spool, DIR_MODE, directory=True)
    if spool.is_dir() and not spool.is_symlink():
        with contextlib.suppress(OSError):
            for entry in os.scandir(spool):
                _tighten(Path(entry.path), FILE_MODE)


#: Where the Windows lock's byte is: past the pid, which ``lock_holder`` reads, since a byte
#: ``msvcrt.locking`` holds cannot be read by other processes.
_WINDOWS_LOCK_AT = 1 << 20


def write_pid_file(path: Path, info: dict[str, object]) -> None:
    """``info`` with this process's pid, as JSON in ``path`` (mode 0600), whole or not at
    all: written to ``<name>.tmp`` first, then renamed over it. What a daemon writes to
    say where it is (``daemon.json``) or that it reads power (``sampling.json``)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)


def remove_pid_file(path: Path) -> None:
    """Remove ``path`` if this process wrote it (:func:`write_pid_file`): another daemon's,
    started since, is left alone."""
    with contextlib.suppress(FileNotFoundError, ValueError, OSError, AttributeError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def _try_lock(fd: int, *, exclusive: bool) -> bool:
    """Lock ``fd``'s file without waiting (shared or exclusive); False if another process
    holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    os.lseek(fd, _WINDOWS_LOCK_AT, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return True


def _unlock(fd: int) -> None:
    """Let go of a lock :func:`_try_lock` took."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    os.lseek(fd, _WINDOWS_LOCK_AT, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.lseek(fd, 0, os.SEEK_SET)


#: How long :meth:`DataDirLock.acquire` waits out a lock another process holds for a moment.
_PROBE_WAIT_S = 0.2


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirBusy` naming the holder.

        A lock held for a moment is waited for (up to ``_PROBE_WAIT_S``): clients and CLI
        commands probe for a daemon by taking the lock shared for a few microseconds
        (:func:`lock_holder`, the profiler's autostart), and a daemon starting then must not
        take that for another daemon. A daemon holds it for its whole life.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        deadline = time.monotonic() + _PROBE_WAIT_S
        while not (locked := _try_lock(fd, exclusive=True)) and time.monotonic() < deadline:
            time.sleep(0.005)
        if not locked:
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
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def _proc_locks_holder(path: Path) -> int | None:
    """The pid of the FLOCK holder of ``path`` from /proc/locks (Linux), if listed."""
    with open("/proc/locks") as f:
        st = path.stat()
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in f:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                return int(parts[4])
    return None


def lock_holder(data_dir: Path) -> int | None:
    """The pid holding the data dir's lock, or None if nobody holds it.

    A file in the data dir's place (or in a parent's) stops the command in one line
    (``h3d: FILE is not a directory; ...``), as ``h3d serve`` says it.
    """
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        why = not_a_directory(data_dir) or f"{data_dir}: not a directory"
        raise SystemExit(f"h3d: {why}") from None
    try:
        if _try_lock(fd, exclusive=False):
            _unlock(fd)
            return None
        with contextlib.suppress(OSError, ValueError):
            holder = _proc_locks_holder(path)
            if holder is not None:
                return holder
        try:  # no /proc/locks (macOS, Windows): the pid the holder wrote
            return int(os.read(fd, 32).decode().strip())
        except ValueError:
            return None
    finally:
        os.close(fd)
