"""h3client: stream a training loop's losses to the local h3d daemon without slowing it.

``import h3client`` is light (budget: 50 ms over a bare interpreter): httpx is imported by
the profiler's sender thread when it first sends, the report tools when first used, and torch
is touched only through the tensors a caller hands over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h3client._spool import replay_spool
from h3client.client import Client
from h3client.errors import H3ClientError, H3ConnectionError, H3HTTPStatusError, H3RunNotFound
from h3client.profiler import H3Profiler
from h3client.tracker import EnergyTracker

if TYPE_CHECKING:
    from h3client.report import ThermoAuditLogger, explain_thermo_log

_LAZY = {"ThermoAuditLogger": "h3client.report", "explain_thermo_log": "h3client.report"}


def __getattr__(name: str) -> Any:
    """The audit-log tools, imported on first use (argparse and csv are not free)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'h3client' has no attribute {name!r}")


__all__ = [
    "Client",
    "EnergyTracker",
    "H3ClientError",
    "H3ConnectionError",
    "H3HTTPStatusError",
    "H3Profiler",
    "H3RunNotFound",
    "ThermoAuditLogger",
    "explain_thermo_log",
    "replay_spool",
]
