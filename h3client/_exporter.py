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
answers again, so the daemon sees the operations in the order they were logged. A 401 or
403 with a token read from the data dir (none given) reads ``<data dir>/token`` again and,
if it changed, tries once more at once: a daemon that started after the profiler, on a
fresh data dir, writes its token then. A URL found (not given) is sent nothing until what
answers there proves it holds the token (``Client.proven``, asked here, on the sender
thread, and again after an outage): until then the daemon counts as unreachable; each try
after an outage reads the data dir's ``daemon.json`` again first, and follows a daemon
started since on another port (``Client.rediscover``). A resumed run's create says it is one
(``RESUME_HEADERS``), so that the daemon follows this process, not the one that died. After
an outage, the run's create is sent again so, before anything else: a daemon whose reaper
failed the run meanwhile (no request for ``H3D_RUN_TIMEOUT_S``) reopens it, as it does for
a resumed profiler, and the batches that follow are stored, not refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from h3client._config import UnsafeDir
from h3client._spool import Spool, already_done, replay_file
from h3client.client import RESUME_HEADERS, Client, columns_as_json
from h3client.errors import H3ConnectionError, H3HTTPStatusError

if TYPE_CHECKING:
    from h3client._daemon import DaemonStart

logger = logging.getLogger(__name__)

Outcome = Literal["sent", "rejected", "down", "too_large"]


class Request(NamedTuple):
    """One operation, encoded once: what is posted and, if need be, what is spooled."""

    op: str  # "create", "batches", "epochs", "update"
    body: bytes  # the request body: JSON text, UTF-8, or with ``binary`` the binary form
    n_batches: int = 0  # batches it carries
    binary: bool = False  # a batches body in the binary form (client.COLUMNS_MEDIA_TYPE)


class Exporter(Protocol):
    """Where requests go. None of its methods raises."""

    def ready(self) -> bool: ...

    def send(self, request: Request) -> Outcome: ...

    def spool(self, request: Request) -> bool: ...

    def shutdown(self) -> None: ...


def as_json(request: Request) -> Request:
    """``request`` with a binary batches body in the JSON form (:func:`columns_as_json`)."""
    if not request.binary:
        return request
    return request._replace(body=columns_as_json(request.body), binary=False)


def _refuses_binary(exc: H3HTTPStatusError) -> bool:
    """Whether the daemon refused a body for its Content-Type (a daemon that reads batches
    as JSON only answers the binary form so), not for what it holds."""
    details = exc.details
    return exc.status_code == 415 or (
        exc.status_code == 422 and isinstance(details, dict) and "content_type" in details
    )


class HttpExporter:
    """Posts to the daemon through ``client``; spools to ``<data dir>/spool/<run id>.jsonl``."""

    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        max_backoff_s: float = 10.0,
        rank: int | None = None,
        resume: bool = False,
        starting: DaemonStart | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        # the daemon this profiler started, which reads power but does not serve yet: the
        # first send waits for it (its URL is in its daemon.json once it serves)
        self.starting = starting
        # a resumed run: its create asks the daemon to follow this process
        self.resume = resume
        # the run's create (its body, as sent or spooled); whether the daemon has the run
        # (a request of it was stored: the create goes first); whether the create is sent
        # again, as a resumed run's, before anything else after an outage (the daemon's
        # reaper may have failed the run meanwhile: the create reopens it); and whether a
        # resumed run's create went to the spool (no daemon then): it is sent again, as
        # such, once the spool is replayed, so that the daemon follows this process
        self._create: bytes | None = None
        self._stored = False
        self._reopen = False
        self._follow = False
        # a distributed run's rank: every batches request says which rank logged it
        self._rank_prefix = None if rank is None else f'{{"rank":{int(rank)},'.encode()
        self.spool_file = Spool(client.config.spool_dir, run_id)
        self.online = True
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self._max_backoff_s = max_backoff_s
        self._warned: set[str] = set()
        self.status_spooled = False  # a run status (the final one, at stop) is in the spool
        self._json_only = False  # the daemon refused the binary form of batches: JSON only

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
        else:
            if self.online:
                self._warn_once(
                    "offline",
                    "h3: daemon unreachable (%s); spooling to %s until it answers",
                    why,
                    self.spool_file.path,
                )
            self.client.forget_proof()  # the next try asks a found URL for its proof again
        self.online = False
        self._reopen = self._stored
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._max_backoff_s, self._backoff_s * 2)

    def ready(self) -> bool:
        return self.online or time.monotonic() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until the next try is worth making (0 when online)."""
        return 0.0 if self.online else max(0.0, self._retry_at - time.monotonic())

    def _stamped(self, request: Request) -> Request:
        if self._rank_prefix is None or request.op != "batches":
            return request
        return request._replace(body=self._rank_prefix + request.body[1:])

    def _replay(self) -> None:
        """Replay what waits in the spool; raise H3ConnectionError if it is not all stored
        (401 and 403 as they are: a refusal of the token, not of the data)."""
        path = self.spool_file.path
        try:
            replay_file(self.client, path)
        except FileNotFoundError:
            return  # nothing waits, or another process replayed it
        except H3HTTPStatusError as exc:
            if exc.status_code in (401, 403):
                raise
            logger.warning("spool %s not replayed: %s", path.name, exc)
            raise H3ConnectionError(f"spool replay did not complete: {exc}") from exc
        if not self.online:
            logger.info("h3: daemon answers again; spool replayed")

    def _reopen_run(self) -> None:
        """After an outage, send the run's create again as a resumed profiler's
        (``H3-Resume``), with this process's CPU time now: the daemon reopens the run if
        its reaper failed it meanwhile, and follows this process from now on (its CPU
        share counted from here, not again from the run's start). A refusal (a run its
        client ended: 409) is left to the requests that follow; no answer, a 5xx or a
        refused token is raised, and the create is sent again at the next try."""
        assert self._create is not None
        body = self._create
        try:
            fields = json.loads(body)
            if "cpu_s" in fields:
                cpu = os.times()
                fields["cpu_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
                # when it was read (the daemon keeps an existing run's own start)
                fields["created_at"] = time.time()
                body = json.dumps(fields).encode()
        except ValueError:
            pass
        try:
            self.client.post_json(self.run_id, "create", body, headers=RESUME_HEADERS)
        except H3HTTPStatusError as exc:
            if exc.status_code >= 500 or exc.status_code in (401, 403, 429):
                raise
        self._reopen = False

    def _post(self, request: Request) -> None:
        if self._reopen and self._create is not None and request.op != "create":
            self._reopen_run()  # before anything else: the replay, the request
        if self.spool_file.exists():  # what waited goes first, in order
            self._replay()
        if self._follow and request.op != "create":  # the daemon follows this process
            assert self._create is not None  # (its data is in the spool, replayed already)
            with contextlib.suppress(H3HTTPStatusError):
                self.client.post_json(self.run_id, "create", self._create, headers=RESUME_HEADERS)
            self._follow = False
        headers = RESUME_HEADERS if self.resume and request.op == "create" else None
        self.client.post_json(
            self.run_id, request.op, request.body, headers=headers, binary=request.binary
        )

    def send(self, request: Request) -> Outcome:
        request = self._stamped(request)
        if request.binary and self._json_only:
            request = as_json(request)
        if request.op == "create":
            self._create = request.body
        if self.starting is not None:  # the daemon started for this run: until it serves
            served = self.starting.wait()
            self.starting = None
            self.client.rediscover()  # its URL, from its daemon.json
            if served is None:
                self.offline(f"the daemon started for {self.client.config.data_dir} did not serve")
                return "down"
        elif not self.online:  # a try after an outage: the data dir's daemon may have moved
            self.client.rediscover()
        retried = False
        while True:
            if not self.client.proven():  # a found URL: no token, no run, until proven
                self.offline(
                    f"what answers at {self.client.url} did not prove that it serves the "
                    f"data dir {self.client.config.data_dir}"
                )
                return "down"
            try:
                self._post(request)
            except H3ConnectionError as exc:
                self.offline(str(exc))
                return "down"
            except H3HTTPStatusError as exc:
                if exc.status_code >= 500 or exc.status_code == 429:
                    self.offline(str(exc))
                    return "down"
                if exc.status_code in (401, 403):  # not the data's fault: keep it for a
                    if not retried and self.client.reload_token():  # daemon that takes it
                        retried = True  # the data dir's token was written (or changed)
                        continue
                    self.offline(str(exc), refused=True)
                    return "down"
                self.online, self._backoff_s = True, 0.5  # it answered: it is up
                if request.binary and _refuses_binary(exc):
                    # a daemon older than the binary form (one started before an upgrade
                    # keeps running): JSON from now on, this request at once
                    self._json_only, request = True, as_json(request)
                    logger.info("h3: the daemon reads JSON batches only; sending those")
                    continue
                if already_done(request.op, exc.code):
                    self._stored = True
                    return "sent"
                if exc.status_code == 413 and request.op == "batches":
                    return "too_large"  # the worker sends its batches again, fewer at a time
                self._warn_once(exc.code, "h3: the daemon refused %s: %s", request.op, exc)
                return "rejected"
            self.online, self._backoff_s, self._stored = True, 0.5, True
            return "sent"

    def spool(self, request: Request) -> bool:
        request = as_json(self._stamped(request))  # the spool's lines are JSON
        try:
            self.spool_file.append(request.op, request.body)
            if request.op == "update" and b'"status"' in request.body:
                self.status_spooled = True
            elif request.op == "create":
                self._create = request.body
                self._follow = self.resume
        except UnsafeDir as exc:  # retried (a `chmod go-w` makes it usable), then lost
            self._warn_once("unsafe", "h3: not spooling: %s", exc)
            return False
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
