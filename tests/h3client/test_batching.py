"""The background worker, with an in-memory exporter: never blocks, never raises, never loses."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch

from h3client._batching import BatchProcessor, to_wire


class Memory:
    """An exporter that keeps what it is given (and can be made slow or failing)."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.spilled: list[tuple[str, dict[str, Any]]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.shut = 0
        self.release = threading.Event()
        self.release.set()

    def export(self, op: str, body: dict[str, Any]) -> None:
        self.release.wait()
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("exporter bug")
        self.sent.append((op, body))

    def spill(self, op: str, body: dict[str, Any]) -> None:
        self.spilled.append((op, body))

    def shutdown(self) -> None:
        self.shut += 1

    def seqs(self) -> list[int]:
        return [
            b["seq"]
            for op, body in self.sent + self.spilled
            if op == "batches"
            for b in body["batches"]
        ]


def unpack(text: str, code: str) -> list:
    import base64
    from array import array

    a = array(code)
    a.frombytes(base64.b64decode(text))
    return a.tolist()


def item(seq: int, loss: Any = 1.0, **kw: Any) -> tuple:
    return (seq, 1000.0 + seq, loss, kw.get("losses"), kw.get("indices"), kw.get("n"), 0, seq, None)


def test_items_are_exported_in_order_in_large_requests() -> None:
    mem = Memory()
    p = BatchProcessor(mem, max_batch=500, flush_interval_s=0.05)
    p.add("create", {"id": "x"})
    for s in range(2000):
        p.add_batch(item(s))
    p.add("epochs", {"epochs": [{"epoch": 0}]})
    assert p.flush(5.0)
    assert mem.sent[0][0] == "create"
    assert mem.seqs() == list(range(2000))
    assert all(len(body["batches"]) <= 500 for op, body in mem.sent if op == "batches")
    assert mem.sent[-1][0] == "epochs"
    assert p.close() and p.close()  # idempotent
    assert mem.shut == 1


def test_tensors_are_read_on_the_worker_and_nonfinite_becomes_null() -> None:
    loss = torch.tensor(0.5, requires_grad=True) * 2
    losses = torch.tensor([0.1, float("nan"), float("inf"), 2.0])
    d = to_wire(item(3, loss.detach(), losses=losses, indices=torch.tensor([4, 5, 6, 7])))
    vals, idx = unpack(d["losses_f32"], "f"), unpack(d["indices_i64"], "q")
    assert d["loss"] == 1.0 and vals[0] == torch.tensor(0.1).item() and vals[3] == 2.0
    assert all(math.isnan(v) for v in vals[1:3]) and idx == [4, 5, 6, 7] and d["n"] == 4
    # plain Python sequences pack the same way
    d2 = to_wire(item(4, 1.0, losses=[0.5, float("inf")], indices=[9, 10]))
    assert unpack(d2["indices_i64"], "q") == [9, 10] and math.isnan(
        unpack(d2["losses_f32"], "f")[1]
    )
    assert to_wire(item(4, float("nan")))["loss"] is None
    assert to_wire(item(5, math.inf))["loss"] is None


def test_a_stalled_exporter_never_blocks_the_training_thread_and_overflow_spills() -> None:
    mem = Memory()
    mem.release.clear()  # the daemon hangs
    p = BatchProcessor(mem, max_batch=100, flush_interval_s=0.01, max_queue=1000)
    p.add_batch(item(0))
    time.sleep(0.05)  # the worker is now stuck in export
    t0 = time.perf_counter()
    for s in range(1, 3001):
        p.add_batch(item(s))
    assert time.perf_counter() - t0 < 1.0  # appends, no waiting
    mem.release.set()
    assert p.flush(10.0)
    assert sorted(mem.seqs()) == list(range(3001))  # nothing lost
    assert mem.spilled  # what was behind by more than max_queue went to the spool
    p.close()


def test_hard_limit_drops_oldest_and_counts() -> None:
    mem = Memory()
    mem.release.clear()
    p = BatchProcessor(mem, max_batch=10, flush_interval_s=0.01, max_queue=10)
    p.add_batch(item(0))
    time.sleep(0.05)
    for s in range(1, 101):
        p.add_batch(item(s))
    assert p.dropped == 101 - 1 - p.hard_limit
    mem.release.set()
    p.close()


def test_exporter_errors_do_not_kill_the_worker() -> None:
    mem = Memory(fail=True)
    p = BatchProcessor(mem, max_batch=10, flush_interval_s=0.01)
    p.add_batch(item(0))
    time.sleep(0.1)
    mem.fail = False
    p.add_batch(item(1))
    assert p.flush(5.0)
    assert 1 in mem.seqs()
    p.close()


class FakeCudaTensor:
    """A CUDA tensor's surface at the seam: is_cuda, detach, to(device, non_blocking)."""

    is_cuda = True

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.copies: list[tuple[str, bool]] = []

    def detach(self) -> FakeCudaTensor:
        return self

    def to(self, device: str, non_blocking: bool = False) -> torch.Tensor:
        self.copies.append((device, non_blocking))
        return self.value.clone()


class FakeEvent:
    def __init__(self) -> None:
        self.recorded = self.synced = False

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded
        self.synced = True


def test_cuda_losses_are_copied_without_blocking_and_read_on_the_worker(monkeypatch) -> None:
    from h3client import _batching

    events: list[FakeEvent] = []
    monkeypatch.setattr(
        _batching, "event_factory", lambda: events.append(FakeEvent()) or events[-1]
    )
    loss = FakeCudaTensor(torch.tensor(0.25))
    vec = FakeCudaTensor(torch.tensor([0.5, float("nan")]))
    pending = _batching.off_device(loss)
    assert loss.copies == [("cpu", True)] and not events[0].synced  # enqueued, not awaited
    d = to_wire(item(0, pending, losses=_batching.off_device(vec)))
    vals = unpack(d["losses_f32"], "f")
    assert d["loss"] == 0.25 and vals[0] == 0.5 and math.isnan(vals[1])
    assert all(e.synced for e in events)  # the sender thread waited, on the event
