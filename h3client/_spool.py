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
(a batch seq or an epoch already stored is acknowledged; a create or status update refused
because the run exists or finished counts as done, see :func:`already_done`), so
replaying a file twice, or a file that was half replayed before a crash, stores everything
exactly once. Batches or epochs refused because their run was closed (``409 run_finished``:
a run whose process was gone, which the daemon marked failed) were never stored: the replay
stops there and keeps the file, as ``h3d import`` does. A file is
deleted only after every line in it was acknowledged, or kept aside: a line that cannot be
sent goes to ``<run id>.jsonl.skipped``. ``h3d import`` replays the same files.
Appends and replays take an exclusive ``flock`` on the file, so two processes never
interleave lines or replay one file at once.
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
from h3client.client import OPERATIONS, Client
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
    replay): a run that exists or finished, to a create (a rank joining included) or a status
    update. Never for batches or epochs: the daemon acknowledges rows it holds (200), so a
    409 run_finished there means rows that were never stored. The sender and the spool's
    replay both decide by this."""
    return op in ("create", "update") and code in _ALREADY


def batch_seqs(body: dict[str, Any]) -> list[int]:
    """The sequence numbers in a batches body, in either form."""
    columns = body.get("columns")
    if columns is not None:
        seqs = array("q")
        seqs.frombytes(binascii.a2b_base64(columns["seq_i64"]))
        return seqs.tolist()
    return [int(b["seq"]) for b in body.get("batches", ())]


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
def _locked_for_append(path: Path) -> Iterator[Any]:
    """Open ``path`` for appending under its lock, never to a file a replay just deleted.

    A replay deletes the file while it holds the lock; an append that opened the file
    before that and then waited for the lock would write into the deleted inode (and its
    lines would be gone). So after locking, check that the path still names the open file.
    """
    while True:
        with _locked(path, "ab", buffering=0) as f:
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield f
                return


class Spool:
    """The spool file of one run."""

    def __init__(self, spool_dir: Path, run_id: str) -> None:
        self.path = spool_dir / f"{run_id}.jsonl"
        self.run_id = run_id

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

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0


def _operation(line: str) -> tuple[str, str, str] | str:
    """A spool line as (operation, run id, body as JSON text), or why it cannot be sent."""
    try:
        op = json.loads(line)
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


def replay_file(client: Client, path: Path) -> tuple[int, int]:
    """Replay one spool file; returns (operations applied, lines skipped).

    Stops at the first operation the daemon does not acknowledge (raising its error), and
    keeps the file; deletes it once everything it could send was acknowledged. A line it
    cannot send (torn by a crash, written by a newer h3client, or not an operation at all)
    is skipped with a warning and kept, with the others like it, in ``<file>.skipped``
    (which no replay reads): nothing is deleted that was not stored.
    """
    applied = 0
    skipped: list[str] = []
    with _locked(path, "r+") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            op = _operation(line)
            if isinstance(op, str):
                logger.warning("spool %s line %d not sent (%s): skipped", path.name, n, op)
                skipped.append(line if line.endswith("\n") else line + "\n")
                continue
            kind, run_id, body = op
            try:
                client.post_json(run_id, kind, body)
            except H3HTTPStatusError as exc:
                if not already_done(kind, exc.code):
                    raise
            applied += 1
        if skipped:
            side = path.with_name(path.name + ".skipped")
            fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "w") as out:
                out.writelines(skipped)
                out.flush()
                os.fsync(out.fileno())
            logger.warning(
                "spool %s: %d line(s) not sent are kept in %s", path.name, len(skipped), side
            )
        path.unlink()
    return applied, len(skipped)


def replay_spool(client: Client, spool_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """Replay every spool file in ``spool_dir`` (or only ``run_id``'s), oldest first.

    Returns counts; files that could not be fully replayed (daemon down, an error) stay.
    """
    files = (
        sorted(spool_dir.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        if spool_dir.exists()
        else []
    )
    if run_id is not None:
        files = [p for p in files if p.stem == run_id]
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
