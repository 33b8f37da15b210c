"""Runs whose training process is gone are marked failed.

A training process killed by SIGKILL or the OOM killer never sends its "finished": without
this its run stays "running" forever, keeps its power samples at full resolution and stays
in /metrics. Three rules:

- a run whose local process this daemon followed has exited, and nothing arrived for the
  run for ``grace_s``: failed (the grace covers a client that flushes after its main
  process ended, e.g. a spool replay);
- a rank of a distributed run whose local process this daemon followed has exited
  without its rank's status (torchrun's SIGTERM after another rank failed, SIGKILL), and
  nothing arrived here for the run for ``grace_s`` since: that rank failed, and the run
  with it once no rank runs (the run ends with its last rank, as ever);
- a distributed run whose every joined rank has ended (finished or failed), and nothing
  arrived for it for ``grace_s``: failed. It waits only for ranks that never joined (a job
  that made a profiler on rank 0 alone): they never will (a rank's spool, replayed later,
  still fills it, as below);
- any other running run (remote, or local and not followable) with no request for
  ``timeout_s`` to any daemon of the store: failed. Its "heartbeat" is the serving daemon's
  own clock at the run's last request (create, ingest, update), so the clocks of the hosts
  that train do not matter. A local run whose followed process still runs has a heartbeat
  every pass, however quiet it is (a long data preparation before its first batch, an
  evaluation longer than ``timeout_s``): it is never timed out.

Several daemons can share one store (a cluster's nodes on one PostgreSQL database), and each
sees every running run, including those only another node serves, or whose ranks on this node
are done. So each reaper writes the heartbeats of the runs it served to the store
(``runs.seen_at``, once per pass, one statement), and times every run from the latest
heartbeat of any daemon, or from when it first saw the run, whichever is later. The daemons'
clocks are compared with each other there, so they should agree to well within
``timeout_s`` (NTP does).

A reaped run gets ``finished_at`` = its last activity, and takes no more data (409), like a
run its client finished, with two exceptions, for what its client did send but the daemon
did not get (an outage near the run's end sends it to the client's spool):

- a replay of the run's spool (``h3d import``, or a profiler's replay: requests with the
  header ``H3-Replay: 1``) is taken, rows and final status alike (:func:`replaying`): the
  rows the daemon lacks are stored, once each (the store keeps a (run, seq) once, as
  ever), the run staying failed, its end moved to its last batch; a replayed final status
  ends it as its client ended it, and from then on it is a run its client ended;
- a resumed profiler's create (``H3-Resume: 1``) reopens it, and the daemon follows the
  new process (:func:`resumed_run`).

A run its client ended (finished or failed) is never reopened. Which runs the reaper failed
is kept in the row: their ``seen_at`` is ``REAPED`` (+inf), which no heartbeat changes
(heartbeats only move it forward), so no new column (and no migration) is needed.

Each pass also renews this daemon's lease on its node name (:class:`NodeLease`): one live
daemon per node name in a store; and reads the store's revision: a store that another h3d
migrated under this running daemon (one node of a cluster upgraded first) is named in one
line, once, instead of only failing requests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import delete, select, text
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session

from h3d.errors import (
    InvalidInput,
    NodeTaken,
    RunExists,
    RunFinished,
    RunNotFound,
    StorageUnavailable,
)
from h3d.power.sampler import PowerSampler
from h3d.storage import repository as repo
from h3d.storage.engine import Store
from h3d.storage.migrate import HEAD_REVISION
from h3d.storage.models import Run, RunIdle

logger = logging.getLogger(__name__)

#: ``runs.seen_at`` of a run the reaper failed (see the module's docstring).
REAPED = math.inf
#: The request headers of a spool's replay and of a resumed profiler's create.
REPLAY_HEADER, RESUME_HEADER = "h3-replay", "h3-resume"
#: Where Linux shows processes (absent on macOS and Windows: psutil tells there).
_PROC = Path("/proc")


def is_reaped(run: Run) -> bool:
    """Whether the reaper failed ``run`` (and no replay of its client ended it since)."""
    return run.status == "failed" and run.seen_at == REAPED


@contextlib.contextmanager
def replaying(session: Session, run_id: str, *, replay: bool, now: float) -> Iterator[bool]:
    """Around a replayed ingest or status update (``replay``): let it into the run if the
    reaper failed it; yields whether it did.

    The run is running for the request's statements only, inside its transaction (its row
    locked on PostgreSQL; SQLite has one writer), so nobody sees it reopened. Afterwards it
    is failed again, as the reaper left it, its end moved to its last batch if that is
    later; or, if the request ended it (the client's final status, replayed; not a rank's
    of a distributed run, whose other ranks' spools may follow), it ends as its client
    ended it, a run its client ended from then on."""
    row = None
    if replay:  # a column read (as the ingest's own): no ORM object left behind, stale
        q = select(Run.status, Run.seen_at).where(Run.id == run_id).with_for_update()
        row = session.execute(q).one_or_none()
    if row is None or not (row.status == "failed" and row.seen_at == REAPED):
        yield False
        return
    run = session.get(Run, run_id, populate_existing=True)
    assert run is not None
    end = run.finished_at
    run.status = "running"
    session.flush()
    yield True
    session.refresh(run)
    if run.status != "running" and run.world_size is None:
        run.seen_at = now  # its client's final status, replayed: a run its client ended now
    else:  # rows, or one rank's end: failed as the reaper left it (its ranks' spools to come)
        run.status = "failed"
        run.finished_at = max(x for x in (end, run.last_t, run.created_at) if x is not None)
    session.flush()


def resumed_run(
    session: Session, run_id: str, *, pid: int | None, host: str | None, now: float
) -> Run | None:
    """The run a resumed profiler continues (``H3-Resume``), reopened if the reaper failed
    it; None if there is none (the create makes it). A run its client ended is a 409
    ``run_exists``, as any create of an id that exists.

    The run's process is the new one (``pid`` on ``host``) in the row too, not only in this
    daemon's sampler: a restarted daemon takes the store's running runs up by their stored
    pid, and with the old, dead one it gave the live run no share and failed it after the
    exit grace."""
    run = session.get(Run, run_id, with_for_update=True, populate_existing=True)
    if run is None:
        return None
    if is_reaped(run):
        run.status, run.finished_at, run.seen_at = "running", None, now
        # the baselines kept at its end: it has not ended (it keeps new ones when it does)
        session.execute(delete(RunIdle).where(RunIdle.run_id == run_id))
        logger.info("run %s resumed by a new process: running again", run_id)
    elif run.status != "running":
        raise RunExists(
            f"a run with id {run_id} exists and is {run.status}", details={"run_id": run_id}
        )
    else:  # its heartbeat: the reaper times it from this request, not from the last one
        run.seen_at = now if run.seen_at is None else max(run.seen_at, now)
    run.pid, run.host = pid, host
    session.flush()
    return run


def _started(pid: int | str) -> str | None:
    """When process ``pid`` started, or None if there is no such process: in clock ticks
    since boot from /proc (Linux), else psutil's create time (macOS, Windows)."""
    if not _PROC.is_dir():
        try:
            return repr(psutil.Process(os.getpid() if pid == "self" else int(pid)).create_time())
        except psutil.Error:
            return None
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before may hold spaces


def proc_identity() -> str | None:
    """This process as "boot id/pid namespace/start time" (Linux), "boot time/-/create
    time" where there is no /proc (psutil: no pid namespaces there), or None if unreadable.
    """
    try:
        if _PROC.is_dir():
            boot = (_PROC / "sys/kernel/random/boot_id").read_text().strip()
            ns = str(os.stat(_PROC / "self/ns/pid").st_ino)
        else:
            boot, ns = f"{psutil.boot_time():.0f}", "-"
    except (OSError, psutil.Error):
        return None
    started = _started("self")
    return None if started is None else f"{boot}/{ns}/{started}"


def _holder_alive(proc: str | None, pid: int, mine: str | None) -> bool | None:
    """Whether the holder (``proc``, ``pid``) still runs, where this process can tell: in
    its own pid namespace (if any) since the same boot. None: it cannot (another host,
    container or boot); only the holder's renewals tell then."""
    if proc is None or mine is None or proc.rsplit("/", 1)[0] != mine.rsplit("/", 1)[0]:
        return None
    return _started(pid) == proc.rsplit("/", 1)[1]


class NodeLease:
    """This daemon's claim on its node name in the store.

    Devices are keyed by (node, name): two live daemons sampling as one node would write one
    device's samples twice over and split every run's share of it. ``claim()`` at start
    raises NodeTaken while another live daemon holds the name; ``renew()`` (each reaper
    pass) keeps it; ``release()`` at stop frees it. A daemon takes the name at once from a
    holder it can see has exited (same boot and pid namespace, or same boot where there is
    no /proc; its process gone, or its pid another process's); from any other (another
    host, another container) it waits: a holder that renews is alive (refused), and a lease
    not renewed for ``lease_s`` has lapsed (taken).
    """

    def __init__(
        self,
        store: Store,
        node: str,
        *,
        lease_s: float,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        pid: int | None = None,
        proc: str | None = "self",
    ) -> None:
        self.store, self.node, self.lease_s, self._clock = store, node, lease_s, clock
        self.host = host if host is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.proc = proc_identity() if proc == "self" else proc
        self.started_at = clock()
        self._lost = False

    def _who(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
        }

    def claim(self, *, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take the node, waiting while its holder can neither be seen exited nor has
        renewed (at most until its lease lapses); NodeTaken if the holder is alive."""
        first: float | None = None
        waited = False
        while True:
            held = self.store.write(lambda s: repo.node_lease(s, self.node))
            now = self._clock()
            mine = (self.host, self.pid, self.started_at, self.proc)
            if held is not None and (held[0], held[1], held[2], held[4]) != mine:
                host, pid, _, seen_at, proc = held
                age = max(0.0, now - seen_at)
                alive = _holder_alive(proc, pid, self.proc)
                renewed = first is not None and seen_at > first
                if alive or renewed:
                    raise NodeTaken(
                        f"another h3d samples as node {self.node!r} in this store (pid {pid} "
                        f"on {host}, renewed {age:.0f} s ago): two daemons with one node name "
                        "would split every run's energy between them. Give this one its own "
                        "name (--node or H3D_NODE)",
                        details={"node": self.node, "host": host, "pid": pid},
                    )
                if alive is None and age < self.lease_s:  # alive only if it renews
                    first = seen_at if first is None else first
                    if not waited:
                        waited = True
                        logger.warning(
                            "node %r is held by pid %d on %s, renewed %.0f s ago, which this "
                            "host cannot see: waiting up to %.0f s for it to renew (then this "
                            "daemon is refused) or to lapse",
                            self.node,
                            pid,
                            host,
                            age,
                            self.lease_s - age,
                        )
                    sleep(min(0.5, self.lease_s - age))
                    continue
            expect = None if held is None else held[3]
            try:
                taken = self.store.write(
                    functools.partial(
                        repo.take_node,
                        **self._who(),
                        proc=self.proc,
                        now=now,
                        expect_seen_at=expect,
                    )
                )
            except IntegrityError:  # another daemon inserted it at the same moment
                taken = False
            if taken:
                return

    def renew(self) -> None:
        held = self.store.write(lambda s: repo.renew_node(s, **self._who(), now=self._clock()))
        if not held and not self._lost:
            self._lost = True
            logger.error(
                "this daemon's lease on node %r lapsed and another h3d took it: two daemons "
                "now sample as one node; stop one of them",
                self.node,
            )

    def release(self) -> None:
        self.store.write(lambda s: repo.release_node(s, **self._who()))


class Reaper:
    def __init__(
        self,
        store: Store,
        sampler: PowerSampler,
        *,
        grace_s: float = 30.0,
        timeout_s: float = 3600.0,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        lease: NodeLease | None = None,
    ) -> None:
        self.store = store
        self.lease = lease
        self.sampler = sampler
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._unwritten: dict[str, float] = {}  # heartbeats not yet on the store
        # (run, rank) of local rank processes seen exited: when this daemon first saw it
        self._rank_exited: dict[tuple[str, int], float] = {}
        self._revision = HEAD_REVISION  # the store's, as last read (named once when it moves)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self, run_id: str) -> None:
        """A request for ``run_id`` arrived (its heartbeat)."""
        with self._lock:
            self._seen[run_id] = self._unwritten[run_id] = self._clock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="h3d-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.reap()
            except StorageUnavailable as exc:  # the store is down: one line; it tries again
                logger.warning("reaping stale runs failed: %s", exc)
            except Exception:  # housekeeping must never die; it tries again
                logger.exception("reaping stale runs failed")

    def check_revision(self) -> str:
        """The store's revision; named in one ERROR line when it is no longer the one this
        h3d runs (another h3d migrated the store under it), once per revision."""
        with self.store.read() as s:
            rev = s.execute(text("SELECT version_num FROM alembic_version")).scalar()
        rev = rev or "none"
        if rev != self._revision:
            self._revision = rev
            if rev == HEAD_REVISION:
                logger.warning("the store is at %s again, this h3d's revision", rev)
            else:
                logger.error(
                    "the store is now at revision %s, but this daemon's h3d runs %s: another "
                    "h3d migrated it while this daemon runs, and its requests may fail. Stop "
                    "this daemon and start it with the h3d that migrated the store "
                    "(docs/cluster.md, Upgrading)",
                    rev,
                    HEAD_REVISION,
                )
        return rev

    def reap(self) -> list[str]:
        """Mark failed every run the rules above find; returns their ids."""
        if self.lease is not None:
            self.lease.renew()
        # down: the reads below name it; no alembic_version: not a store h3d made (tests)
        with contextlib.suppress(StorageUnavailable, DatabaseError):
            self.check_revision()
        # a local process this daemon follows and that still runs is its run's heartbeat:
        # a quiet hour (data loading, a long evaluation) does not fail a live run; written
        # to the store with the others, so no other daemon of a shared store fails it either
        followed = self.sampler.followed()
        for rid in followed.live:
            self.seen(rid)
        with self._lock:
            beats, self._unwritten = self._unwritten, {}
        if beats:
            try:
                self.store.write(lambda s: repo.write_heartbeats(s, beats))
            except Exception:
                with self._lock:  # the next pass writes them (or later ones)
                    self._unwritten = {**beats, **self._unwritten}
                raise
        now = self._clock()
        exited = set(followed.exited_runs)
        doomed: dict[str, float] = {}
        with self.store.read() as s:
            running = repo.running_heartbeats(s)
            ranks_done = repo.ranks_all_ended(s) if running else set()
        with self._lock:
            for rid, stored in running.items():
                last = self._seen.setdefault(rid, now)  # first look: the clock starts now
                if stored is not None and stored > last:
                    last = stored  # another daemon served it since
                short = rid in exited or rid in ranks_done
                limit = self.grace_s if short else self.timeout_s
                if now - last >= limit:
                    # it ended at its last activity on the store, not at this daemon's first
                    # look (a restarted daemon's start: a 5 s run read 30 s, and its energy)
                    doomed[rid] = stored if stored is not None else last
            for rid in set(self._seen) - running.keys():
                del self._seen[rid]
        spared: set[str] = set()
        for rid, last in doomed.items():

            def fail(s: Session, rid: str = rid, last: float = last) -> bool:
                seen = s.execute(select(Run.seen_at).where(Run.id == rid)).scalar()
                if seen is not None and seen > last:  # a request came meanwhile (a resumed
                    return False  # process's create, another daemon's heartbeat)
                run = repo.update_run(
                    s, run_id=rid, status="failed", name=None, tags=None, now=last
                )
                run.seen_at = REAPED  # failed by the reaper, not by its client
                return True

            try:
                if not self.store.write(fail):
                    spared.add(rid)
                    continue
            except (RunFinished, RunNotFound):  # finished meanwhile
                continue
            self.sampler.run_ended(rid)
            with self._lock:
                self._seen.pop(rid, None)
            if rid in exited:
                why = "its process exited"
            elif rid in ranks_done:
                why = "every rank that joined it ended; the others never joined"
            else:
                why = f"no request for {self.timeout_s:g} s"
            logger.warning("run %s marked failed: %s", rid, why)
        failed = [rid for rid in doomed if rid not in spared]
        return failed + self._reap_ranks(running, now, followed.exited_ranks)

    def _reap_ranks(
        self, running: dict[str, float | None], now: float, exited: list[tuple[str, int]]
    ) -> list[str]:
        """Fail each local rank in ``exited`` (its process exited) ``grace_s`` ago with
        nothing for its run arriving here since; returns the runs that ended with it
        (failed)."""
        doomed: dict[tuple[str, int], float] = {}
        with self._lock:
            for key in exited:
                self._rank_exited.setdefault(key, now)
            for key in set(self._rank_exited) - set(exited):
                del self._rank_exited[key]
            for (rid, rank), since in self._rank_exited.items():
                last = max(since, self._seen.get(rid, since))  # the run's requests here
                gone = rid not in running and since < now  # it ended (seen on a past pass)
                if gone or now - last >= self.grace_s:
                    doomed[(rid, rank)] = last
        ended: list[str] = []
        for (rid, rank), last in doomed.items():

            def fail(s: Session, rid: str = rid, rank: int = rank, last: float = last) -> bool:
                run = repo.update_run(
                    s, run_id=rid, status="failed", name=None, tags=None, now=last, rank=rank
                )
                if run.status == "running":
                    return False
                run.seen_at = REAPED  # failed by the reaper, not by its client
                return True

            run_ended = False
            if rid in running:
                try:
                    run_ended = self.store.write(fail)
                except (RunFinished, RunNotFound, InvalidInput):
                    pass  # the rank or the run ended meanwhile (its status came after all)
                else:
                    logger.warning("rank %d of run %s marked failed: its process exited", rank, rid)
            with self._lock:
                self._rank_exited.pop((rid, rank), None)
                if run_ended:
                    self._seen.pop(rid, None)
            self.sampler.run_ended(rid, None if run_ended else rank)
            if run_ended:
                ended.append(rid)
                logger.warning("run %s marked failed: its last running rank's process exited", rid)
        return ended
