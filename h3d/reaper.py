"""Runs whose training process is gone are marked failed.

A training process killed by SIGKILL or the OOM killer never sends its "finished": without
this its run stays "running" forever, keeps its power samples at full resolution and stays
in /metrics. Two rules:

- a run whose local process this daemon followed has exited, and nothing arrived for the
  run for ``grace_s``: failed (the grace covers a client that flushes after its main
  process ended, e.g. a spool replay);
- any other running run (remote, or local and not followable) with no request for
  ``timeout_s``: failed. Its "heartbeat" is the daemon's own clock at the run's last request
  (create, ingest, update), so clock skew between hosts does not matter.

A reaped run gets ``finished_at`` = its last activity, and takes no more data (409), like a
run its client finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from h3d.errors import RunFinished, RunNotFound
from h3d.power.sampler import PowerSampler
from h3d.storage import repository as repo
from h3d.storage.engine import Store

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.store = store
        self.sampler = sampler
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self, run_id: str) -> None:
        """A request for ``run_id`` arrived (its heartbeat)."""
        with self._lock:
            self._seen[run_id] = self._clock()

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
            except Exception:  # housekeeping must never die; it tries again
                logger.exception("reaping stale runs failed")

    def reap(self) -> list[str]:
        """Mark failed every run the rules above find; returns their ids."""
        now = self._clock()
        exited = set(self.sampler.exited_runs())
        doomed: dict[str, float] = {}
        with self.store.read() as s:
            running = [r.id for r in repo.running_runs(s)]
        with self._lock:
            for rid in running:
                last = self._seen.setdefault(rid, now)  # first look: the clock starts now
                limit = self.grace_s if rid in exited else self.timeout_s
                if now - last >= limit:
                    doomed[rid] = last
            for rid in set(self._seen) - set(running):
                del self._seen[rid]
        for rid, last in doomed.items():

            def fail(s: Session, rid: str = rid, last: float = last) -> None:
                repo.update_run(s, run_id=rid, status="failed", name=None, tags=None, now=last)

            try:
                self.store.write(fail)
            except (RunFinished, RunNotFound):  # finished meanwhile
                continue
            self.sampler.run_ended(rid)
            with self._lock:
                self._seen.pop(rid, None)
            why = "its process exited" if rid in exited else f"no request for {self.timeout_s:g} s"
            logger.warning("run %s marked failed: %s", rid, why)
        return list(doomed)
