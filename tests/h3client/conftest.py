from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from h3client import _daemon


@pytest.fixture(autouse=True)
def _quiet_httpx() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture
def started_daemons() -> Iterator[None]:
    """Stop the daemons ``ensure_daemon`` started during the test (and only those)."""
    yield
    for proc in _daemon._started:
        proc.terminate()
        proc.wait(timeout=30)
    _daemon._started.clear()


# --- the CUDA seam: torch.cuda and a CUDA tensor, as h3client._batching uses them ----------


class FakeCudaTensor:
    """A CUDA tensor's surface at the seam: is_cuda, device, detach, to(device, non_blocking)."""

    is_cuda = True

    def __init__(self, value: torch.Tensor, device: str = "cuda:0") -> None:
        self.value = value
        self.device = device
        self.copies: list[tuple[str, bool]] = []
        self.detaches = 0

    def detach(self) -> FakeCudaTensor:
        self.detaches += 1
        return self

    def to(self, device: str, non_blocking: bool = False) -> torch.Tensor:
        self.copies.append((device, non_blocking))
        return self.value.clone()


class FakeEvent:
    """``torch.cuda.Event``'s surface: record(stream=None), synchronize()."""

    made: list[FakeEvent] = []

    def __init__(self) -> None:
        self.recorded = self.synced = False
        self.stream: Any = None
        FakeEvent.made.append(self)

    def record(self, stream: Any = None) -> None:
        self.recorded, self.stream = True, stream

    def synchronize(self) -> None:
        assert self.recorded
        self.synced = True


class FakeCuda:
    """``torch.cuda``'s surface at the seam: Event, current_stream(device)."""

    Event = FakeEvent

    @staticmethod
    def current_stream(device: Any = None) -> tuple[str, Any]:
        return ("current stream of", device)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[FakeEvent]:
    """torch.cuda replaced at the seam; the events made through it."""
    from h3client import _batching

    FakeEvent.made = []
    monkeypatch.setattr(_batching, "cuda_module", lambda: FakeCuda)
    return FakeEvent.made
