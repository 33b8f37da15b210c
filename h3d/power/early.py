"""Power readings from a daemon's first moments, before it can serve.

``h3d serve`` spends most of its start importing its web and database stacks (0.5 to 1.3 s
by host, below which no daemon on those libraries answers). A training script that
autostarted the daemon need not wait for all of it: what its run needs first is readings,
so that its energy is measured from its first step. So ``serve`` builds its power backends
right after taking its data dir's lock, reads them on this thread every sampling period,
and writes ``<data dir>/sampling.json`` (its pid) after the first round. The autostarting
profiler waits for that file, not for ``/healthz``; its run begins after it, and its
batches wait in memory until the daemon serves. The sampler takes the readings over before
its first tick (:meth:`h3d.power.sampler.PowerSampler.adopt`), so they are stored and
integrated as its own, and so are the machine's busy CPU readings taken with them (a run
that began meanwhile gets its CPU share from its start); none of them counts towards the
idle baseline (the script that started the daemon is running meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from h3d.attribution import CpuShareTracker, busy_cpu_s
from h3d.datadir import SAMPLING_NAME, remove_pid_file, write_pid_file
from h3d.power.base import PowerBackend, PowerReading

logger = logging.getLogger(__name__)


#: Readings kept (the oldest go first): a start that stalls for minutes (a store that does
#: not answer) keeps the last of them; the sampler's gap rule handles the rest.
KEPT = 20_000

#: (device index, monotonic time of the read's middle, the reading)
EarlyReading = tuple[int, float, PowerReading]


class EarlyReadings:
    """Reads ``backends`` every ``interval_s`` on a thread of its own until
    :meth:`handover`; writes ``<data_dir>/sampling.json`` after the first round."""

    def __init__(
        self,
        backends: list[PowerBackend],
        data_dir: Path,
        interval_s: float,
        *,
        said: list[logging.LogRecord] | None = None,
    ) -> None:
        self.backends = backends
        self.said = said or []  # what building the backends logged, held (see held_logs)
        self.marker = data_dir / SAMPLING_NAME
        self.interval_s = interval_s
        self._readings: deque[EarlyReading] = deque(maxlen=KEPT)
        # the machine's busy CPU seconds at each round (monotonic time, seconds): a run
        # that began meanwhile gets its CPU share from its start (CpuShareTracker.track)
        self.busy: deque[tuple[float, float]] = deque(maxlen=CpuShareTracker.HISTORY)
        self._stop = threading.Event()
        self._handed_over = False
        self._thread = threading.Thread(target=self._run, name="h3d-early-power", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # (the sampler says why, if it persists)
                self.busy.append((time.monotonic(), busy_cpu_s()))
            for i, backend in enumerate(self.backends):
                before = time.monotonic()
                try:
                    reading = backend.read()
                except Exception:  # the sampler marks a failing device, with its reason
                    continue
                self._readings.append((i, 0.5 * (before + time.monotonic()), reading))
            if first:
                self._write_marker()
                first = False
            self._stop.wait(self.interval_s)

    def _write_marker(self) -> None:
        try:
            write_pid_file(self.marker, {"t": time.time()})
        except OSError as exc:
            # a full disk: the profiler waits for /healthz instead, and the start says what
            # is wrong in its one line if it cannot go on (the store on that disk)
            logger.debug("cannot write %s: %s", self.marker, exc)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def handover(self) -> list[EarlyReading]:
        """Stop reading; the readings so far, oldest first (and :attr:`busy`'s). The
        backends are the caller's from here (the sampler reads and closes them); what
        building them logged is logged now."""
        self._halt()
        self._handed_over = True
        for record in self.said:
            logging.getLogger(record.name).handle(record)
        self.said = []
        return list(self._readings)

    def stop(self) -> None:
        """The daemon stops (or never started): no more readings, no marker, and the
        backends closed unless a sampler took them over. Idempotent."""
        self._halt()
        remove_pid_file(self.marker)
        if not self._handed_over:
            self._handed_over = True
            for backend in self.backends:
                with contextlib.suppress(Exception):  # closing must not fail a stop
                    backend.close()


class _Held(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs(name: str) -> Iterator[list[logging.LogRecord]]:
    """What logger ``name`` and its children log inside the block, held in the list
    yielded instead of written (``logging.getLogger(r.name).handle(r)`` writes one later)."""
    records: list[logging.LogRecord] = []
    log = logging.getLogger(name)
    handler, propagate = _Held(records), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
