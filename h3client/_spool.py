"""An append-only spool: what the daemon could not take yet, kept on disk until it can.

One file per run, ``<data dir>/spool/<run id>.jsonl``. Each line is one operation, replayed
in file order:

    {"v": 1, "op": "create",  "run_id": ID, "body": {<POST /v1/runs body, with "id">}}
    {"v": 1, "op": "batches", "run_id": ID, "body": {"columns": {...}, "nonfinite_as_null": true}}
    {"v": 1, "op": "epochs",  "run_id": ID, "body": {"epochs": [...]}}
    {"v": 1, "op": "update",  "run_id": ID, "body": {<PATCH /v1/runs/ID body>}}

A batches body is what the sender posts: its batches as packed columns (``"columns"``, the
daemon's ``BatchColumns``), or one object per batch (``"batches"``: older files, and the
rare request that holds an unreadable batch). Every operation is idempotent at the daemon
(a batch seq or an epoch already stored is acknowledged; a create refused because the run
exists, or a status update because it exists or finished, counts as done, see
:func:`already_done`), so
replaying a file twice, or a file that was half replayed before a crash, stores everything
exactly once. A replay says so (``REPLAY_HEADERS``): the daemon then takes the rows of a run
its reaper failed (its process gone, no final status heard: the final status is often in
this very file), never those of a run its client ended. Batches or epochs refused because
their run was closed (``409 run_finished``) were never stored: the replay stops there and
keeps the file, as ``h3d import`` does. A batches line over the daemon's body limit (413) is
sent in halves, and halves of those, down to single batches; a single batch over the limit
cannot be sent at all and is kept aside. A file is deleted only after every line in it was
acknowledged, or kept aside: a line that cannot be sent goes to ``<run id>.jsonl.skipped``.
``h3d import`` replays the same files.

Appends take an exclusive ``flock`` on the file, so two processes never interleave lines;
an append that finds the file's last line torn (a process killed in the middle of a write)
ends it first, so that its own lines stay whole. A replay takes the lock only to read a
line (and at the end, to delete the file), never across a request: an append (``stop()``
spooling what is left by its deadline) waits for one read at most, and the replay reads
what was appended meanwhile before it reaches the end.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import logging
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from h3client._config import private_dir, private_file
from h3client.client import OPERATIONS, REPLAY_HEADERS, Client
from h3client.errors import H3ConnectionError, H3HTTPStatusError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-process use only
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

VERSION = 1
_ALREADY = frozenset({"run_exists", "run_finished"})


def already_done(op: str, code: str) -> bool:
    """Whether the daemon's refusal of ``op`` means it was done before (a resumed run, a
    replay): a create refused because the run exists, or a status update refused because the
    run exists or finished. Never for batches or epochs: the daemon acknowledges rows it
    holds (200), so a 409 run_finished there means rows that were never stored; nor for a
    create refused with 409 run_finished: a rank joining a run that ended (a rank already in
    it is answered 200), whose batches would be stored nowhere. The sender and the spool's
    replay both decide by this."""
    if op == "create":
        return code == "run_exists"
    return op == "update" and code in _ALREADY


def batch_seqs(body: dict[str, Any]) -> list[int]:
    """The sequence numbers in a batches body, in either form."""
    columns = body.get("columns")
    if columns is not None:
        seqs = array("q")
        seqs.frombytes(binascii.a2b_base64(columns["seq_i64"]))
        return seqs.tolist()
    return [int(b["seq"]) for b in body.get("batches", ())]


def batch_epochs(body: dict[str, Any]) -> list[int]:
    """The epochs the batches of a batches body were logged in (those that say one)."""
    columns = body.get("columns")
    if columns is not None:
        col = columns.get("epoch") or ()
    else:
        col = [b.get("epoch") for b in body.get("batches", ())]
    return [int(e) for e in col if e is not None]


def _b64(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).decode()


def split_batches(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A batches body as two, each with half of its batches (in order); None if it holds
    one batch or fewer (or a column this version does not know), which cannot be split."""
    columns = body.get("columns")
    if columns is None:
        rows = body.get("batches") or []
        if len(rows) < 2:
            return None
        h = len(rows) // 2
        return {**body, "batches": rows[:h]}, {**body, "batches": rows[h:]}
    known = {"seq_i64", "t_f64", "loss_f64", "sizes_i64", "losses_f32", "indices_i64"}
    lists = {"n", "epoch", "step", "phase"}
    if set(columns) - known - lists:
        return None

    def values(name: str, code: str) -> array[Any]:
        a = array(code)
        a.frombytes(binascii.a2b_base64(columns[name]))
        return a

    seqs = values("seq_i64", "q")
    if len(seqs) < 2:
        return None
    h = len(seqs) // 2
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    for name, code in (("seq_i64", "q"), ("t_f64", "d"), ("loss_f64", "d"), ("sizes_i64", "q")):
        if columns.get(name) is not None:
            a = values(name, code)
            first[name], second[name] = _b64(a[:h].tobytes()), _b64(a[h:].tobytes())
    if columns.get("sizes_i64") is not None:  # the first half's share of the per-sample values
        cut = sum(max(0, n) for n in values("sizes_i64", "q")[:h])
        for name, width in (("losses_f32", 4), ("indices_i64", 8)):
            if columns.get(name) is not None:
                raw = binascii.a2b_base64(columns[name])
                first[name], second[name] = _b64(raw[: cut * width]), _b64(raw[cut * width :])
    for name in lists:
        if columns.get(name) is not None:
            first[name], second[name] = columns[name][:h], columns[name][h:]
    return {**body, "columns": first}, {**body, "columns": second}


@contextlib.contextmanager
def _locked(path: Path, mode: str, buffering: int = -1) -> Iterator[Any]:
    with open(path, mode, buffering=buffering, opener=private_file) as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _lock(fd: int) -> Iterator[None]:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not deleted, not replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked_for_append(path: Path) -> Iterator[Any]:
    """Open ``path`` for appending under its lock, never to a file a replay just deleted.

    A replay deletes the file while it holds the lock; an append that opened the file
    before that and then waited for the lock would write into the deleted inode (and its
    lines would be gone). So after locking, check that the path still names the open file.
    """
    while True:
        # read and append: the last byte says whether the last line is whole
        with _locked(path, "a+b", buffering=0) as f:
            if _names(path, f.fileno()):
                yield f
                return


#: How many times this process's replays deleted each spool file (by path): an append
#: counts its batches from the file's last deletion on (``Spool.pending``).
_deletions: dict[Path, int] = {}


def _batches_in(op: str, body: str | bytes) -> int:
    """How many batches a batches operation's body (JSON text) carries; 0 for the others."""
    if op != "batches":
        return 0
    raw = body.encode() if isinstance(body, str) else body
    key = b'"seq_i64":"'
    at = raw.find(key)
    if at >= 0:  # packed columns: 8 bytes a batch, base64 (4 characters for 3 bytes)
        start = at + len(key)
        text = raw[start : raw.find(b'"', start)]
        return (len(text) * 3 // 4 - text.count(b"=")) // 8
    try:
        return len(json.loads(raw).get("batches") or ())
    except (ValueError, AttributeError):
        return 0


class Spool:
    """The spool file of one run."""

    def __init__(self, spool_dir: Path, run_id: str) -> None:
        self.path = spool_dir / f"{run_id}.jsonl"
        self.run_id = run_id
        # the batches this object appended since the file was last deleted (by a replay:
        # those before it are stored), and which file they went to: (inode, deletions then)
        self._pending = 0
        self._file: tuple[int, int] | None = None

    @property
    def pending(self) -> int:
        """Batches this object appended that the file still holds: those appended since
        this process's replay last deleted it (a file another process deleted, or replaced,
        holds none of them)."""
        if self._file is None:
            return 0
        try:
            ino = self.path.stat().st_ino
        except FileNotFoundError:
            return 0
        return self._pending if self._file == (ino, _deletions.get(self.path, 0)) else 0

    def append(self, op: str, body: dict[str, Any] | str | bytes) -> None:
        """Append one operation durably (``body`` as a dict or as its JSON text, str or
        UTF-8 bytes).

        Raises OSError (disk full, read-only) to the caller.
        """
        text = json.dumps(body) if isinstance(body, dict) else body
        self.append_lines([(op, text)])

    def append_lines(self, ops: list[tuple[str, str | bytes]]) -> None:
        """Append operations (op, body JSON text) with one write and one fsync."""
        if not ops:
            return
        private_dir(self.path.parent)
        head = '{"v": %d, "op": "%s", "run_id": "%s", "body": '
        data = b"".join(
            (head % (VERSION, op, self.run_id)).encode()
            + (text.encode() if isinstance(text, str) else text)
            + b"}\n"
            for op, text in ops
        )
        with _locked_for_append(self.path) as f:
            fd = f.fileno()
            start = os.lseek(fd, 0, os.SEEK_END)
            file = (os.fstat(fd).st_ino, _deletions.get(self.path, 0))
            if start and os.pread(fd, 1, start - 1) != b"\n":
                # a torn last line (killed mid-write): end it, or the first line written
                # now would continue it, and the replay would skip both as one torn line
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # a half-written line must not be replayed: cut the file back to before it
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
            if file != self._file:  # a new file: what went to the old one is not in it
                self._file, self._pending = file, 0
            self._pending += sum(_batches_in(op, text) for op, text in ops)

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0


def _operation(line: bytes) -> tuple[str, str, str] | str:
    """A spool line as (operation, run id, body as JSON text), or why it cannot be sent."""
    try:
        op = json.loads(line.decode())
    except UnicodeDecodeError as exc:  # bytes a crash or a power loss left
        return f"not UTF-8 text ({exc})"
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(op, dict):
        return "not an operation"
    if op.get("v") != VERSION:
        return f"spool version {op.get('v')!r}"
    kind, run_id, body = op.get("op"), op.get("run_id"), op.get("body")
    if kind not in OPERATIONS:
        return f"unknown operation {kind!r}"
    if not isinstance(run_id, str) or not isinstance(body, dict):
        return "no run id or body"
    try:
        return kind, run_id, json.dumps(body, allow_nan=False)
    except ValueError:
        return "a number JSON cannot carry (NaN or infinite)"


def _send(client: Client, run_id: str, kind: str, body: str, aside: list[bytes]) -> None:
    """Post one operation as a replay; a batches body over the daemon's body limit (413) in
    halves, recursively. A single batch over the limit is added to ``aside`` as a line of
    its own (it cannot be sent to that daemon at all)."""
    try:
        client.post_json(run_id, kind, body, headers=REPLAY_HEADERS)
    except H3HTTPStatusError as exc:
        if already_done(kind, exc.code):
            return
        if exc.status_code != 413 or kind != "batches":
            raise
        halves = split_batches(json.loads(body))
        if halves is None:
            logger.warning(
                "spool: a batch of run %s is over the daemon's body limit (%s): kept aside",
                run_id,
                exc,
            )
            line = '{"v": %d, "op": "batches", "run_id": "%s", "body": %s}\n'
            aside.append((line % (VERSION, run_id, body)).encode())
            return
        for half in halves:
            _send(client, run_id, kind, json.dumps(half), aside)


def replay_file(client: Client, path: Path) -> tuple[int, int]:
    """Replay one spool file; returns (operations applied, lines skipped).

    Stops at the first operation the daemon does not acknowledge (raising its error), and
    keeps the file; deletes it once everything it could send was acknowledged. A line it
    cannot send (torn by a crash, bytes that are not UTF-8, written by a newer h3client, not
    an operation at all, a single batch over the daemon's body limit) is skipped with a
    warning and kept, with the others like it, in ``<file>.skipped`` (which no replay
    reads): nothing is deleted that was not stored. The file's lock is held while a line is
    read, never while it is sent (see the module's docstring). Raises FileNotFoundError if
    another process replayed the file meanwhile.
    """
    applied = 0
    skipped: list[bytes] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        n = 0
        while True:
            with _lock(fd):
                line = f.readline()
                if not line:  # the end, under the lock: nothing can be appended meanwhile
                    if not _names(path, fd):
                        raise FileNotFoundError(path)  # replayed (and deleted) by another
                    if skipped:
                        _keep_aside(path, skipped)
                    path.unlink()
                    _deletions[path] = _deletions.get(path, 0) + 1
                    return applied, len(skipped)
            n += 1
            if not line.strip():
                continue
            op = _operation(line)
            if isinstance(op, str):
                logger.warning("spool %s line %d not sent (%s): skipped", path.name, n, op)
                skipped.append(line if line.endswith(b"\n") else line + b"\n")
                continue
            kind, run_id, body = op
            _send(client, run_id, kind, body, skipped)
            applied += 1


def _keep_aside(path: Path, lines: list[bytes]) -> None:
    side = path.with_name(path.name + ".skipped")
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.writelines(lines)
        out.flush()
        os.fsync(out.fileno())
    logger.warning("spool %s: %d line(s) not sent are kept in %s", path.name, len(lines), side)


def replay_spool(client: Client, spool_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """Replay every spool file in ``spool_dir`` (or only ``run_id``'s), oldest first.

    Returns counts; files that could not be fully replayed (daemon down, an error) stay.
    """
    found = list(spool_dir.glob("*.jsonl")) if spool_dir.exists() else []
    if run_id is not None:  # before any stat: another run's file may vanish meanwhile
        found = [p for p in found if p.stem == run_id]
    dated: list[tuple[float, str, Path]] = []
    for p in found:
        try:
            dated.append((p.stat().st_mtime, p.name, p))
        except FileNotFoundError:
            continue  # another process replayed (and deleted) it meanwhile
    files = [p for _t, _n, p in sorted(dated)]
    done = {"files": 0, "operations": 0, "skipped_lines": 0, "failed": []}  # type: dict[str, Any]
    for path in files:
        try:
            applied, skipped = replay_file(client, path)
        except H3ConnectionError:
            done["failed"].append(path.stem)
            break  # the daemon is down: nothing else will go through either
        except H3HTTPStatusError as exc:
            logger.warning("spool %s not replayed: %s", path.name, exc)
            done["failed"].append(path.stem)
            continue
        except FileNotFoundError:
            continue  # another process replayed it meanwhile
        done["files"] += 1
        done["operations"] += applied
        done["skipped_lines"] += skipped
    return done
