"""Exporters: where the background worker sends what the training loop logged.

``HttpExporter`` posts to the daemon; while the daemon is unreachable it appends to the
run's spool (never drops), backs off, and replays the spool in order once the daemon answers.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from h3client._spool import Spool, replay_spool
from h3client.client import Client
from h3client.errors import H3ConnectionError, H3HTTPStatusError

logger = logging.getLogger(__name__)


class Exporter(Protocol):
    """Takes one operation ("create", "batches", "epochs", "update"); never raises."""

    def export(self, op: str, body: dict[str, Any]) -> None: ...

    def spill(self, op: str, body: dict[str, Any]) -> None:
        """Keep ``body`` for later without sending it (the queue is overflowing)."""
        ...

    def shutdown(self) -> None: ...


class HttpExporter:
    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        max_backoff_s: float = 10.0,
        rank: int | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.rank = rank  # a distributed run's rank: stamped on every batch it sends
        self.spool = Spool(client.config.spool_dir, run_id)
        self.online = True
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self._max_backoff_s = max_backoff_s
        self.posted = 0  # batches acknowledged by the daemon
        self.spooled = 0  # batches written to the spool
        self.lost = 0  # batches neither posted nor spooled (disk full): reported at stop()
        self.rejected = 0  # batches the daemon refused as invalid (4xx)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    @staticmethod
    def _count(op: str, body: dict[str, Any]) -> int:
        return len(body.get("batches", ())) if op == "batches" else 0

    def _stamped(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.rank is not None and op == "batches":
            for b in body["batches"]:
                b["rank"] = self.rank
        return body

    def spill(self, op: str, body: dict[str, Any]) -> None:
        self._to_spool(op, self._stamped(op, body))

    def _to_spool(self, op: str, body: dict[str, Any]) -> None:
        try:
            self.spool.append(op, body)
            self.spooled += self._count(op, body)
        except OSError as exc:
            self.lost += self._count(op, body)
            self._warn_once(
                "lost", "h3: cannot spool to %s (%s): losses are being lost", self.spool.path, exc
            )

    def _offline(self, why: str) -> None:
        if self.online:
            self._warn_once(
                "offline",
                "h3: daemon unreachable (%s); spooling to %s until it answers",
                why,
                self.spool.path,
            )
        self.online = False
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._max_backoff_s, self._backoff_s * 2)

    def _send(self, op: str, body: dict[str, Any]) -> None:
        if op == "create":
            self.client.create_run(**body)
        elif op == "batches":
            self.client.post_batches(self.run_id, body["batches"], nonfinite_as_null=True)
        elif op == "epochs":
            self.client.post_epochs(self.run_id, body["epochs"])
        elif op == "update":
            self.client.update_run(self.run_id, **body)

    def export(self, op: str, body: dict[str, Any]) -> None:
        body = self._stamped(op, body)
        if not self.online and time.monotonic() < self._retry_at:
            self._to_spool(op, body)
            return
        try:
            if self.spool.exists():  # what waited goes first, in order
                result = replay_spool(self.client, self.spool.path.parent, self.run_id)
                if result["failed"]:
                    raise H3ConnectionError("spool replay did not complete")
                if not self.online:
                    logger.info("h3: daemon answers again; spool replayed")
            self._send(op, body)
            self.posted += self._count(op, body)
            self.online, self._backoff_s = True, 0.5
        except H3ConnectionError as exc:
            self._offline(str(exc))
            self._to_spool(op, body)
        except H3HTTPStatusError as exc:
            if exc.code in ("run_exists", "run_finished") and op in ("create", "update"):
                return  # already done (a resumed or replayed run)
            if exc.status_code >= 500:
                self._offline(str(exc))
                self._to_spool(op, body)
                return
            self.rejected += self._count(op, body)
            self._warn_once(exc.code, "h3: the daemon refused %s: %s", op, exc)

    def shutdown(self) -> None:
        self.client.close()
