"""Exporters: where the background worker sends what the training loop logged.

The worker (``_batching.BatchProcessor``) decides what goes where; an exporter only knows how:

- ``send(request)`` posts one request to the daemon and says what happened: "sent" (stored,
  or already stored), "rejected" (the daemon refused it as invalid: resending cannot help) or
  "down" (no answer, a 5xx, or a 401/403 for a token that daemon does not take: try again
  later, keep it meanwhile) or "too_large" (a batches request over the daemon's body
  limit: split it);
- ``spool(request)`` appends it to the run's spool file on disk; False if the disk refused;
- ``ready()`` says whether sending is worth trying now (online, or the back-off has passed).

``HttpExporter`` replays the run's spool, in order, before anything new once the daemon
answers again, so the daemon sees the operations in the order they were logged.
"""

from __future__ import annotations

import logging
import time
from typing import Literal, NamedTuple, Protocol

from h3client._spool import Spool, already_done, replay_spool
from h3client.client import Client
from h3client.errors import H3ConnectionError, H3HTTPStatusError

logger = logging.getLogger(__name__)

Outcome = Literal["sent", "rejected", "down", "too_large"]


class Request(NamedTuple):
    """One operation, encoded once: what is posted and, if need be, what is spooled."""

    op: str  # "create", "batches", "epochs", "update"
    body: bytes  # the request body: JSON text, UTF-8
    n_batches: int = 0  # batches it carries


class Exporter(Protocol):
    """Where requests go. None of its methods raises."""

    def ready(self) -> bool: ...

    def send(self, request: Request) -> Outcome: ...

    def spool(self, request: Request) -> bool: ...

    def shutdown(self) -> None: ...


class HttpExporter:
    """Posts to the daemon through ``client``; spools to ``<data dir>/spool/<run id>.jsonl``."""

    def __init__(
        self, client: Client, run_id: str, *, max_backoff_s: float = 10.0, rank: int | None = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        # a distributed run's rank: every batches request says which rank logged it
        self._rank_prefix = None if rank is None else f'{{"rank":{int(rank)},'.encode()
        self.spool_file = Spool(client.config.spool_dir, run_id)
        self.online = True
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self._max_backoff_s = max_backoff_s
        self._warned: set[str] = set()
        self.status_spooled = False  # a run status (the final one, at stop) is in the spool

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def offline(self, why: str, *, refused: bool = False) -> None:
        """Mark the daemon unreachable, or ``refused`` (it did not take the token); the next
        try waits for an exponential back-off."""
        if refused:
            self._warn_once(
                "refused",
                "h3: the daemon at %s refused this profiler's token (%s); spooling to %s: "
                "give the daemon's token (H3D_TOKEN, or its data dir), or replay the spool "
                "with `h3d import` on the daemon the run belongs to",
                self.client.url,
                why,
                self.spool_file.path,
            )
        elif self.online:
            self._warn_once(
                "offline",
                "h3: daemon unreachable (%s); spooling to %s until it answers",
                why,
                self.spool_file.path,
            )
        self.online = False
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._max_backoff_s, self._backoff_s * 2)

    def ready(self) -> bool:
        return self.online or time.monotonic() >= self._retry_at

    def _stamped(self, request: Request) -> Request:
        if self._rank_prefix is None or request.op != "batches":
            return request
        return request._replace(body=self._rank_prefix + request.body[1:])

    def send(self, request: Request) -> Outcome:
        request = self._stamped(request)
        try:
            if self.spool_file.exists():  # what waited goes first, in order
                result = replay_spool(self.client, self.spool_file.path.parent, self.run_id)
                if result["failed"]:
                    raise H3ConnectionError("spool replay did not complete")
                if not self.online:
                    logger.info("h3: daemon answers again; spool replayed")
            self.client.post_json(self.run_id, request.op, request.body)
        except H3ConnectionError as exc:
            self.offline(str(exc))
            return "down"
        except H3HTTPStatusError as exc:
            if already_done(request.op, exc.code):
                return "sent"
            if exc.status_code >= 500 or exc.status_code == 429:
                self.offline(str(exc))
                return "down"
            if exc.status_code in (401, 403):  # not the data's fault: keep it for a daemon
                self.offline(str(exc), refused=True)  # that takes it
                return "down"
            if exc.status_code == 413 and request.op == "batches":
                return "too_large"  # the worker sends its batches again, fewer at a time
            self._warn_once(exc.code, "h3: the daemon refused %s: %s", request.op, exc)
            return "rejected"
        self.online, self._backoff_s = True, 0.5
        return "sent"

    def spool(self, request: Request) -> bool:
        request = self._stamped(request)
        try:
            self.spool_file.append(request.op, request.body)
            if request.op == "update" and b'"status"' in request.body:
                self.status_spooled = True
        except OSError as exc:
            self._warn_once(
                "disk",
                "h3: cannot write the spool %s (%s): keeping batches in memory and retrying",
                self.spool_file.path,
                exc,
            )
            return False
        return True

    def shutdown(self) -> None:
        self.client.close()
