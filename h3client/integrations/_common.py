"""What the framework callbacks share."""

from __future__ import annotations

from typing import Any

from h3client.profiler import H3Profiler


def open_profiler(kwargs: dict[str, Any], *, rank: int, world_size: int) -> H3Profiler:
    """A started profiler from a callback's arguments, on the framework's rank (an explicit
    ``rank``/``world_size`` argument wins)."""
    kw = dict(kwargs)
    if world_size > 1:
        kw.setdefault("rank", rank)
        kw.setdefault("world_size", world_size)
    return H3Profiler(**kw)
