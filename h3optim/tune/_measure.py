"""What a trial costs besides energy: peak memory (sampled) and FLOPs (counted)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn


def _trim_heap() -> None:
    """Give freed heap back to the OS, so a trial's RSS baseline is not the last one's peak."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)
    except OSError:
        pass


def _rss_bytes(proc: Any, children: list[Any]) -> int:
    """RSS of this process and the given children (DataLoader workers count too)."""
    total = int(proc.memory_info().rss)
    for child in children:
        with contextlib.suppress(Exception):  # the child exited between listing and reading
            total += int(child.memory_info().rss)
    return total


class PeakMemory:
    """The peak memory of what runs inside ``with PeakMemory(device):``.

    On CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) after a reset,
    exact. On the CPU: process RSS (plus children's) sampled every ``interval_s`` by a thread,
    after handing freed heap back to the OS; ``rise_bytes`` is the peak over the RSS at entry,
    the part the trial itself added. A peak shorter than the interval can be missed. With
    ``children=True`` (DataLoader workers) child processes count too; listing them scans
    ``/proc`` (~20 ms on a busy host), so the list is refreshed only every ``children_every_s``.
    """

    def __init__(
        self,
        device: torch.device,
        interval_s: float = 0.005,
        *,
        children: bool = False,
        children_every_s: float = 0.5,
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.children = children
        self.children_every_s = children_every_s
        self.source = "cuda_allocator" if device.type == "cuda" else "rss_sampled"
        self.base_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: Any = None

    @property
    def rise_bytes(self) -> int:
        return max(0, self.peak_bytes - self.base_bytes)

    def _kids(self) -> list[Any]:
        return list(self._proc.children(recursive=True)) if self.children else []

    def _sample(self) -> None:
        kids, listed = self._kids(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            if self.children and time.monotonic() - listed > self.children_every_s:
                kids, listed = self._kids(), time.monotonic()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes(self._proc, kids))

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = self.peak_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        import psutil

        _trim_heap()
        self._proc = psutil.Process()
        self.base_bytes = self.peak_bytes = _rss_bytes(self._proc, [])
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="h3tune-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes(self._proc, self._kids()))


def count_flops(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], Any],
) -> int:
    """FLOPs of one training step (forward + backward) on ``x``, on a copy of ``model``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; a
    recomputed (checkpointed) forward is counted again, as it is run again).
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    m.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            out = m(x)
        loss(out.float(), y).backward()  # type: ignore[no-untyped-call]
    return int(counter.get_total_flops())
