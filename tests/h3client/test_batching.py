"""The background worker, with an in-memory exporter: never blocks, never raises, never loses."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from array import array
from typing import Any

import pytest
import torch

from h3client import client
from h3client._batching import BatchProcessor, encode_batches
from h3client._exporter import Outcome, Request, as_json
from h3client._spool import batch_seqs
from tests.h3client.conftest import FakeCudaTensor, FakeEvent


class Memory:
    """An exporter that keeps what it is given; its daemon and its disk can be made to hang,
    fail or go away."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.spilled: list[tuple[str, dict[str, Any]]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.up = True  # the daemon answers
        self.disk = True  # the disk takes writes
        self.shut = 0
        self.release = threading.Event()
        self.release.set()
        self.sending = threading.Event()

    def ready(self) -> bool:
        return self.up

    def send(self, req: Request) -> Outcome:
        self.sending.set()
        self.release.wait()
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("exporter bug")
        if not self.up:
            return "down"
        self.sent.append((req.op, json.loads(as_json(req).body)))
        return "sent"

    def spool(self, req: Request) -> bool:
        if not self.disk:
            return False
        self.spilled.append((req.op, json.loads(as_json(req).body)))
        return True

    def shutdown(self) -> None:
        self.shut += 1

    def seqs(self, where: str = "both") -> list[int]:
        ops = {"sent": self.sent, "spilled": self.spilled}.get(where, self.sent + self.spilled)
        return [seq for op, body in ops if op == "batches" for seq in batch_seqs(body)]


def unpack(text: str, code: str) -> list[Any]:
    a = array(code)
    a.frombytes(base64.b64decode(text))
    return a.tolist()


def rows(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A batches body's batches as row objects, whichever form it came in (the daemon reads
    the columnar form this way: n defaults to the number of per-sample losses)."""
    if "batches" in body:
        return list(body["batches"])
    c = body["columns"]
    seqs, ts, losses = (
        unpack(c["seq_i64"], "q"),
        unpack(c["t_f64"], "d"),
        unpack(c["loss_f64"], "d"),
    )
    sizes = unpack(c["sizes_i64"], "q") if "sizes_i64" in c else [-1] * len(seqs)
    vecs = base64.b64decode(c.get("losses_f32", ""))
    idxs = base64.b64decode(c["indices_i64"]) if "indices_i64" in c else None
    out, at = [], 0
    for i, seq in enumerate(seqs):
        size = sizes[i]
        row = {"seq": seq, "t": ts[i], "loss": None if math.isnan(losses[i]) else losses[i]}
        row["losses_f32"] = row["indices_i64"] = None
        if size >= 0:
            row["losses_f32"] = base64.b64encode(vecs[4 * at : 4 * (at + size)]).decode()
            if idxs is not None:
                row["indices_i64"] = base64.b64encode(idxs[8 * at : 8 * (at + size)]).decode()
            at += size
        row["n"] = c["n"][i] if "n" in c else (size if size >= 0 else None)
        for name in ("epoch", "step", "phase"):
            row[name] = c[name][i] if name in c else None
        out.append(row)
    return out


def item(seq: int, loss: Any = 1.0, **kw: Any) -> tuple[Any, ...]:
    return (seq, 1000.0 + seq, loss, kw.get("losses"), kw.get("indices"), kw.get("n"), 0, seq, None)


def decoded(items: list[tuple[Any, ...]]) -> tuple[list[dict[str, Any]], int]:
    req, bad = encode_batches(items)
    assert req is not None and req.op == "batches"
    body = json.loads(as_json(req).body)
    assert body["nonfinite_as_null"] is True and req.n_batches == len(rows(body))
    return rows(body), bad


def counted(p: BatchProcessor, logged: int) -> None:
    assert p.posted + p.spooled + p.rejected + p.lost == logged


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
    assert all(len(batch_seqs(body)) <= 500 for op, body in mem.sent if op == "batches")
    assert mem.sent[-1][0] == "epochs"
    assert p.close() and p.close()  # idempotent
    assert mem.shut == 1 and p.posted == 2000
    counted(p, 2000)


def test_a_request_is_converted_as_a_whole() -> None:
    """Tensors of any shape and dtype, lists, missing vectors and NaN/inf in one request."""
    loss = torch.tensor(0.5, requires_grad=True) * 2
    items = [
        item(0, loss.detach(), losses=torch.tensor([0.1, math.nan, math.inf, 2.0]),
             indices=torch.tensor([4, 5, 6, 7], dtype=torch.int32)),
        item(1, torch.tensor(math.nan)),  # no vector: null in a request that has them
        item(2, 0.25, losses=[0.5, float("inf")], indices=[9, 10]),  # Python sequences
        item(3, torch.tensor([3.0]), losses=torch.ones(2, 3, dtype=torch.float64)),
        item(4, math.inf, n=7),
    ]  # fmt: skip
    rows, bad = decoded(items)
    assert bad == 0 and [r["seq"] for r in rows] == [0, 1, 2, 3, 4]
    vals = unpack(rows[0]["losses_f32"], "f")
    assert rows[0]["loss"] == 1.0 and vals[0] == torch.tensor(0.1).item() and vals[3] == 2.0
    assert all(math.isnan(v) for v in vals[1:3]) and rows[0]["n"] == 4
    assert unpack(rows[0]["indices_i64"], "q") == [4, 5, 6, 7]
    assert rows[1]["loss"] is None and rows[1]["losses_f32"] is None and rows[1]["n"] is None
    assert unpack(rows[2]["indices_i64"], "q") == [9, 10] and rows[2]["n"] == 2
    assert math.isnan(unpack(rows[2]["losses_f32"], "f")[1])
    assert rows[3]["loss"] == 3.0 and unpack(rows[3]["losses_f32"], "f") == [1.0] * 6
    assert rows[3]["indices_i64"] is None and rows[3]["n"] == 6
    assert rows[4]["loss"] is None and rows[4]["n"] == 7


def test_unreadable_items_are_left_out_and_counted() -> None:
    items = [
        item(0, torch.tensor([1.0, 2.0])),  # a vector passed as the loss
        item(1, 0.5, losses=torch.rand(3), indices=torch.arange(4)),  # lengths differ
        item(2, 0.5, indices=[1, 2]),  # indices without losses
        item(3, 0.5, losses=[1.0], indices=["x"]),  # an index that is no number
        item(4, torch.tensor(0.75), losses=torch.rand(2), indices=torch.arange(2)),
    ]
    rows, bad = decoded(items)
    assert bad == 4 and [r["seq"] for r in rows] == [4] and rows[0]["loss"] == 0.75
    assert encode_batches([item(0, torch.tensor([1.0, 2.0]))]) == (None, 1)


def test_a_bool_loss_is_a_number_in_either_form() -> None:
    """A bool tensor's item() is a Python bool: 1.0 or 0.0, as the packed columns write it,
    in the one-object-per-batch form too (before: ``True``, which is not JSON, and the
    daemon refused the whole request)."""
    together = [item(0, True), item(1, False), item(2, 3), item(3, math.nan)]
    got, bad = decoded(together)  # packed columns
    assert bad == 0 and [r["loss"] for r in got] == [1.0, 0.0, 3.0, None]
    unreadable = item(4, 0.5, losses=torch.rand(3), indices=torch.arange(2))
    for loss in (True, torch.tensor(True), torch.tensor(False)):
        got, bad = decoded([*together, item(5, loss), unreadable])  # the row form
        assert bad == 1 and [r["seq"] for r in got] == [0, 1, 2, 3, 5]
        assert [r["loss"] for r in got] == [1.0, 0.0, 3.0, None, float(loss)]
        assert all(type(r["loss"]) is float for r in got if r["loss"] is not None)


def test_a_batch_with_a_field_the_daemon_would_refuse_is_left_out_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # before: one such batch made the daemon refuse the whole request (422), every batch
    # of it counted rejected
    import numpy as np

    def meta(seq: int, n: Any = None, epoch: Any = 0, step: Any = None, phase: Any = None) -> Any:
        return (seq, 1000.0 + seq, 1.0, None, None, n, epoch, step, phase)

    items = [
        meta(0),
        meta(1, epoch="x"),
        meta(2, step=-5),
        meta(3, n=np.int64(3), epoch=np.int64(2), step=torch.tensor(4)),  # converted
        meta(4, phase="p" * 33),
        meta(5, epoch=True),
        meta(6, phase="thermodynamic"),
        meta(7, epoch=2**53),
    ]
    with caplog.at_level("WARNING", logger="h3client"):
        rows, bad = decoded(items)
    assert bad == 5 and [r["seq"] for r in rows] == [0, 3, 6]
    assert (rows[1]["n"], rows[1]["epoch"], rows[1]["step"]) == (3, 2, 4)
    assert rows[2]["phase"] == "thermodynamic"
    assert "epoch 'x' is not an integer" in caplog.text and "phase 'ppp" in caplog.text


class Sizes(Memory):
    """A Memory exporter that also records each request's body size."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []  # (bytes, batches)

    def send(self, req: Request) -> Outcome:
        self.sizes.append((len(req.body), req.n_batches))
        return super().send(req)

    def spool(self, req: Request) -> bool:
        self.sizes.append((len(req.body), req.n_batches))
        return super().spool(req)


def per_token(seq: int) -> tuple[Any, ...]:  # 4 096 per-sample losses: ~64 KiB a batch
    return item(seq, 1.0, losses=torch.rand(4096), indices=torch.arange(4096))


def test_batches_of_many_per_sample_losses_go_in_requests_within_the_body_limit() -> None:
    # before: one request of every batch queued, which the daemon refused whole (413)
    limit = 256 * 1024
    mem = Sizes()
    p = BatchProcessor(mem, max_batch=2000, flush_interval_s=60.0, max_request_bytes=limit)
    for k in range(40):
        p.batches.append(per_token(k))
    assert p.close(timeout_s=30)
    assert mem.seqs("sent") == list(range(40)) and p.posted == 40
    counted(p, 40)
    assert len(mem.sizes) > 1 and all(size <= limit for size, _ in mem.sizes)
    # a stop that spools (no daemon) writes spool lines within the limit too, for `h3d import`
    mem2 = Sizes()
    mem2.up = False
    p2 = BatchProcessor(mem2, max_batch=2000, flush_interval_s=60.0, max_request_bytes=limit)
    for k in range(40):
        p2.batches.append(per_token(k))
    p2.close(timeout_s=1)
    assert mem2.seqs("spilled") == list(range(40)) and p2.spooled == 40
    assert all(size <= limit for size, n in mem2.sizes if n > 1)


def test_a_stalled_exporter_never_blocks_the_training_thread_and_overflow_spills() -> None:
    mem = Memory()
    mem.release.clear()  # the daemon hangs
    p = BatchProcessor(mem, max_batch=100, flush_interval_s=0.01, max_queue=1000)
    p.add_batch(item(0))
    assert mem.sending.wait(5.0)  # the worker is now stuck in send
    t0 = time.perf_counter()
    for s in range(1, 3001):
        p.add_batch(item(s))
    assert time.perf_counter() - t0 < 1.0  # appends, no waiting
    mem.release.set()
    assert p.flush(10.0)
    assert sorted(mem.seqs()) == list(range(3001))  # nothing lost
    assert mem.spilled  # what was behind by more than max_queue went to the spool
    p.close()
    counted(p, 3001)


def test_hard_limit_drops_oldest_and_counts() -> None:
    mem = Memory()
    mem.release.clear()
    p = BatchProcessor(mem, max_batch=10, flush_interval_s=0.01, max_queue=10)
    p.add_batch(item(0))
    assert mem.sending.wait(5.0)
    for s in range(1, 101):
        p.add_batch(item(s))
    assert p.dropped == 101 - 1 - p.hard_limit
    mem.release.set()
    p.close()
    counted(p, 101)


def test_exporter_errors_do_not_kill_the_worker_nor_lose_the_request() -> None:
    mem = Memory(fail=True)
    p = BatchProcessor(mem, max_batch=10, flush_interval_s=0.01)
    mem.disk = False
    p.add_batch(item(0))
    assert not p.flush(0.2)  # held: the exporter raised, the disk refused
    mem.fail, mem.disk = False, True
    p.add_batch(item(1))
    assert p.flush(5.0)
    assert sorted(mem.seqs()) == [0, 1]
    p.close()
    counted(p, 2)


def test_no_daemon_and_a_full_disk_keep_batches_in_memory_and_retry() -> None:
    """Issue 11: nothing is dropped while the queue has room; it all goes once the disk does."""
    mem = Memory()
    mem.up = mem.disk = False
    p = BatchProcessor(mem, max_batch=50, flush_interval_s=0.01, max_queue=1000)
    p.add("create", {"id": "x"})
    for s in range(500):
        p.add_batch(item(s))
    p.add("update", {"status": "finished"})
    assert not p.flush(0.3)  # nowhere to go: kept, retried
    assert p.lost == 0 and not mem.sent and not mem.spilled
    mem.disk = True  # space freed
    assert p.flush(5.0)
    assert p.close() and p.lost == 0 and p.spooled == 500
    ops = [op for op, _ in mem.spilled]
    assert ops[0] == "create" and ops[-1] == "update"  # order kept: the status comes last
    assert mem.seqs("spilled") == list(range(500))
    counted(p, 500)


def test_a_stuck_daemon_close_spools_everything_by_its_deadline() -> None:
    mem = Memory()
    mem.release.clear()  # a daemon that accepts the request and never answers
    p = BatchProcessor(mem, max_batch=100, flush_interval_s=0.01)
    p.add("create", {"id": "x"})
    assert mem.sending.wait(5.0)  # the create is in flight, stuck
    for s in range(1000):
        p.add_batch(item(s, torch.tensor(0.5), losses=torch.rand(4), indices=torch.arange(4)))
    p.add("update", {"status": "finished"})
    t0 = time.monotonic()
    assert not p.close(timeout_s=1.0)
    assert time.monotonic() - t0 < 1.5
    ops = [op for op, _ in mem.spilled]
    assert ops[0] == "create" and ops[-1] == "update"  # the one in flight, ..., the status
    assert mem.seqs("spilled") == list(range(1000)) and not mem.sent
    assert p.spooled == 1000 and p.lost == 0
    counted(p, 1000)
    # the daemon answers at last: the abandoned worker ends, sends nothing more, counts nothing
    mem.release.set()
    deadline = time.monotonic() + 5
    while p.worker_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not p.worker_alive and [op for op, _ in mem.sent] == ["create"] and p.posted == 0


def test_a_stuck_daemon_and_a_full_disk_count_what_is_lost() -> None:
    mem = Memory()
    mem.release.clear()
    mem.disk = False
    p = BatchProcessor(mem, max_batch=100, flush_interval_s=0.01)
    p.add_batch(item(0))
    assert mem.sending.wait(5.0)
    for s in range(1, 250):
        p.add_batch(item(s))
    assert not p.close(timeout_s=0.5)
    assert p.lost == 250 and p.spooled == 0
    counted(p, 250)
    mem.release.set()


def test_the_worker_keeps_its_pace_with_batches_logged_during_a_request() -> None:
    mem = Memory(delay_s=0.02)
    p = BatchProcessor(mem, max_batch=1000, flush_interval_s=0.01)
    for s in range(5000):
        p.add_batch(item(s))
        if s % 500 == 0:
            time.sleep(0.005)
    assert p.close(10.0)
    assert mem.seqs() == list(range(5000))
    counted(p, 5000)


def test_cuda_losses_are_copied_without_blocking_and_read_on_the_worker(
    fake_cuda: list[FakeEvent],
) -> None:
    from h3client import _batching

    events = fake_cuda
    loss = FakeCudaTensor(torch.tensor(0.25))
    vec = FakeCudaTensor(torch.tensor([0.5, float("nan")]))
    pending = _batching.off_device(loss)
    assert loss.copies == [("cpu", True)] and not events[0].synced  # enqueued, not awaited
    rows, _ = decoded([item(0, pending, losses=_batching.off_device(vec))])
    vals = unpack(rows[0]["losses_f32"], "f")
    assert rows[0]["loss"] == 0.25 and vals[0] == 0.5 and math.isnan(vals[1])
    assert all(e.synced for e in events)  # the sender thread waited, on the event


# --- what log_batch keeps: the values at log time ------------------------------------------


def snapped(x: Any) -> Any:
    from h3client import _batching

    return _batching.snapshot(x)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32]
)
def test_a_snapshot_holds_the_values_at_log_time_whatever_happens_to_the_tensor(
    dtype: torch.dtype,
) -> None:
    vec = (torch.arange(6) * 3).to(dtype)
    idx = torch.arange(6, dtype=torch.int32) + 100
    loss = torch.tensor(1.5, dtype=dtype)
    snaps = [snapped(loss), snapped(vec), snapped(idx)]
    assert all(type(s) is tuple for s in snaps)  # bytes copied, nothing of the tensor kept
    expected, expected_loss = vec.to(torch.float32).tolist(), loss.item()
    vec.mul_(-7)  # the caller reuses its buffers in place
    idx.zero_()
    loss.fill_(99)
    rows, bad = decoded([item(0, snaps[0], losses=snaps[1], indices=snaps[2])])
    assert bad == 0
    assert rows[0]["loss"] == expected_loss and unpack(rows[0]["losses_f32"], "f") == expected
    assert unpack(rows[0]["indices_i64"], "q") == list(range(100, 106)) and rows[0]["n"] == 6


def test_a_snapshot_keeps_nothing_of_the_autograd_graph() -> None:
    import gc
    import weakref

    w = torch.randn(8, requires_grad=True)
    hidden = w * 2  # saved by the graph of what follows
    losses = hidden**2
    loss = losses.mean()
    snaps = [snapped(loss), snapped(losses)]  # requires grad, non-leaf, no warning
    kept = weakref.ref(hidden)
    expected = losses.tolist()
    del hidden, losses, loss
    gc.collect()
    assert kept() is None  # the graph (and what it saved) is gone; the snapshot is not
    rows, _ = decoded([item(0, snaps[0], losses=snaps[1])])
    assert unpack(rows[0]["losses_f32"], "f") == pytest.approx(expected)
    assert rows[0]["loss"] == pytest.approx(sum(expected) / 8)


def test_tensors_off_the_fast_path_are_copied_too() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    strided = base[:, 1]  # not contiguous
    param = torch.nn.Parameter(torch.tensor(0.75))  # a Tensor subclass
    ibase = torch.arange(12).reshape(3, 4)
    snaps = [snapped(param), snapped(strided), snapped(ibase[:, 2])]
    base.zero_()
    ibase.zero_()
    with torch.no_grad():
        param.zero_()
    rows, bad = decoded([item(0, snaps[0], losses=snaps[1], indices=snaps[2])])
    assert bad == 0 and rows[0]["loss"] == 0.75
    assert unpack(rows[0]["losses_f32"], "f") == [1.0, 5.0, 9.0]
    assert unpack(rows[0]["indices_i64"], "q") == [2, 6, 10]


def test_lists_are_copied_at_log_time() -> None:
    vec, idx = [0.5, 1.5], [3, 4]
    snaps = snapped(vec), snapped(idx)
    vec[0], idx[0] = 9.0, 9
    rows, _ = decoded([item(0, 1.0, losses=snaps[0], indices=snaps[1])])
    assert unpack(rows[0]["losses_f32"], "f") == [0.5, 1.5]
    assert unpack(rows[0]["indices_i64"], "q") == [3, 4]


def test_the_address_space_view_reads_what_the_tensor_holds() -> None:
    from h3client._batching import address_space

    mem = address_space()
    t = torch.rand(1000, dtype=torch.float64)
    p = t.data_ptr()
    assert mem[p : p + t.nbytes].tobytes() == bytes(t.numpy().tobytes())
    with pytest.raises(TypeError):
        mem[p : p + 8] = b"\0" * 8  # type: ignore[index]  # read-only


def test_a_request_of_snapshots_with_mixed_dtypes_and_absent_vectors() -> None:
    items = [
        item(0, snapped(torch.tensor(0.5)), losses=snapped(torch.tensor([1.0, math.inf])),
             indices=snapped(torch.tensor([1, 2]))),
        item(1, snapped(torch.tensor(2.0, dtype=torch.float64)),
             losses=snapped(torch.tensor([3.0], dtype=torch.float16)),
             indices=snapped(torch.tensor([7], dtype=torch.int32))),
        item(2, 0.25),
        item(3, snapped(torch.tensor([1.0, 2.0]))),  # a vector as the loss: unreadable
        item(4, snapped(torch.tensor(4)), losses=[0.5], indices=[8]),
    ]  # fmt: skip
    rows, bad = decoded(items)
    assert bad == 1 and [r["seq"] for r in rows] == [0, 1, 2, 4]
    assert [r["loss"] for r in rows] == [0.5, 2.0, 0.25, 4.0]
    first = unpack(rows[0]["losses_f32"], "f")
    assert first[0] == 1.0 and math.isnan(first[1])
    assert unpack(rows[1]["losses_f32"], "f") == [3.0]
    assert [unpack(r["indices_i64"], "q") for r in rows if r["indices_i64"]] == [[1, 2], [7], [8]]
    assert rows[2]["losses_f32"] is None and rows[2]["n"] is None


def test_cuda_tensors_take_the_non_blocking_copy_through_snapshot(
    fake_cuda: list[FakeEvent],
) -> None:
    from h3client import _batching

    vec = FakeCudaTensor(torch.tensor([0.5, 1.5]))
    snap = snapped(vec)
    assert type(snap) is _batching.PendingCopy and vec.copies == [("cpu", True)]
    assert vec.detaches == 1  # each detach is a tensor made on the training thread
    rows, _ = decoded([item(0, _batching.snapshot_loss(FakeCudaTensor(torch.tensor(2.0))),
                            losses=snap)])  # fmt: skip
    assert rows[0]["loss"] == 2.0 and unpack(rows[0]["losses_f32"], "f") == [0.5, 1.5]


def test_the_copy_event_is_recorded_on_the_stream_of_the_tensors_device(
    fake_cuda: list[FakeEvent],
) -> None:
    """A tensor on a GPU that is not the current device (``model.to("cuda:1")`` without
    ``set_device``) is copied on that device's stream; an event recorded on the current
    device's stream would not wait for the copy, and the sender would read the host buffer
    before the values arrived."""
    from h3client import _batching

    snap = _batching.snapshot(FakeCudaTensor(torch.tensor([0.5]), device="cuda:1"))
    assert type(snap) is _batching.PendingCopy
    assert [e.stream for e in fake_cuda] == [("current stream of", "cuda:1")]
    pending = _batching.off_device(FakeCudaTensor(torch.tensor(1.0), device="cuda:0"))
    assert pending.event.stream == ("current stream of", "cuda:0")


def test_a_large_request_is_converted_in_slices_and_keeps_its_order() -> None:
    from h3client import _batching

    vec, idx = torch.rand(8), torch.arange(8)
    n = 2 * _batching.SLICE + 100
    items = [
        item(s, snapped(torch.tensor(float(s))), losses=snapped(vec + s), indices=snapped(idx))
        for s in range(n)
    ]
    items[_batching.SLICE + 7] = item(_batching.SLICE + 7, snapped(torch.ones(2)))  # unreadable
    rows, bad = decoded(items)
    assert bad == 1 and len(rows) == n - 1
    assert [r["seq"] for r in rows] == [s for s in range(n) if s != _batching.SLICE + 7]
    assert all(r["loss"] == r["seq"] for r in rows)
    assert unpack(rows[-1]["losses_f32"], "f") == (vec + n - 1).tolist()


def test_float32_losses_carry_every_nonfinite_value_as_nan() -> None:
    values = torch.arange(20_000, dtype=torch.float32)
    at = [0, 7, 4095, 4096, 12_291, len(values) - 1]
    values[at] = torch.tensor([math.inf, -math.inf, math.nan, math.inf, -math.inf, math.inf])
    items = [
        item(k, losses=values[k * 500 : (k + 1) * 500], indices=torch.arange(500))
        for k in range(40)
    ]
    got, bad = decoded(items)
    assert bad == 0
    read = torch.tensor([v for r in got for v in unpack(r["losses_f32"], "f")])
    assert read.isnan().nonzero().flatten().tolist() == sorted(at)
    keep = torch.ones(len(values), dtype=torch.bool)
    keep[at] = False
    assert torch.equal(read[keep], values[keep])


def test_the_binary_body_is_what_the_daemon_reads_and_its_json_form_the_same() -> None:
    """The sender's binary body, read by the daemon's own reader, holds what its JSON form
    (the spool's, and an older daemon's) holds, column for column."""
    from h3d.api.schemas import COLUMNS_MEDIA_TYPE, PACKED_COLUMNS, BatchesIn

    assert (COLUMNS_MEDIA_TYPE, PACKED_COLUMNS) == (
        client.COLUMNS_MEDIA_TYPE,
        client.PACKED_COLUMNS,
    )
    items = [
        item(0, losses=torch.rand(5), indices=torch.arange(5), n=8),
        item(1, loss=torch.tensor(math.nan)),  # no per-sample losses; a NaN loss
        (*item(2, losses=[0.25, 0.5], indices=[3, 4])[:8], "thermo"),
    ]
    req, bad = encode_batches(items)
    assert req is not None and req.binary and bad == 0
    head, _, blocks = req.body.partition(b"\n")
    assert json.loads(head)["nonfinite_as_null"] is True
    binary = BatchesIn.from_binary(req.body)
    text = BatchesIn.model_validate_json(as_json(req).body)
    assert binary.model_dump() == text.model_dump()
    cols = binary.columns
    assert cols is not None and cols.seqs().tolist() == [0, 1, 2]
    assert cols.sizes().tolist() == [5, -1, 2] and cols.n == [8, None, 2]
    assert math.isnan(cols.losses()[1]) and cols.phase == [None, None, "thermo"]
    assert len(blocks) == sum(len(getattr(cols, name) or b"") for name in PACKED_COLUMNS)


def test_epoch_step_and_phase_columns_keep_each_batch_s_value() -> None:
    items = [item(0), item(1), item(2)]
    items[0] = (*items[0][:8], "warmup")
    items[2] = (*items[2][:6], None, None, 'th"ermo')  # no epoch or step; a quote to escape
    got, bad = decoded(items)
    assert bad == 0
    assert [(r["epoch"], r["step"], r["phase"]) for r in got] == [
        (0, 0, "warmup"),
        (0, 1, None),
        (None, None, 'th"ermo'),
    ]


def test_epochs_queued_together_go_in_one_request_in_order() -> None:
    """A request an epoch held a fast loop of log_epoch calls to ~170 epochs/s: 10 000 of
    them outlasted stop()'s 30 s and a normally ended run was failed, half its epochs in
    the spool. Epochs queued back to back go together (up to MAX_EPOCHS_MERGED a request),
    in order, and never across another operation (an update after them stays after them)."""
    from h3client._batching import MAX_EPOCHS_MERGED

    mem = Memory()
    mem.release.clear()  # hold the worker until everything is queued
    p = BatchProcessor(mem, max_batch=500, flush_interval_s=60.0)
    p.add("create", {"id": "x"})
    n = MAX_EPOCHS_MERGED + 5
    for e in range(n):
        p.add("epochs", {"epochs": [{"epoch": e, "accuracy": 0.5}]})
    p.add_batch(item(0))
    p.add("epochs", {"epochs": [{"epoch": n}]})
    p.add("update", {"status": "finished"})
    mem.release.set()
    assert p.flush(10.0)
    ops = [(op, len(body.get("epochs", ()))) for op, body in mem.sent]
    epochs = [k for op, k in ops if op == "epochs"]
    # how the epochs split between passes depends on when each pass began; a pass merges
    # what it found queued, up to MAX_EPOCHS_MERGED (one request each, before: 1 006)
    assert sum(epochs) == n + 1 and max(epochs) <= MAX_EPOCHS_MERGED and len(epochs) <= 4, ops
    assert ops[0][0] == "create" and ops[-1][0] == "update", ops
    sent = [e["epoch"] for op, body in mem.sent if op == "epochs" for e in body["epochs"]]
    assert sent == list(range(n + 1))
    p.close()


def test_epochs_are_merged_only_within_the_passs_snapshot() -> None:
    """The pass sends what was queued when it began: an epoch queued after that may follow
    batches the pass does not send, and the final update behind it must not overtake them
    (a merge beyond the snapshot let the update through first: the run finished, and its
    last batches were refused with a 409)."""
    from collections import deque

    from h3client._batching import _merge_epochs
    from h3client._exporter import Request

    def ep(e: int) -> Request:
        return Request("epochs", json.dumps({"epochs": [{"epoch": e}]}).encode())

    queue = deque([ep(1), ep(2), Request("update", b"{}")])
    merged, taken = _merge_epochs(ep(0), queue, most=2)
    assert taken == 2 and [e["epoch"] for e in json.loads(merged.body)["epochs"]] == [0, 1]
    assert [r.op for r in queue] == ["epochs", "update"]
    merged, taken = _merge_epochs(queue.popleft(), queue, most=5)
    assert taken == 1 and [r.op for r in queue] == ["update"]  # never across another op
