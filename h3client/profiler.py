"""``H3Profiler``: wrap any training loop; it streams losses to h3d without slowing the loop."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from h3client._batching import BatchProcessor, off_device
from h3client._config import resolve
from h3client._daemon import ensure_daemon
from h3client._exporter import HttpExporter
from h3client._report import diminishing_returns, format_report
from h3client._spool import Spool, replay_spool
from h3client.client import Client
from h3client.errors import H3ClientError

logger = logging.getLogger(__name__)

_live: weakref.WeakSet[H3Profiler] = weakref.WeakSet()
_failed = False


def _excepthook(tp: type[BaseException], val: BaseException, tb: TracebackType | None) -> None:
    global _failed
    _failed = True
    _prev_excepthook(tp, val, tb)


_prev_excepthook = sys.excepthook


def _at_exit() -> None:
    for p in list(_live):
        p._finish_at_exit("failed" if _failed else "finished")


class H3Profiler:
    """Measure what a training run costs in joules and what it learns per joule.

    ``log_batch`` only appends to an in-memory queue (about a microsecond, no I/O, no
    device sync, never raises); a background thread batches, gzips and posts to the local
    ``h3d`` daemon, and spools to disk while the daemon is unreachable.

    Args:
        name: Run name (default: ``run-<id prefix>``).
        url: Daemon URL; default ``H3D_URL``, else the data dir's ``daemon.json``.
        token: Bearer token; default ``H3D_TOKEN``, else ``<data dir>/token``.
        device: Which devices the run uses, recorded in the run's config ("auto": all the
            daemon measures).
        config: Hyperparameters and anything else to store with the run.
        tags: Labels to filter runs by.
        autostart: Start a local daemon (same data dir, detached) if none answers. The run
            opens on construction either way; without a daemon it runs offline on its spool.
        run_id: Resume this run (its spool is replayed first, sequence numbers continue).
        data_dir: The daemon's data dir (default ``H3D_DATA_DIR`` or ``~/.local/share/h3d``).
        n_train: Training-set size, for ΔI_total.
        flush_interval_s: How often the sender posts (also when a batch is full).
        max_batch: Batches per request.
        max_queue: Queue length past which the sender spools to disk instead.
        eta_interval_s: How often ``live_eta`` is refreshed in the background.
        http: An ``httpx.Client`` to use (tests); default: one keep-alive connection.

    Example:
        >>> with H3Profiler("mnist-mlp", config={"lr": 1e-3}) as prof:  # doctest: +SKIP
        ...     for epoch in range(epochs):
        ...         for x, y in loader:
        ...             loss = criterion(model(x), y)
        ...             loss.backward(); opt.step(); opt.zero_grad()
        ...             prof.log_batch(loss)
        ...         prof.log_epoch(epoch, accuracy=evaluate(model))
        >>> prof.results["efficiency_bits_per_j"]  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        device: str = "auto",
        config: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        autostart: bool = True,
        run_id: str | None = None,
        data_dir: str | Path | None = None,
        n_train: int | None = None,
        flush_interval_s: float = 1.0,
        max_batch: int = 2000,
        max_queue: int = 100_000,
        eta_interval_s: float = 5.0,
        http: Any = None,
    ) -> None:
        self.name = name
        self._url, self._token, self._data_dir, self._http = url, token, data_dir, http
        self.device = device
        self.config = dict(config or {})
        self.tags = list(tags or [])
        self.autostart = autostart
        self.n_train = n_train
        self.run_id: str | None = run_id
        self._resume = run_id is not None
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eta_interval_s = eta_interval_s
        self._seq = 0
        self._epoch = 0
        self._proc: BatchProcessor | None = None
        self._exporter: HttpExporter | None = None
        self._client: Client | None = None
        self._eta: dict[str, Any] | None = None
        self._eta_at = 0.0
        self._eta_lock = threading.Lock()
        self._t_start: float | None = None
        self._stopped = False
        self._pid = os.getpid()
        self.results: dict[str, Any] | None = None
        self.log_errors = 0
        self.start()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> H3Profiler:
        """Open the run (idempotent). Never raises: without a daemon it runs offline."""
        if self._proc is not None:
            return self
        cfg = resolve(self._url, self._token, self._data_dir)
        url = ensure_daemon(cfg, autostart=self.autostart) if self._http is None else cfg.url
        if url is not None and url != cfg.url:
            cfg = resolve(url, self._token, self._data_dir)
        self._client = Client(cfg.url, cfg.token, data_dir=cfg.data_dir, http=self._http)
        online = url is not None
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex
        self._exporter = HttpExporter(self._client, self.run_id)
        if self._resume:
            self._seq = self._resume_seq(online)
        self._proc = BatchProcessor(
            self._exporter,
            max_batch=self.max_batch,
            flush_interval_s=self.flush_interval_s,
            max_queue=self.max_queue,
            on_tick=self._refresh_eta,
        )
        self._t_start = time.time()
        if not self._resume:
            config = {**self.config, "device": self.device}
            self._proc.add(
                "create",
                {
                    "id": self.run_id,
                    "created_at": self._t_start,
                    "name": self.name,
                    "config": config,
                    "tags": self.tags,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "n_train": self.n_train,
                },
            )
        if online:
            logger.info("h3: run %s streaming to %s", self.run_id, cfg.url)
        else:
            logger.warning(
                "h3: no daemon at %s; run %s is spooled to %s (replayed when one answers, or "
                "with `h3d import`)",
                cfg.url,
                self.run_id,
                cfg.spool_dir,
            )
            self._exporter._offline("no daemon answered at start")
        _live.add(self)
        if sys.excepthook is not _excepthook:
            global _prev_excepthook
            _prev_excepthook, sys.excepthook = sys.excepthook, _excepthook
        return self

    def _resume_seq(self, online: bool) -> int:
        """Continue after the highest sequence number stored or spooled for the run."""
        assert self._client is not None and self.run_id is not None
        top = -1
        spool = Spool(self._client.config.spool_dir, self.run_id)
        if spool.exists():
            for line in spool.path.read_text().splitlines():
                try:
                    op = json.loads(line)
                except ValueError:
                    continue
                for b in op.get("body", {}).get("batches", ()):
                    top = max(top, int(b["seq"]))
            if online:
                replay_spool(self._client, self._client.config.spool_dir, self.run_id)
        if online:
            try:
                last = self._client.get_run(self.run_id).get("last_seq")
                if last is not None:
                    top = max(top, int(last))
            except H3ClientError as exc:
                logger.warning("h3: cannot resume run %s: %s", self.run_id, exc)
        return top + 1

    # --- the training loop's calls ---------------------------------------------------------

    def log_batch(
        self,
        loss: Any,
        *,
        losses: Any = None,
        indices: Any = None,
        n: int | None = None,
        epoch: int | None = None,
        step: int | None = None,
        phase: str | None = None,
    ) -> None:
        """Record one batch's mean loss (a float or a 0-dim tensor, in nats).

        Optionally its per-sample ``losses`` and their dataset ``indices`` (tensors or
        sequences). Costs about a microsecond; never raises, never blocks, never syncs a GPU.
        """
        proc = self._proc
        if proc is None or self._pid != os.getpid():
            return  # not started, or a forked child (DataLoader worker): inert
        try:
            if hasattr(loss, "detach"):
                loss = off_device(loss)
            if losses is not None and hasattr(losses, "detach"):
                losses = off_device(losses)
            if indices is not None and hasattr(indices, "detach"):
                indices = off_device(indices)
            seq = self._seq
            self._seq = seq + 1
            proc.add_batch(
                (
                    seq,
                    time.time(),
                    loss,
                    losses,
                    indices,
                    n,
                    self._epoch if epoch is None else epoch,
                    step,
                    phase,
                )
            )
        except Exception:
            self.log_errors += 1

    def log_epoch(
        self, epoch: int | None = None, *, accuracy: float | None = None, **metrics: Any
    ) -> None:
        """Record end-of-epoch figures: ``accuracy``, ``loss``, ``val_loss``, ``phase`` and
        any other named numbers (kept under ``metrics``)."""
        proc = self._proc
        if proc is None or self._pid != os.getpid():
            return
        try:
            ep = self._epoch if epoch is None else int(epoch)
            row: dict[str, Any] = {"epoch": ep, "t": time.time()}
            for key in ("phase", "loss", "val_loss"):
                if metrics.get(key) is not None:
                    row[key] = metrics.pop(key) if key == "phase" else float(metrics.pop(key))
            if accuracy is not None:
                row["accuracy"] = float(accuracy)
            row["metrics"] = {
                k: float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) or hasattr(v, "item")
            }
            row = {
                k: v
                for k, v in row.items()
                if not isinstance(v, float) or v == v and abs(v) != float("inf")
            }
            proc.add("epochs", {"epochs": [row]})
            self._epoch = ep + 1
        except Exception:
            self.log_errors += 1

    @property
    def batches_logged(self) -> int:
        return self._seq

    # --- live figures ----------------------------------------------------------------------

    def _refresh_eta(self) -> None:
        """On the worker thread: fetch η every ``eta_interval_s`` while online."""
        exp, client = self._exporter, self._client
        if exp is None or client is None or not exp.online or self.run_id is None:
            return
        if time.monotonic() - self._eta_at < self.eta_interval_s:
            return
        try:
            eta = client.eta(self.run_id)
        except H3ClientError:
            return
        with self._eta_lock:
            self._eta, self._eta_at = eta, time.monotonic()

    def _fresh_eta(self) -> dict[str, Any] | None:
        with self._eta_lock:
            if self._eta is None or time.monotonic() - self._eta_at > 3 * self.eta_interval_s:
                return None
            return self._eta

    def live_eta(self) -> float | None:
        """The daemon's marginal η (bits/J over the last minute); None if unknown or stale.

        Refreshed in the background every ``eta_interval_s``: reading it costs nothing.
        """
        eta = self._fresh_eta()
        return None if eta is None else eta.get("marginal_eta_bits_per_j")

    def energy_j(self) -> float | None:
        """Energy attributed to the run so far (J), as of the last background refresh."""
        eta = self._fresh_eta()
        return None if eta is None else eta.get("energy_j")

    # --- the end ---------------------------------------------------------------------------

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._proc.flush(timeout_s) if self._proc is not None else True

    def stop(self, status: str = "finished", timeout_s: float = 30.0) -> dict[str, Any]:
        """Flush, finish the run, and return its results (idempotent)."""
        if self._stopped and self.results is not None:
            return self.results
        if self._proc is None:
            raise H3ClientError("the profiler was never started")
        self._stopped = True
        self._proc.add("update", {"status": status, "finished_at": time.time()})
        flushed = self._proc.close(timeout_s)
        _live.discard(self)
        self.results = self._results(flushed)
        return self.results

    def _finish_at_exit(self, status: str) -> None:
        if not self._stopped and self._proc is not None and self._pid == os.getpid():
            try:
                self.stop(status=status, timeout_s=10.0)
            except Exception:  # at exit nothing may raise
                logger.exception("h3: finishing run %s at exit failed", self.run_id)

    def _query_client(self) -> Client:
        """A client for queries: the sender's own connection belongs to its thread."""
        if self._client is None:
            raise H3ClientError("the profiler was never started")
        c = self._client.config
        return Client(c.url, c.token, data_dir=c.data_dir, http=self._http)

    def _report_dict(self) -> dict[str, Any] | None:
        try:
            with self._query_client() as c:
                return c.report(str(self.run_id))
        except H3ClientError:
            return None

    def _results(self, flushed: bool) -> dict[str, Any]:
        exp = self._exporter
        assert exp is not None and self._proc is not None
        rep = self._report_dict() if exp.online else None
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "duration_s": (time.time() - self._t_start) if self._t_start else None,
            "batches_logged": self._seq,
            "batches_posted": exp.posted,
            "batches_spooled": exp.spooled,
            "batches_lost": exp.lost + self._proc.dropped,
            "batches_rejected": exp.rejected,
            "log_errors": self.log_errors + self._proc.conversion_errors,
            "flushed": flushed,
            "offline": not exp.online,
            "total_energy_j": None,
            "device_energy_j": None,
            "active_energy_j": None,
            "energy_source": "none",
            "energy_measured": False,
            "info_gain_bits": None,
            "efficiency_bits_per_j": None,
            "co2e_g": None,
            "carbon_source": "none",
            "phases": [],
            "epochs": [],
        }
        if rep is not None:
            e, eta = rep["energy"], rep["eta"]
            out.update(
                duration_s=rep["duration_s"],
                total_energy_j=e["energy_j"],
                device_energy_j=e["device_energy_j"],
                active_energy_j=e.get("active_energy_j"),
                energy_source=e["source"],
                energy_measured=e["measured"],
                info_gain_bits=eta["info_gain_bits"],
                info_gain_total_bits=eta["info_gain_total_bits"],
                efficiency_bits_per_j=eta["eta_bits_per_j"],
                co2e_g=e.get("co2e_g"),
                carbon_source=e.get("carbon_source", "none"),
                phases=rep["phases"],
                epochs=rep["epochs"],
                stopping_point=diminishing_returns(rep["epochs"]),
            )
            self._last_report = rep
        lost = out["batches_lost"]
        if lost:
            logger.warning("h3: %d batches could be neither sent nor spooled and are lost", lost)
        elif out["offline"]:
            logger.warning(
                "h3: run %s ended offline: %d batches wait in the spool (`h3d import` replays them)",
                self.run_id,
                exp.spooled,
            )
        return out

    def get_report(self) -> str:
        """A human-readable report of the run (from the daemon; says so when offline)."""
        rep = self._report_dict() if self._client is not None and self.run_id else None
        if rep is None:
            return f"run {self.run_id}: no daemon answered; its data waits in the spool"
        return format_report(rep)

    def export_csv(self, path: str | Path) -> Path:
        """Write the run's batches (seq, t, epoch, step, phase, n, loss) to ``path``."""
        self.flush()
        with self._query_client() as c:
            return c.export_csv(str(self.run_id), path)

    def __enter__(self) -> H3Profiler:
        return self.start()

    def __exit__(
        self, tp: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(status="failed" if tp is not None else "finished")


atexit.register(_at_exit)
