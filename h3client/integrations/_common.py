"""What the framework callbacks share."""

from __future__ import annotations

from typing import Any

from h3client.profiler import H3Profiler


def open_profiler(kwargs: dict[str, Any], *, rank: int, world_size: int) -> H3Profiler:
    """A started profiler from a callback's arguments, on the framework's rank (an explicit
    ``rank``/``world_size`` argument wins).

    The framework's figures are passed even for a single process (``world_size=1``): they
    win over the launcher's environment, so one process in a multi-task SLURM allocation
    (an ``salloc -n 4`` shell) is a single-process run, not rank 0 of 4."""
    kw = dict(kwargs)
    if "rank" not in kw and "world_size" not in kw:
        kw["rank"], kw["world_size"] = rank, world_size
    return H3Profiler(**kw)
