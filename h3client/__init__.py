"""h3client: stream a training loop's losses to the local h3d daemon without slowing it.

``import h3client`` pulls in httpx and nothing heavier: torch is touched only through the
tensors a caller hands over.
"""

from __future__ import annotations

from h3client._spool import replay_spool
from h3client.client import Client
from h3client.errors import H3ClientError, H3ConnectionError, H3HTTPStatusError, H3RunNotFound
from h3client.profiler import H3Profiler
from h3client.report import ThermoAuditLogger, explain_thermo_log
from h3client.tracker import EnergyTracker

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
