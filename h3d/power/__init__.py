"""Power backends: one small protocol, one module per vendor, fakes at this seam only."""

from __future__ import annotations

from h3d.power.base import DeviceInfo, PowerBackend, PowerBackendError, PowerReading

__all__ = ["DeviceInfo", "PowerBackend", "PowerBackendError", "PowerReading"]
