"""Tensors on XPU and MPS devices are copied off the device without blocking, as CUDA's are;
on a device torch offers no event for, the copy blocks and the values still arrive.

No XPU or Apple GPU here: torch's backends are replaced at the hardware seam
(``_batching.backend_module``) with objects of their surface, and the tensors with objects
of a device tensor's surface whose non-blocking copy lands only when an event recorded after
it on its device is waited on, as on the real devices."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from h3client import Client, H3Profiler, _batching
from tests.conftest import Daemon
from tests.h3client.test_batching import decoded, item, unpack
from tests.h3client.test_profiler import stored_sample_losses

#: Work enqueued on each fake device and not yet done, in order.
QUEUES: dict[torch.device, list[Callable[[], Any]]] = {}


class DeviceTensor:
    """A tensor on a device that is neither the CPU nor CUDA: detach, is_cpu, is_cuda, device,
    to(device, non_blocking, copy)."""

    is_cuda = is_cpu = False

    def __init__(self, value: torch.Tensor, device: str) -> None:
        self.value = value
        self.device = torch.device(device)
        self.copies: list[tuple[str, bool, str]] = []  # (to, non_blocking, calling thread)

    def detach(self) -> DeviceTensor:
        return self

    def to(self, device: str, non_blocking: bool = False, copy: bool = False) -> torch.Tensor:
        self.copies.append((device, non_blocking, threading.current_thread().name))
        if not non_blocking:  # waits for the device: the values are there when it returns
            return self.value.clone()
        host = torch.full_like(self.value, -1)  # written when the device gets there
        QUEUES.setdefault(self.device, []).append(partial(host.copy_, self.value.clone()))
        return host


class Event:
    """An event of ``torch.xpu.Event``'s or ``torch.mps.Event``'s surface: it orders the work
    enqueued on its device before ``record``; ``synchronize`` waits for (does) that work."""

    made: list[Event] = []

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.work: list[Callable[[], Any]] = []
        self.synced_on: str | None = None
        Event.made.append(self)

    def _record(self, device: torch.device) -> None:
        self.device, self.work = device, QUEUES.pop(device, [])

    def synchronize(self) -> None:
        assert self.device is not None, "waited on before it was recorded"
        for work in self.work:
            work()
        self.synced_on = threading.current_thread().name


class XpuEvent(Event):
    def record(self, stream: tuple[str, torch.device]) -> None:
        assert stream[0] == "current stream of"
        self._record(stream[1])


class MpsEvent(Event):
    def record(self) -> None:  # torch.mps.Event.record takes no stream: MPS has one
        self._record(torch.device("mps"))


class FakeXpu:
    """``torch.xpu``'s surface at the seam: Event, current_stream(device)."""

    Event = XpuEvent

    @staticmethod
    def current_stream(device: torch.device) -> tuple[str, torch.device]:
        return ("current stream of", device)


class FakeMps:
    """``torch.mps``'s surface at the seam: Event."""

    Event = MpsEvent


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """torch.xpu and torch.mps replaced at the seam; the events made through them."""
    QUEUES.clear()
    Event.made = []
    backends = {"xpu": FakeXpu, "mps": FakeMps}
    monkeypatch.setattr(_batching, "backend_module", backends.__getitem__)
    return Event.made


@pytest.mark.parametrize("device", ["xpu:1", "mps"])
def test_an_xpu_or_mps_tensor_is_copied_without_blocking_and_read_by_the_sender(
    events: list[Event], device: str
) -> None:
    vec = DeviceTensor(torch.tensor([0.5, 1.5]), device)
    snap = _batching.snapshot(vec)
    assert type(snap) is _batching.PendingCopy
    assert [c[:2] for c in vec.copies] == [("cpu", True)]  # enqueued, not waited for
    assert snap.host.tolist() == [-1, -1] and events[0].synced_on is None
    assert events[0].device == torch.device(device)  # recorded after the copy, on its device
    rows, _ = decoded([item(0, 0.25, losses=snap)])
    assert unpack(rows[0]["losses_f32"], "f") == [0.5, 1.5]  # the event was waited on


def test_a_tensor_on_a_device_without_events_is_copied_blocking() -> None:
    loss = DeviceTensor(torch.tensor(0.75), "hpu")
    snap = _batching.snapshot_loss(loss)
    assert loss.copies == [("cpu", False, threading.current_thread().name)]
    rows, _ = decoded([item(0, snap)])
    assert rows[0]["loss"] == 0.75


def test_log_batch_copies_xpu_and_mps_tensors_off_the_training_thread(
    daemon: Daemon, events: list[Event]
) -> None:
    """One event per device and call, recorded after that call's copies; the sender waits on
    them, never the training thread, and the daemon stores the values logged."""
    prof = H3Profiler("xpu-mps", url=daemon.url, data_dir=daemon.data_dir)
    vec, idx = torch.tensor([0.5, 1.5, 2.5]), torch.tensor([7, 8, 9])
    logged = [
        DeviceTensor(torch.tensor(0.25), "mps"),
        DeviceTensor(vec, "mps"),
        DeviceTensor(idx, "xpu:0"),
    ]
    prof.log_batch(logged[0], losses=logged[1], indices=logged[2])
    loss = DeviceTensor(torch.tensor(0.75), "xpu:1")
    prof.log_batch(loss, losses=vec * 2, indices=idx + 3)  # CPU tensors: copied in the call
    res = prof.stop()
    assert res["batches_posted"] == 2 and res["log_errors"] == 0
    assert [e.device for e in events] == [
        torch.device("mps"),
        torch.device("xpu:0"),
        torch.device("xpu:1"),
    ]
    main = threading.current_thread().name
    assert all(t.copies == [("cpu", True, main)] for t in [*logged, loss])
    assert all(e.synced_on not in (None, main) for e in events)
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert [v for _t, v in c.series(str(prof.run_id), "loss")] == [0.25, 0.75]
    stored = stored_sample_losses(daemon, str(prof.run_id), 2)
    assert stored == [([0.5, 1.5, 2.5], [7, 8, 9]), ([1.0, 3.0, 5.0], [10, 11, 12])]
