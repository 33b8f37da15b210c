"""Errors the daemon raises, each with the HTTP status and the stable code it is served as.

H3DError
├── Unauthorized          401 unauthorized
├── NotFound              404 not_found
│   └── RunNotFound       404 run_not_found
├── RunFinished           409 run_finished
├── AmbiguousRun          409 ambiguous_run (a run reference that matches several runs)
├── PayloadTooLarge       413 payload_too_large
├── InvalidInput          422 validation_error
│   └── NonFiniteLoss     422 nonfinite_loss
├── StorageUnavailable    503 storage_unavailable
├── SchemaMismatch        (start-up only) the database is not at this version's revision
└── NodeTaken             (start-up only) a live daemon samples as this node in this store
"""

from __future__ import annotations

from typing import Any


class H3DError(Exception):
    """Root of every error the daemon raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class Unauthorized(H3DError):
    """A /v1 request without the daemon's bearer token."""

    status_code = 401
    code = "unauthorized"


class NotFound(H3DError):
    """Something named in the path does not exist."""

    status_code = 404
    code = "not_found"


class RunNotFound(NotFound):
    """No run has that id."""

    code = "run_not_found"

    def __init__(self, run_id: str, *, by: str = "id") -> None:
        super().__init__(f"no run with {by} {run_id!r}", details={"run_id": run_id})


class RunFinished(H3DError):
    """Ingest into a run that is finished or failed."""

    status_code = 409
    code = "run_finished"


class RunRunning(H3DError):
    """A delete of a run that is still running (its client would go on sending to it)."""

    status_code = 409
    code = "run_running"


class AmbiguousRun(H3DError):
    """A run reference (an id prefix) that matches more than one run; names the candidates."""

    status_code = 409
    code = "ambiguous_run"


class RunExists(H3DError):
    """A create with a client-chosen id that is taken (a replayed create is one)."""

    status_code = 409
    code = "run_exists"


class PayloadTooLarge(H3DError):
    """A request body (after decompression) over the configured limit."""

    status_code = 413
    code = "payload_too_large"


class InvalidInput(H3DError):
    """A request that parses but says something impossible."""

    status_code = 422
    code = "validation_error"


class NonFiniteLoss(InvalidInput):
    """A NaN or infinite loss sent as a number rather than as ``null``."""

    code = "nonfinite_loss"


class StorageUnavailable(H3DError):
    """The database cannot be reached or is locked beyond the busy timeout."""

    status_code = 503
    code = "storage_unavailable"


class SchemaMismatch(H3DError):
    """The database's Alembic revision is not this version's head."""

    status_code = 503
    code = "schema_mismatch"


class NodeTaken(H3DError):
    """Another live daemon already samples as this node in this store."""

    status_code = 503
    code = "node_taken"
