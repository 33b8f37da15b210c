"""``H3Profiler``: wrap any training loop; it streams losses to h3d without slowing the loop."""

from __future__ import annotations

import atexit
import json
import logging
import math
import operator
import os
import re
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from h3client import _batching
from h3client._batching import INT_MAX, BatchProcessor, lone_surrogate, snapshot, snapshot_loss
from h3client._config import resolve
from h3client._daemon import DaemonStart, find_daemon
from h3client._exporter import HttpExporter
from h3client._report import diminishing_returns, format_report
from h3client._spool import Spool, batch_epochs, batch_seqs, replay_spool
from h3client.client import RESUME_HEADERS, Client
from h3client.errors import H3ClientError, H3HTTPStatusError, H3RunNotFound

if TYPE_CHECKING:
    from h3client._distributed import RankInfo

logger = logging.getLogger(__name__)

_live: weakref.WeakSet[H3Profiler] = weakref.WeakSet()
_failed = False


def _excepthook(tp: type[BaseException], val: BaseException, tb: TracebackType | None) -> None:
    global _failed
    _failed = True
    _prev_excepthook(tp, val, tb)


_prev_excepthook = sys.excepthook


def _at_exit() -> None:
    """Finish every open run before the interpreter finalises (bounded: see ``stop``).

    The sender thread must be stopped by then: a daemon thread still running torch code
    when finalisation starts is ended mid-call, which aborts the process with
    "terminate called without an active exception".
    """
    for p in list(_live):
        p._finish_at_exit("failed" if _failed else "finished")


def _after_fork_in_child() -> None:
    # the sender thread does not exist in a forked child (a DataLoader worker): go inert
    global _forked
    _forked = True
    for p in list(_live):
        p._accepting = False


#: How long SIGTERM's handler gives the open runs to finish (torchrun waits 30 s after its
#: SIGTERM before a SIGKILL, Slurm's KillWait is 30 s by default).
SIGTERM_TIMEOUT_S = 5.0
_forked = False  # this process is a forked child (a DataLoader worker): no handler of ours
_sigterm_pid: int | None = None  # the process that installed the handler
_prev_sigterm: Any = None


def _install_sigterm() -> None:
    """At the first ``start()`` in the main thread: on SIGTERM (torchrun stopping the ranks
    that survive a crashed one, ``scancel``, a time limit), open runs end ``failed`` and
    then the previous handler runs. Not where SIGTERM is ignored, or handled by code that is
    not Python's (there is nothing to chain to), nor in a forked child."""
    global _sigterm_pid, _prev_sigterm
    if _sigterm_pid is not None or _forked:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set a handler
    import signal

    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None:
        return
    prev = signal.getsignal(sigterm)
    if prev is None or prev == signal.SIG_IGN:
        return
    try:
        signal.signal(sigterm, _on_sigterm)
    except (ValueError, OSError):
        return
    _sigterm_pid, _prev_sigterm = os.getpid(), prev


def _on_sigterm(signum: int, frame: Any) -> None:
    """Finish every open run ``failed`` (within ``SIGTERM_TIMEOUT_S``), then do what the
    previous handler does: call it, or (the default) die of the signal."""
    if os.getpid() == _sigterm_pid:  # never in a forked child, which inherits the handler
        for p in list(_live):
            p._finish_at_exit("failed", timeout_s=SIGTERM_TIMEOUT_S)
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
        return
    import signal

    signal.signal(signum, signal.SIG_DFL)  # the default: the process ends of the signal
    os.kill(os.getpid(), signum)


class H3Profiler:
    """Measure what a training run costs in joules and what it learns per joule.

    ``log_batch`` only appends a copy of what it is given to an in-memory queue (1.3–3.6 µs
    alone with per-sample losses and indices, 4–31 µs right after a training step; no I/O,
    no device sync, never raises); a background thread packs whole requests and posts them
    to the ``h3d`` daemon, and spools to disk while the daemon is unreachable. ``stop()``
    accounts for every batch: logged = posted + spooled + rejected + lost, where "lost" is
    only what neither the daemon nor the disk took (reported in the results and by a
    warning).

    Args:
        name: Run name (default: ``run-<id prefix>``).
        url: Daemon URL; default ``H3D_URL``, else the data dir's ``daemon.json``.
        token: Bearer token; default ``H3D_TOKEN``, else ``<data dir>/token``.
        device: Which devices the run uses ("auto": all the daemon measures). Another
            value is recorded as the tag ``device:<value>``; the config is left as given.
        config: Hyperparameters and anything else to store with the run, stored as given
            (values JSON cannot hold, and integers beyond ±(2**53 - 1), which JSON readers
            cannot keep exactly, are stored as their ``str``; NaN or inf is a ``ValueError``).
        tags: Labels to filter runs by.
        autostart: Start a local daemon (same data dir, detached) if none answers; the
            constructor waits until it reads power (not until it serves: its requests wait
            on the sender thread). The run opens on construction either way; without a
            daemon it runs offline on its spool.
        run_id: Resume this run: its spool is replayed first, sequence numbers and the
            epoch counter continue after those stored, and the daemon follows this process
            from then on (see docs/client.md). 32 hex digits (a UUID's other usual forms,
            with dashes or in upper case, are taken as the same id); else a ``ValueError``.
        data_dir: The daemon's data dir (default ``H3D_DATA_DIR`` or ``~/.local/share/h3d``).
        n_train: Training-set size, for ΔI_total.
        flush_interval_s: How often the sender posts (also when a batch is full).
        max_batch: Batches per request.
        max_queue: Queue length past which the sender spools the oldest batches to disk
            instead of holding them; with no daemon and a full disk, up to
            max(4 × max_queue, max_queue + max_batch) batches wait in memory and are
            retried, and only older ones are lost.
        eta_interval_s: How often ``live_eta`` is refreshed in the background once it has
            a value (see :meth:`live_eta`).
        http: An ``httpx.Client`` to use (tests); default: one keep-alive connection.
        rank: This process's rank in a distributed job; default from torchrun's ``RANK``
            or SLURM's ``SLURM_PROCID``. Every rank's profiler joins one run (see
            ``docs/torchrun.md``); each batch carries its rank.
        world_size: The number of ranks (default ``WORLD_SIZE`` or ``SLURM_NTASKS``).

    Raises:
        H3ClientError: in a distributed job, when the ranks cannot agree on a run id (no
            launcher job id, no initialised process group and no ``run_id``), or the daemon
            says the run this rank would join already ended (an earlier launch's); resuming a run
            (``run_id``) when no daemon says where it stopped and its spool holds none of
            its batches to say it either (numbering from 0 would make every batch and
            epoch a duplicate of a stored one: start the daemon, then resume), or a run its
            client ended (the daemon says it is finished or failed by its client, or its
            spool holds its final status): it takes no more data.
        ValueError: a name, tags, config, ``n_train`` or ``run_id`` the daemon would refuse.

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
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.name = name
        self._url, self._token, self._data_dir, self._http = url, token, data_dir, http
        self.device = device
        self.config = dict(config or {})
        self.tags = list(tags or [])
        # the tags as sent (the device's among them): refused here if the daemon would
        self.n_train = _check_run_fields(name, self._run_tags(), n_train)
        self._config_json = _json_config(self.config)  # a ValueError here, before any thread
        self.autostart = autostart
        self.run_id: str | None = None if run_id is None else _check_run_id(run_id)
        self._resume = run_id is not None
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eta_interval_s = eta_interval_s
        self._seq = 0
        self._seq0 = 0  # this profiler's first seq (a resumed run's is past the stored ones)
        self._seq_step = 1  # a rank's k-th batch is seq k·world_size + rank: unique in the run
        self._rank_arg, self._world_arg = rank, world_size
        self.dist: RankInfo | None = None
        self._derived = False  # the run id was derived from the launch's job id
        self._epoch = 0
        # a batch was logged without epoch= since the last log_epoch (tagged self._epoch)
        self._tagged_by_default = False
        self._warned_epoch = False
        self._proc: BatchProcessor | None = None
        self._exporter: HttpExporter | None = None
        self._client: Client | None = None
        self._eta: dict[str, Any] | None = None
        self._eta_at = 0.0
        self._eta_lock = threading.Lock()
        self._t_start: float | None = None
        self._stopped = False
        self._accepting = False  # log_batch's one check: started, not stopped, not a fork
        self._eta_due = False
        self.results: dict[str, Any] | None = None
        self.log_errors = 0
        self.start()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> H3Profiler:
        """Open the run (idempotent). Without a daemon it runs offline.

        Raises:
            H3ClientError: only when resuming a run that neither a daemon nor the run's
                spool can say where it stopped (see the class's Raises).
        """
        if self._proc is not None:
            return self
        import socket  # here, not at import: ``import h3client`` stays light

        cfg = resolve(self._url, self._token, self._data_dir)
        # A daemon started here is waited for until it reads power, not until it serves
        # (0.5 to 1.3 s more, by host): the run then begins with readings under it, and
        # its requests wait on the sender thread for the rest. Ranks and a resumed run need
        # it to answer now (their join, where the run stopped).
        found = (
            find_daemon(
                cfg,
                autostart=self.autostart,
                serving=self.dist is not None or self._resume,
            )
            if self._http is None
            else cfg.url
        )
        starting, url = (found, None) if isinstance(found, DaemonStart) else (None, found)
        if url is not None and url != cfg.url:
            cfg = resolve(url, self._token, self._data_dir)
        # the token as given (None: the data dir's, read again if the daemon refuses it)
        self._client = Client(cfg.url, self._token, data_dir=cfg.data_dir, http=self._http)
        # a URL found, not given, gets the token only once it proved that it holds it
        # (Client.proven, asked on the sender thread): find_daemon found none that did, or
        # what answers there may change while the run goes on
        self._client.config = self._client.config._replace(url_is_explicit=cfg.url_is_explicit)
        online = url is not None or starting is not None
        rank_fields = self._join_ranks()
        if self.run_id is None:
            self.run_id = os.urandom(16).hex()  # 128 random bits, as uuid4 without its import
        self._exporter = HttpExporter(
            self._client,
            self.run_id,
            rank=None if self.dist is None else self.dist.rank,
            resume=self._resume,
            starting=starting,
        )
        try:
            if self._resume:
                self._seq, self._epoch = self._resume_point(online)
                self._seq0 = self._seq
            elif self.dist is not None and online:
                self._check_joinable()
        except H3ClientError:
            self._client.close()
            raise
        self._proc = BatchProcessor(
            self._exporter,
            max_batch=self.max_batch,
            flush_interval_s=self.flush_interval_s,
            max_queue=self.max_queue,
            on_tick=self._refresh_eta,
        )
        self._t_start = time.time()
        cpu = os.times()  # the daemon counts this process's CPU share from here
        # torch imported already (the usual training script): log_batch's fast paths are
        # armed from its first call, not after a first tensor went the slow way
        _batching.bind_torch()
        # A resumed run sends its create too, saying it resumes (the exporter's headers):
        # the daemon then follows this process (its pid and CPU time from here), not the
        # one that died, whose exit would get the run failed during any pause longer than
        # the daemon's exit grace. The run exists: nothing else of it changes.
        self._proc.add(
            "create",
            {
                "id": self.run_id,
                "created_at": self._t_start,
                "name": self.name,
                "config": self._config_json,
                "tags": self._run_tags(),
                "pid": os.getpid(),
                "cpu_s": cpu.user + cpu.system + cpu.children_user + cpu.children_system,
                "host": socket.gethostname(),
                "n_train": self.n_train,
                **rank_fields,
            },
        )
        if starting is not None:
            logger.info(
                "h3: run %s: the daemon started for %s reads power; streaming once it serves",
                self.run_id,
                cfg.data_dir,
            )
        elif online:
            logger.info("h3: run %s streaming to %s", self.run_id, cfg.url)
        else:
            logger.warning(
                "h3: no daemon at %s; run %s is spooled to %s (replayed when one answers, or "
                "with `h3d import`)",
                cfg.url,
                self.run_id,
                cfg.spool_dir,
            )
            self._exporter.offline("no daemon answered at start")
        _live.add(self)
        # atexit runs last-registered first: re-registering puts this run's finish ahead
        # of handlers registered since import (torch's among them)
        atexit.unregister(_at_exit)
        atexit.register(_at_exit)
        _install_sigterm()
        if sys.excepthook is not _excepthook:
            global _prev_excepthook
            _prev_excepthook, sys.excepthook = sys.excepthook, _excepthook
        self._accepting = True
        return self

    def _run_tags(self) -> list[str]:
        """The run's tags as sent: ``tags``, and ``device:<device>`` unless it is "auto"."""
        tags = list(self.tags)
        if self.device != "auto" and f"device:{self.device}" not in tags:
            tags.append(f"device:{self.device}")
        return tags

    def _join_ranks(self) -> dict[str, Any]:
        """In a distributed job: this rank's place, the run id all ranks share, and the
        fields of its join (see ``h3client._distributed``)."""
        from h3client import _distributed

        self.dist = _distributed.detect(rank=self._rank_arg, world_size=self._world_arg)
        if self.dist is None:
            return {}
        if self.run_id is None:
            # the k-th profiler of this name in the process: a run of its own (every rank
            # creates its profilers in the same order, so every rank counts the same k)
            k = _distributed.next_index(self.dist, self.name)
            self.run_id = _distributed.shared_run_id(self.dist, self.name, k)
            self._derived = True
        self._resume = False  # every rank joins the shared id; joining is idempotent
        self._seq = self._seq0 = self.dist.rank
        self._seq_step = self.dist.world_size
        fields: dict[str, Any] = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        if self.dist.local_rank is not None:
            fields["local_rank"] = self.dist.local_rank
        return fields

    def _check_joinable(self) -> None:
        """A rank joins a run that is running, or that none created yet: one that ended (a
        launch that reuses an earlier one's job id, a fixed ``--rdzv-id``) takes no more
        data, and what this rank logs would be refused, or taken for the earlier launch's
        duplicates. The daemon decides when it does not answer here."""
        assert self._client is not None and self.dist is not None
        try:
            status = self._client.get_run(str(self.run_id)).get("status")
        except H3ClientError:  # none yet (404), or no answer: the join decides
            return
        if status != "running":
            key = self.dist.job_key
            raise H3ClientError(
                f"rank {self.dist.rank}: run {self.run_id} already ended ({status}) and takes "
                "no more data"
                + (
                    f"; its id is derived from the launch's job id ({key}) and the name "
                    f"{self.name!r}, which an earlier launch had: give this launch another "
                    "--rdzv-id, or the profiler another name or run_id"
                    if key is not None and self._derived
                    else ""
                )
            )

    def _resume_point(self, online: bool) -> tuple[int, int]:
        """Where a resumed run continues: after the highest sequence number stored or
        spooled for it, and at the epoch after those stored (the daemon's ``n_epochs``:
        epochs numbered from 0, as ``log_epoch()`` numbers them) or spooled, or at the epoch
        its spooled batches were logged in, if later.

        Without a daemon that says where the run stopped, the spool alone can: once a line
        goes to it, every later one does until it is replayed whole (and deleted), so its
        highest sequence number is the run's. A spool without a batch cannot say it, and
        neither can no spool: then this raises H3ClientError rather than number from 0,
        which would make every batch and epoch a duplicate of a stored one.
        """
        assert self._client is not None and self.run_id is not None
        top, top_epoch, batch_epoch = -1, -1, 0
        ended: str | None = None  # the status its client ended it with, if it did
        spool = Spool(self._client.config.spool_dir, self.run_id)
        if spool.exists():
            for line in spool.path.read_bytes().split(b"\n"):
                try:
                    op = json.loads(line.decode())
                    body = op.get("body")
                    if op.get("op") == "update" and body.get("rank") is None:
                        ended = body.get("status") or ended  # its final status, spooled
                    elif op.get("op") == "batches":
                        top = max([top, *batch_seqs(op["body"])])
                        batch_epoch = max([batch_epoch, *batch_epochs(op["body"])])
                    elif op.get("op") == "epochs":
                        top_epoch = max(
                            [top_epoch, *(int(e["epoch"]) for e in op["body"]["epochs"])]
                        )
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a damaged line (not UTF-8 included): the replay reports it
            if online:
                replay_spool(self._client, self._client.config.spool_dir, self.run_id)
        next_epoch = max(top_epoch + 1, batch_epoch)
        why = f"no daemon answers at {self._client.url}"
        if online:
            try:
                run = self._client.get_run(self.run_id)
                last = run.get("last_seq")
                if last is not None:
                    top = max(top, int(last))
                next_epoch = max(next_epoch, int(run.get("n_epochs") or 0))
                why = ""
                if run.get("status") == "finished":  # only its client finishes a run
                    ended = "finished"
                elif run.get("status") == "failed" and ended is None:
                    ended = self._ended_by_client()
            except H3RunNotFound as exc:  # none of it reached this daemon: nothing to follow
                logger.warning("h3: cannot resume run %s: %s", self.run_id, exc)
                why = ""
            except H3ClientError as exc:
                why = f"the daemon at {self._client.url} did not say where it stopped ({exc})"
        if ended is not None:
            raise H3ClientError(
                f"cannot resume run {self.run_id}: it already ended ({ended}) and takes no "
                "more data (a run its client ended is never reopened); start a new run"
            )
        if why and top < 0:
            raise H3ClientError(
                f"cannot resume run {self.run_id}: {why}, and its spool ({spool.path}) holds "
                "none of its batches to say it; numbered from 0, every batch and epoch would "
                "be a duplicate of a stored one. Start the daemon (`h3d serve`) and resume "
                "again"
            )
        return top + 1, next_epoch

    def _ended_by_client(self) -> str | None:
        """The status "failed" if the daemon's failed run was failed by its client; None if
        its reaper failed it (its process gone), which a resumed process reopens. Asked as the
        resumed create asks, which the daemon refuses (409 run_exists) for a run its client
        ended."""
        import socket

        assert self._client is not None and self.run_id is not None
        body = {"id": self.run_id, "pid": os.getpid(), "host": socket.gethostname()}
        try:
            self._client.post_json(self.run_id, "create", json.dumps(body), headers=RESUME_HEADERS)
        except H3HTTPStatusError as exc:
            return "failed" if exc.code == "run_exists" else None
        except H3ClientError:
            return None
        return None

    # --- the training loop's calls ---------------------------------------------------------

    def log_batch(
        self,
        loss: Any,
        losses: Any = None,
        indices: Any = None,
        n: int | None = None,
        epoch: int | None = None,
        step: int | None = None,
        phase: str | None = None,
    ) -> None:
        """Record one batch's mean loss (a float or a 0-dim tensor, in nats).

        Optionally its per-sample ``losses`` and their dataset ``indices`` (tensors or
        sequences of equal length). For one thread, the training loop's: it takes no lock.
        Costs 1.3–3.6 µs alone, 4–31 µs right after a training step, by host
        (docs/client.md); never raises, never blocks, never syncs a CUDA, XPU or MPS device
        (a tensor on another device is copied with a blocking copy). A loss that is not a
        number is counted in ``log_errors`` and not logged; after ``stop()``, and in a forked
        child, it does nothing.

        What is recorded is the values at the call: changing a logged tensor or list in place
        afterwards, or freeing its autograd graph, does not change it. A CPU tensor's memory
        is copied during the call (nothing of the tensor is kept); a CUDA tensor's copy to the
        host is enqueued on its device's current stream during the call, so it sees the tensor
        as of the call in that stream's order (a later in-place kernel on another stream,
        without synchronising, is the caller's race); a list is copied.
        """
        if not self._accepting:
            return  # not started, stopped, or a forked child (DataLoader worker): inert
        proc: BatchProcessor = self._proc  # type: ignore[assignment]  # set while accepting
        try:
            # the fast paths, inline: a float is queued as it is; a CPU torch.Tensor loss is
            # read with item() (one call, about 0.4 µs, no device to sync); a contiguous CPU
            # tensor's bytes are copied from its memory (about 0.5 µs, what a detach() costs,
            # which would still share the tensor's memory); everything else goes through
            # snapshot(). Every bytecode here runs once a step, mostly with cold caches.
            # device copies (made off the fast paths only): one event per device, at the end
            copies: _batching.Copies | None = None
            if type(loss) is not float:
                if type(loss) is _batching.TENSOR and loss.is_cpu:
                    try:
                        loss = loss.item()
                    except RuntimeError:  # not one element: queued as is, the sender rejects it
                        loss = snapshot_loss(loss)
                else:
                    copies = []
                    loss = snapshot_loss(loss, copies)
            if losses is not None:
                tensor, mem = _batching.TENSOR, _batching.MEMORY
                if type(losses) is tensor and losses.is_cpu and losses.is_contiguous():
                    p = losses.data_ptr()
                    losses = (mem[p : p + losses.nbytes].tobytes(), losses.dtype)
                else:
                    copies = [] if copies is None else copies
                    losses = snapshot(losses, copies)
                if indices is not None:
                    if type(indices) is tensor and indices.is_cpu and indices.is_contiguous():
                        p = indices.data_ptr()
                        indices = (mem[p : p + indices.nbytes].tobytes(), indices.dtype)
                    else:
                        copies = [] if copies is None else copies
                        indices = snapshot(indices, copies)
            elif indices is not None:  # without losses: the sender leaves the batch out, counted
                copies = [] if copies is None else copies
                indices = snapshot(indices, copies)
            if copies:
                _batching.record_copies(copies)
            if epoch is None:
                epoch = self._epoch
                self._tagged_by_default = True
            seq = self._seq
            self._seq = seq + self._seq_step
            q = proc.batches  # proc.add_batch, inline
            q.append((seq, time.time(), loss, losses, indices, n, epoch, step, phase))
            queued = len(q)
            if queued == proc.wake_at:
                proc.wake()
            elif queued > proc.hard_limit:
                proc.drop_oldest()
        except Exception:
            self.log_errors += 1

    def log_epoch(
        self, epoch: int | None = None, *, accuracy: float | None = None, **metrics: Any
    ) -> None:
        """Record end-of-epoch figures: ``accuracy``, ``loss``, ``val_loss``, ``phase`` and
        any other named numbers (kept under ``metrics``). Numbers may be floats, ints, 0-dim
        tensors or numpy scalars; a figure that is not a finite number (NaN, inf, a string)
        is left out, and the epoch's other figures are kept.

        ``epoch`` defaults to the one after the last logged (from 0; a resumed run continues
        after its stored epochs), as does a batch's epoch in ``log_batch``: numbering epochs
        from 1 here puts the first epoch's batches in epoch 0 (warned once); pass ``epoch=``
        to both, or to neither. An epoch is stored once per run: the number of one the
        run already holds is taken by the daemon as a duplicate and not stored."""
        proc = self._proc
        if proc is None or not self._accepting:
            return
        try:
            ep = self._epoch if epoch is None else int(epoch)
            if ep != self._epoch and self._tagged_by_default and not self._warned_epoch:
                self._warned_epoch = True
                logger.warning(
                    "h3: log_epoch(%d) after batches logged as epoch %d (a batch without "
                    "epoch= takes the one after the last logged, from 0): they stay in that "
                    "epoch. Number epochs from 0, or pass epoch= to log_batch too",
                    ep,
                    self._epoch,
                )
            self._tagged_by_default = False
            row: dict[str, Any] = {"epoch": ep, "t": time.time()}
            if metrics.get("phase") is not None:
                row["phase"] = str(metrics.pop("phase"))
            figures = {"accuracy": accuracy, **metrics}
            # each figure alone: one that is not a finite number (a NaN grad norm, a string)
            # is left out, not the epoch with it
            numbers = {
                k: f for k, f in ((k, _finite(v)) for k, v in figures.items()) if f is not None
            }
            for key in ("accuracy", "loss", "val_loss"):
                if key in numbers:
                    row[key] = numbers.pop(key)
            row["metrics"] = numbers
            proc.add("epochs", {"epochs": [row]})
            self._epoch = ep + 1
            self._eta_due = True  # refresh live_eta once this epoch's batches are posted
        except Exception:
            self.log_errors += 1

    @property
    def batches_logged(self) -> int:
        """Batches this profiler logged (a resumed run's earlier sessions not counted)."""
        return (self._seq - self._seq0) // self._seq_step

    # --- live figures ----------------------------------------------------------------------

    def _refresh_eta(self) -> None:
        """On the worker thread, after a pass: fetch η while online, when it is due."""
        exp, client = self._exporter, self._client
        if exp is None or client is None or not exp.online or exp.starting or self.run_id is None:
            return
        known = self._eta is not None and self._eta.get("marginal_eta_bits_per_j") is not None
        if known and not self._eta_due and time.monotonic() - self._eta_at < self.eta_interval_s:
            return
        self._eta_due = False
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

        Reading it costs nothing: the sender thread fetches it after its passes (every
        ``flush_interval_s``, 1 s by default). It is None until the daemon can compute it,
        which is once two batches are stored and power was sampled over them (about a
        second into a run), and it is fetched on every pass until then. After that it
        changes every ``eta_interval_s`` (5 s by default) and right after each
        ``log_epoch`` once that epoch's batches reached the daemon, so an epoch-end
        controller sees the epoch it just finished. It is None again once it was last
        fetched more than 3 × ``eta_interval_s`` ago: the daemon stopped answering, or the
        run went offline (it is not fetched then).
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

    def stop(
        self, status: str = "finished", timeout_s: float = 30.0, *, report: bool = True
    ) -> dict[str, Any]:
        """Send what is queued, finish the run, and return its results (idempotent).

        Returns within about ``timeout_s`` whatever the daemon does: what it has not
        acknowledged by then (the queue, the request in flight, the final status) is
        written to the spool, which ``h3d import`` or a resumed profiler replays. After an
        outage it tries the daemon once whatever is left of the sender's back-off. The
        results count every batch: ``batches_logged`` = ``batches_posted`` +
        ``batches_spooled`` + ``batches_rejected`` + ``batches_lost``.

        In a distributed run, this rank's end is not the run's: with ``report``, it waits
        (within ``timeout_s``) until the daemon says the run ended (its last rank stopped)
        before it fetches the run's figures. The results' ``status`` is the run's status as
        the daemon gave its figures (None without them), and ``partial`` is True when those
        figures are of a run still running: they change once the other ranks end.

        Args:
            status: "finished" or "failed".
            timeout_s: The deadline for the whole call.
            report: Fetch the run's energy and η from the daemon into the results
                (when everything reached it in time).
        """
        if self._stopped and self.results is not None:
            return self.results
        if self._proc is None:
            raise H3ClientError("the profiler was never started")
        deadline = time.monotonic() + timeout_s
        self._accepting = False
        self._stopped = True
        update: dict[str, Any] = {"status": status, "finished_at": time.time()}
        if self.dist is not None:  # this rank is done; the run ends when every rank is
            update["rank"] = self.dist.rank
        self._proc.add("update", update)
        flushed = self._proc.close(timeout_s)
        _live.discard(self)
        left = deadline - time.monotonic()
        self.results = self._results(flushed, report=report and flushed and left > 0.1, left=left)
        return self.results

    def _finish_at_exit(self, status: str, timeout_s: float = 10.0) -> None:
        if not self._stopped and self._proc is not None and self._accepting:
            try:
                self.stop(status=status, timeout_s=timeout_s, report=False)
            except Exception:  # at exit nothing may raise
                logger.exception("h3: finishing run %s at exit failed", self.run_id)

    def _query_client(self, timeout_s: float = 10.0) -> Client:
        """A client for queries: the sender's own connection belongs to its thread."""
        if self._client is None:
            raise H3ClientError("the profiler was never started")
        c = self._client.config
        q = Client(c.url, c.token, data_dir=c.data_dir, http=self._http, timeout_s=timeout_s)
        q.config = q.config._replace(url_is_explicit=c.url_is_explicit)  # proven as found
        q._proven_token = self._client._proven_token
        return q

    def _report_dict(
        self, timeout_s: float = 10.0, *, ended_by: float | None = None
    ) -> dict[str, Any] | None:
        """The run's report; with ``ended_by`` (a ``time.monotonic()`` deadline), once the
        daemon says the run ended, or at that deadline, whichever comes first."""
        try:
            with self._query_client(timeout_s) as c:
                while ended_by is not None and time.monotonic() < ended_by:
                    if c.get_run(str(self.run_id)).get("status") != "running":
                        break
                    time.sleep(min(0.1, max(0.0, ended_by - time.monotonic())))
                return c.report(str(self.run_id))
        except H3ClientError:
            return None

    def _results(self, flushed: bool, *, report: bool, left: float) -> dict[str, Any]:
        exp, proc = self._exporter, self._proc
        assert exp is not None and proc is not None
        rep = None
        if report and exp.online:
            # a distributed run ends with its last rank: its figures are final only then
            # (a little of the time left is kept for the report itself)
            ended_by = None
            if self.dist is not None:
                ended_by = time.monotonic() + left - min(2.0, left / 4)
            rep = self._report_dict(min(10.0, left), ended_by=ended_by)
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "duration_s": (time.time() - self._t_start) if self._t_start else None,
            "batches_logged": self.batches_logged,
            "batches_posted": proc.posted,
            "batches_spooled": proc.spooled,
            "batches_lost": proc.lost,
            "batches_rejected": proc.rejected,
            "log_errors": self.log_errors,
            "flushed": flushed,
            "offline": not exp.online,
            "status": None,
            "partial": False,
            "total_energy_j": None,
            "device_energy_j": None,
            "active_energy_j": None,
            "energy_source": "none",
            "energy_measured": False,
            "info_gain_bits": None,
            "info_gain_total_bits": None,
            "efficiency_bits_per_j": None,
            "co2e_g": None,
            "carbon_source": "none",
            "carbon_detail": None,
            "phases": [],
            "epochs": [],
            "stopping_point": None,
        }
        if rep is not None:
            e, eta = rep["energy"], rep["eta"]
            out.update(
                status=rep.get("status"),
                partial=rep.get("status") == "running",
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
                carbon_detail=e.get("carbon_detail"),
                phases=rep["phases"],
                epochs=rep["epochs"],
                stopping_point=diminishing_returns(rep["epochs"]),
            )
            self._last_report = rep
        self._account(out, exp, proc.worker_alive)
        return out

    def _account(self, out: dict[str, Any], exp: HttpExporter, worker_alive: bool) -> None:
        """Log where every batch went; warn about what was lost or left in the spool."""
        logged, posted, spooled, rejected, lost = (
            out["batches_logged"],
            out["batches_posted"],
            out["batches_spooled"],
            out["batches_rejected"],
            out["batches_lost"],
        )
        logger.info(
            "h3: run %s: %d batches logged = %d posted + %d spooled + %d rejected + %d lost",
            self.run_id,
            logged,
            posted,
            spooled,
            rejected,
            lost,
        )
        if logged != posted + spooled + rejected + lost:  # a bug in h3client, never expected
            logger.warning("h3: run %s: the batch accounting does not add up", self.run_id)
        if lost:
            logger.warning(
                "h3: run %s: %d batches were lost (neither the daemon nor the disk took them)",
                self.run_id,
                lost,
            )
        if out["offline"] or not out["flushed"]:
            spool = exp.spool_file
            # what waits there now: batches spooled before a replay that emptied it are stored
            waiting = spool.pending
            if exp.status_spooled:
                logger.warning(
                    "h3: run %s ended with %d batches and its final status in the spool %s: "
                    "`h3d import` (or a profiler resuming the run) replays it",
                    self.run_id,
                    waiting,
                    spool.path,
                )
            else:  # the disk refused it too: say so, never claim the spool holds it
                logger.warning(
                    "h3: run %s: its final status reached neither the daemon nor the spool "
                    "%s%s; the daemon marks the run failed once it has heard nothing of it "
                    "for H3D_RUN_TIMEOUT_S",
                    self.run_id,
                    spool.path,
                    f" (which holds {waiting} batches of this profiler's: `h3d import` replays them)"
                    if spool.exists()
                    else "",
                )
        if worker_alive:
            logger.warning("h3: run %s: the sender thread did not stop in time", self.run_id)

    def get_report(self) -> str:
        """A human-readable report of the run (from the daemon; says so when offline)."""
        rep = self._report_dict() if self._client is not None and self.run_id else None
        if rep is None:
            return f"run {self.run_id}: no daemon answered; its data waits in the spool"
        return format_report(rep)

    def export_csv(self, path: str | Path) -> Path:
        """Write the run's batches (seq, t, epoch, step, rank, phase, n, loss) to ``path``."""
        self.flush()
        with self._query_client() as c:
            return c.export_csv(str(self.run_id), path)

    def export_samples_csv(self, path: str | Path) -> Path:
        """Write the per-sample losses logged so far (seq, epoch, index, loss; one row a
        sample) to ``path``."""
        self.flush()
        with self._query_client() as c:
            return c.export_samples_csv(str(self.run_id), path)

    def __enter__(self) -> H3Profiler:
        return self.start()

    def __exit__(
        self, tp: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(status="failed" if tp is not None else "finished")


# The daemon's limits on a run's fields (h3d.api.schemas.RunCreate): a run it would refuse is
# refused here, at construction, not after training with every batch rejected behind it.
NAME_MAX, TAGS_MAX, TAG_MAX, CONFIG_MAX_BYTES = 200, 100, 100, 64 * 1024
CONFIG_MAX_DEPTH = 32  # the config itself is level 1; a value inside it, level 2


def _finite(v: Any) -> float | None:
    """``v`` as a finite float (an int, a float, a 0-dim tensor or numpy number), or None."""
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # 10**400: no float holds it
        return None
    return f if math.isfinite(f) else None


_RUN_ID = re.compile(r"[0-9a-f]{32}")
# a UUID's other usual forms: upper case, with its dashes (8-4-4-4-12), in braces, a URN
_UUID_FORM = re.compile(
    r"(?:urn:uuid:)?(\{)?[0-9a-f]{8}(-?)[0-9a-f]{4}\2[0-9a-f]{4}\2[0-9a-f]{4}\2[0-9a-f]{12}"
    r"(?(1)\})",
    re.IGNORECASE,
)


def _check_run_id(run_id: Any) -> str:
    """``run_id`` as the daemon takes it (32 lower-case hex digits); a UUID written another
    usual way (dashes, upper case) as the same id; else ValueError, before any thread."""
    if isinstance(run_id, str):
        if _RUN_ID.fullmatch(run_id):
            return run_id
        if _UUID_FORM.fullmatch(run_id.strip()):
            import uuid

            return uuid.UUID(run_id.strip()).hex
    raise ValueError(
        f"H3Profiler run_id: 32 hex digits (a run's id, as `h3d runs` lists it), not {run_id!r:.80}"
    )


def _check_run_fields(name: Any, tags: list[Any], n_train: Any) -> int | None:
    """Raise ValueError for what the daemon would refuse; ``n_train`` as an int (from a
    numpy or 0-dim tensor integer too)."""
    if name is not None and not (isinstance(name, str) and len(name) <= NAME_MAX):
        raise ValueError(
            f"H3Profiler name: a string of at most {NAME_MAX} characters, not {name!r:.80}"
        )
    if name and not name.strip():
        raise ValueError("H3Profiler name: needs a character that is not a space")
    if len(tags) > TAGS_MAX:
        raise ValueError(f"H3Profiler tags: at most {TAGS_MAX}, not {len(tags)}")
    for tag in tags:
        if not (isinstance(tag, str) and 1 <= len(tag) <= TAG_MAX):
            raise ValueError(
                f"H3Profiler tags: strings of 1 to {TAG_MAX} characters, not {tag!r:.80}"
            )
    for what, text in (("name", name or ""), *(("tags", t) for t in tags)):
        if "\x00" in text:
            raise ValueError(f"H3Profiler {what}: holds a NUL character, which no store keeps")
        if lone_surrogate(text) is not None:
            raise ValueError(
                f"H3Profiler {what}: holds a lone surrogate, which is not Unicode text"
            )
    if n_train is None:
        return None
    try:
        n = operator.index(n_train)
    except TypeError:
        n = 0
    if isinstance(n_train, bool) or not 1 <= n <= INT_MAX:
        raise ValueError(
            f"H3Profiler n_train: a positive int (the training-set size) of at most "
            f"2**53 - 1, not {n_train!r:.80}"
        )
    return n


def _config_depth_ok(config: Any) -> bool:
    """Whether ``config`` is nested at most ``CONFIG_MAX_DEPTH`` levels, counted as the daemon
    counts them (``h3d.api.schemas.check_config``: every value one level below its dict or
    list, the config itself level 1). Tuples count as lists, as JSON writes them."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > CONFIG_MAX_DEPTH:
            return False
        if isinstance(node, dict):
            stack.extend((x, depth + 1) for x in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((x, depth + 1) for x in node)
    return True


def _big_ints_as_str(node: Any) -> tuple[Any, list[int]]:
    """``node`` (JSON as read back) with every integer beyond ±``INT_MAX`` as its decimal
    string, and those integers: the daemon refuses a config that holds one
    (``h3d.api.schemas.check_config``), as JSON readers cannot keep it exactly."""
    if isinstance(node, dict):
        pairs = [(k, _big_ints_as_str(v)) for k, v in node.items()]
        return {k: v for k, (v, _) in pairs}, [b for _, (_, bs) in pairs for b in bs]
    if isinstance(node, list):
        items = [_big_ints_as_str(v) for v in node]
        return [v for v, _ in items], [b for _, bs in items for b in bs]
    if type(node) is int and not -INT_MAX <= node <= INT_MAX:
        return str(node), [node]
    return node, []


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as the daemon will store it: as given, non-JSON values as their str.

    Refused with a ValueError, as the daemon would refuse it (``h3d.api.schemas.
    check_config``): nested deeper than ``CONFIG_MAX_DEPTH`` levels, a NaN or infinite
    number, a lone surrogate in a string, over
    ``CONFIG_MAX_BYTES`` of compact JSON; and keys JSON cannot hold (a tuple key). An
    integer beyond ±``INT_MAX`` (which the daemon refuses) is stored as its string, with a
    warning."""
    if not _config_depth_ok(config):  # before json.dumps, which recurses (RecursionError)
        raise ValueError(
            f"H3Profiler config: nested deeper than the daemon's {CONFIG_MAX_DEPTH} levels"
        )
    try:
        text = json.dumps(config, default=str, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"H3Profiler config: {exc} (NaN and inf cannot be stored)") from exc
    except TypeError as exc:  # a key JSON has no form for (default= converts values only)
        raise ValueError(f"H3Profiler config: {exc}") from exc
    out: dict[str, Any] = json.loads(text)
    out, big = _big_ints_as_str(out)
    if big:  # a 64-bit seed (torch.seed()), a hash: kept exact, as a string
        digits = str(big[0])
        digits = digits if len(digits) <= 40 else digits[:37] + "..."
        warnings.warn(
            f"H3Profiler config: {len(big)} integer(s) beyond ±(2**53 - 1), which JSON "
            f"readers cannot keep exactly (the first: {digits}), stored as strings",
            stacklevel=3,
        )
    # a lone surrogate ("\ud800") is valid JSON, escaped, but no Unicode text
    bad = lone_surrogate(json.dumps(out, ensure_ascii=False))
    if bad is not None:
        raise ValueError(
            f"H3Profiler config: holds a lone surrogate ({bad}), which is not Unicode text"
        )
    # measured as the daemon measures it: compact JSON of what it receives
    size = len(json.dumps(out, separators=(",", ":")))
    if size > CONFIG_MAX_BYTES:
        raise ValueError(
            f"H3Profiler config: {size} bytes as JSON, over the daemon's "
            f"{CONFIG_MAX_BYTES}: keep hyperparameters there, not data"
        )
    return out


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
