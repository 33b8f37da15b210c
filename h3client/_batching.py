"""The background worker between ``log_batch`` and the exporter (after OpenTelemetry's
BatchProcessor).

``log_batch`` (which does ``add_batch`` inline) is the training thread's whole cost: a copy
of what it is given and one tuple appended to a deque. No I/O, no lock, no logging, no device
synchronisation. What it queues of a tensor is its values at log time: a CPU loss's value
(``item()``), a CPU tensor's bytes, copied straight from its memory (:func:`snapshot`: no
tensor operation, no autograd, no reference to the tensor or its graph), or for a CUDA, XPU or
MPS tensor a non-blocking copy to the host enqueued on its device's current stream (on another
device, a blocking copy: see :func:`snapshot`). They are turned into
numbers here, on the worker thread. The worker wakes when a request is full (or
``max_queue`` batches wait, if fewer), and every ``flush_interval_s``, and sends up to
``max_batch`` batches per request; it goes on at once while the queue is still that long.
While a request is held back (see below), it is tried again at the exporter's retry time.

A request is converted as a whole (:func:`encode_batches`) into packed columns (the
daemon's ``BatchColumns``): the sequence numbers, times and losses as one array each, and the
queued per-sample bytes converted per dtype as one block with one tensor operation per
dtype and request (none for float32 losses and int64 indices, the common case), non-finite
losses found by one byte test on the block. The body is the daemon's binary form
(``client.COLUMNS_MEDIA_TYPE``): a one-line JSON header, then the columns' bytes as they
are, built by one final join; no base64 (``client.columns_as_json`` gives the JSON form,
for the spool and for a daemon older than the binary form). Nothing in it does a tensor
operation or runs Python code per batch in the common case. The GIL is yielded between the
steps: the training thread, coming back from a torch operation, waits for one step at most
(otherwise up to the interpreter's switch interval, 5 ms). A request holding a batch that
cannot be read falls back to one JSON object per batch, which finds and leaves out that
batch. Bodies to a daemon on another machine are gzipped; on loopback they are not (gzip
cost ~30 ms of CPU per MB and saved nothing there).

Where a request goes: the daemon; the spool on disk when the daemon does not answer (or the
queue is more than ``max_queue`` behind: the oldest go to disk, not to memory); and when
neither takes it (no daemon and a full disk) it stays in memory and is retried, oldest
first, while nothing newer is sent. Memory stays bounded: past ``4 × max_queue`` queued
batches (or ``max_queue + max_batch``, if more: room for a request beyond the overflow
threshold) the training thread drops the oldest and counts it as lost.

``close()`` never drops anything silently: what the daemon has not acknowledged by the
deadline (the queue, the request in flight, the requests held back) is written to the spool
from the calling thread, the worker is told to stop, and every batch ends up counted as
posted, spooled, rejected (the daemon refused it as invalid) or lost (not even the disk took
it).
"""

from __future__ import annotations

import binascii
import json
import logging
import math
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from itertools import accumulate, chain, repeat
from operator import index, is_not, itemgetter
from typing import Any, Literal, cast

from h3client._exporter import Exporter, Request
from h3client.client import PACKED_COLUMNS

logger = logging.getLogger(__name__)

# (seq, t, loss, losses, indices, n, epoch, step, phase)
BatchItem = tuple[int, float, Any, Any, Any, "int | None", "int | None", "int | None", "str | None"]


class PendingCopy:
    """A device tensor on its way to host memory: the copy was only enqueued."""

    __slots__ = ("event", "host")

    def __init__(self, host: Any, event: Any) -> None:
        self.host = host
        self.event = event

    def get(self) -> Any:
        self.event.synchronize()  # waits on the sender thread, never the training thread
        return self.host


def _torch_cuda() -> Any:
    import torch

    return torch.cuda


#: ``torch.cuda``, where events and streams come from (the hardware seam: tests replace it on
#: machines without a GPU with an object of the same surface, ``Event`` and ``current_stream``).
cuda_module = _torch_cuda


def _torch_backend(kind: str) -> Any:
    import torch

    return getattr(torch, kind)


#: The device types other than CUDA whose tensors are copied to the host without blocking, as
#: CUDA's are: torch offers both the non-blocking copy and an event to wait on for them.
ASYNC_DEVICES = frozenset({"xpu", "mps"})

#: ``torch.xpu`` or ``torch.mps`` by device type, as ``cuda_module`` is for CUDA (the hardware
#: seam): ``torch.xpu`` has CUDA's surface, ``Event`` and ``current_stream(device)``;
#: ``torch.mps.Event``'s ``record()`` takes no stream (MPS has one queue per process).
backend_module = _torch_backend


#: Copies enqueued by one ``log_batch`` call, each with its tensor's device and device type,
#: whose event is recorded once they all are (:func:`record_copies`).
Copies = list[tuple[PendingCopy, Any, str]]


def off_device(t: Any, copies: Copies | None = None, kind: str = "cuda") -> PendingCopy:
    """For the detached tensor ``t`` on a device of type ``kind`` (CUDA, or one of
    :data:`ASYNC_DEVICES`): start a non-blocking copy to host memory and record an event, so
    the training thread never waits for the device on H3's behalf.

    With ``copies``, the event is left to :func:`record_copies`: the copies of one call then
    share one event per device instead of making one each.
    """
    host = t.to("cpu", non_blocking=True)  # PyTorch pins its host side (MPS: unified memory)
    pending = PendingCopy(host, None)
    if copies is None:
        record_copies([(pending, t.device, kind)])
    else:
        copies.append((pending, t.device, kind))
    return pending


def record_copies(copies: Copies) -> None:
    """Give each enqueued copy its event: one per device, recorded after all of them on that
    device's current stream, where they were enqueued (a bare ``record()`` takes the current
    device's stream, which does not order a copy from another GPU). An event orders every
    copy enqueued on its stream before it, so one serves them all."""
    events: dict[Any, Any] = {}
    for pending, device, kind in copies:
        event = events.get(device)
        if event is None:
            event = events[device] = _recorded_event(device, kind)
        pending.event = event


def _recorded_event(device: Any, kind: str) -> Any:
    """A new event of device type ``kind``, recorded on ``device``'s current stream."""
    if kind == "mps":
        event = backend_module(kind).Event()
        event.record()  # on MPS's one stream
        return event
    backend = cuda_module() if kind == "cuda" else backend_module(kind)
    event = backend.Event()
    event.record(backend.current_stream(device))
    return event


# --- what log_batch keeps of a tensor --------------------------------------------------------


class _NoTorch:
    """Stands for ``torch.Tensor`` until a tensor is logged (h3client never imports torch)."""


#: ``torch.Tensor`` once a tensor was logged (see :func:`bind_torch`); ``log_batch``'s fast
#: path is for tensors of exactly this type.
TENSOR: Any = _NoTorch
#: The process's address space as read-only bytes (see :func:`address_space`), once bound.
MEMORY: memoryview = memoryview(b"")


def address_space() -> memoryview:
    """Every address of the process as one read-only byte view: ``mem[p : p + n].tobytes()``
    copies the ``n`` bytes at address ``p``.

    This is ``ctypes.string_at(p, n)`` without the cost of a ctypes call (0.17 against
    0.47 µs): slicing a memoryview and copying the slice are two C calls. It is only ever
    sliced at a live CPU tensor's ``data_ptr()`` for its ``nbytes``, while the caller holds
    the tensor.
    """
    import ctypes

    whole = (ctypes.c_char * sys.maxsize).from_address(0)
    return memoryview(whole).cast("B").toreadonly()


def bind_torch() -> None:
    """Arm ``log_batch``'s fast path, once torch is imported (by the caller, never by us)."""
    global TENSOR, MEMORY
    torch = sys.modules.get("torch")
    if torch is None or TENSOR is not _NoTorch:
        return
    MEMORY = address_space()
    TENSOR = torch.Tensor  # last: the fast path reads MEMORY once TENSOR matches


def snapshot(x: Any, copies: Copies | None = None) -> Any:
    """What ``log_batch`` queues of the tensor or sequence ``x``: its values as of now, so
    that changing ``x`` in place afterwards, or freeing its autograd graph, changes nothing.

    - a contiguous CPU ``torch.Tensor`` (``log_batch`` does this inline, its fast path):
      ``(bytes, dtype)``, its memory copied; no tensor operation, nothing kept of ``x``;
    - a CUDA, XPU or MPS tensor: a :class:`PendingCopy`, a non-blocking copy to the host
      enqueued on the current stream of its device (its event recorded there), so it holds
      the values as of now in that stream's order (a kernel enqueued later, on that stream,
      that changes ``x`` runs after the copy);
    - a tensor on any other device (an accelerator torch has no such event for, e.g. a
      ``privateuseone`` backend): a blocking copy to the CPU, which waits for the device's
      queue to reach ``x`` on the calling thread;
    - any other CPU tensor (not contiguous, a subclass): a copy on the CPU;
    - anything else, a sequence of numbers: a list of its elements.

    ``copies``: see :func:`off_device`.
    """
    if not hasattr(x, "detach"):
        return list(x)
    bind_torch()
    t = x.detach()
    if t.is_cuda:
        return off_device(t, copies)
    if type(t) is TENSOR and t.is_cpu and t.is_contiguous():
        p = t.data_ptr()
        return (MEMORY[p : p + t.nbytes].tobytes(), t.dtype)
    if not t.is_cpu:
        kind = t.device.type
        if kind in ASYNC_DEVICES:
            return off_device(t, copies, kind)
    return t.to("cpu", copy=True)


def snapshot_loss(x: Any, copies: Copies | None = None) -> Any:
    """``snapshot`` for the loss: a tensor as above, anything else as a float."""
    return snapshot(x, copies) if hasattr(x, "detach") else float(x)


def _ready(xs: Sequence[Any]) -> list[Any]:
    """Each value as the worker reads it: None, a number, a list, or ``(bytes, dtype)``
    (what a CUDA copy or a private CPU copy became once the copy is done)."""
    out = list(xs)
    if set(map(type, out)) <= _READY_TYPES:  # the common case: nothing to do
        return out
    bind_torch()
    mem = MEMORY
    for i, x in enumerate(out):
        if type(x) is PendingCopy:
            x = x.get()
        if type(x) is TENSOR and x.is_cpu and x.is_contiguous():
            p = x.data_ptr()  # as log_batch's fast path: no tensor operation
            x = (mem[p : p + x.nbytes].tobytes(), x.dtype)
        elif hasattr(x, "detach"):
            x = (_tensor_bytes(x), x.dtype)
        out[i] = x
    return out


_READY_TYPES = {tuple, float, int, list, type(None)}
_data, _dtype = itemgetter(0), itemgetter(1)
_b2a = partial(binascii.b2a_base64, newline=False)


def _by_dtype(vals: list[Any]) -> list[tuple[Any, list[int]]]:
    """The positions of the ``(bytes, dtype)`` snapshots in ``vals``, grouped by dtype: one
    group, found without a Python loop, in the common case."""
    types = set(map(type, vals))
    if tuple not in types:  # numbers only (a CPU loss is queued as its value): no loop
        return []
    if types == {tuple}:
        dtypes = set(map(_dtype, vals))
        if len(dtypes) == 1:
            return [(dtypes.pop(), list(range(len(vals))))]
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(vals):
        if type(v) is tuple:
            groups.setdefault(v[1], []).append(i)
    return list(groups.items())


# --- converting a request ------------------------------------------------------------------


def _finite_or_none(vals: list[Any]) -> list[float | None]:
    if all(map(math.isfinite, vals)):
        return vals
    return [v if math.isfinite(v) else None for v in vals]


def _read_scalars(raws: list[bytes], dtype: Any) -> list[float] | None:
    """The values of one-element snapshots of ``dtype``, read as one block (no tensor
    operation for float32 and float64); None if one of them is not one element."""
    width = dtype.itemsize
    if set(map(len, raws)) != {width} or dtype.is_complex:
        return None
    block = b"".join(raws)
    code = {4: "f", 8: "d"}.get(width) if dtype.is_floating_point else None
    if code is not None:
        a = array(code)
        a.frombytes(block)
        return cast("list[float]", a.tolist())
    import torch

    read: list[float] = torch.frombuffer(bytearray(block), dtype=dtype).to(torch.float64).tolist()
    return read


def _scalars(col: Sequence[Any]) -> tuple[list[float | None], set[int]]:
    """Each batch's loss as a float (None for NaN/inf), and the positions that are unreadable
    (a loss of more than one element, or not a number).

    The request's snapshots are read per dtype as one block; when one of them is not a
    single element, that dtype's are read one by one.
    """
    vals = _ready(col)
    bad: set[int] = set()
    for dtype, pos in _by_dtype(vals):
        raws = [vals[i][0] for i in pos]
        read = _read_scalars(raws, dtype)
        if read is None:
            read = []
            for i, raw in zip(pos, raws, strict=True):
                one = _read_scalars([raw], dtype)
                if one is None:
                    bad.add(i)
                read.append(math.nan if one is None else one[0])
        if len(pos) == len(vals):
            vals = read
        else:
            for i, v in zip(pos, read, strict=True):
                vals[i] = v
    try:
        return _finite_or_none(vals), bad
    except TypeError:  # something that is not a number at all
        out: list[float | None] = []
        for i, v in enumerate(vals):
            try:
                out.append(float(v) if math.isfinite(v) else None)
            except (TypeError, ValueError):
                out.append(None)
                bad.add(i)
        return out, bad


def _tensor_bytes(t: Any) -> bytes:
    """The bytes of a CPU tensor, in one copy (no numpy, no per-element work)."""
    import ctypes

    t = t.contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def _split(block: bytes | bytearray, sizes: list[int]) -> list[memoryview]:
    view = memoryview(block)
    ends = list(accumulate(sizes))
    return [view[a:b] for a, b in zip([0, *ends], ends, strict=False)]


def _converted(raws: list[Any], dtype: Any, target: Any) -> list[memoryview]:
    """Snapshots of ``dtype`` as ``target``, converted as one block."""
    import torch

    width = dtype.itemsize
    lens = list(map(len, raws))
    if dtype.is_complex or any(n % width for n in lens):
        raise ValueError(f"per-sample values of dtype {dtype} cannot be read")
    block = bytearray().join(raws)
    if not block:
        return [memoryview(b"")] * len(raws)
    data = _tensor_bytes(torch.frombuffer(block, dtype=dtype).to(target))
    return _split(data, [n // width * target.itemsize for n in lens])


# the high byte of a little-endian float32 whose exponent is all ones but its lowest bit (the
# values of magnitude 2**127 and more, inf and NaN among them) -> 1, any other -> 0
_HUGE_F32 = bytes(1 if (b & 0x7F) == 0x7F else 0 for b in range(256))


def _f32_nan(block: Any) -> Any:
    """float32 bytes with every non-finite value as NaN (the daemon stores those as null):
    ``block`` itself when it holds none, else a corrected copy.

    No tensor operation when every value is below 2**127 in magnitude (any loss): their high
    bytes are read, one in four, with two C calls. Otherwise the block is checked exactly.
    """
    if 1 not in bytes(block[3::4]).translate(_HUGE_F32):
        return block
    import torch

    fixed = bytearray(block)
    t = torch.frombuffer(fixed, dtype=torch.float32)
    t.masked_fill_(~torch.isfinite(t), math.nan)  # in place, in fixed
    return fixed


def _nan_for_nonfinite(chunks: list[Any]) -> list[Any]:
    """:func:`_f32_nan` for a list of float32 chunks (the row form's)."""
    block = b"".join(chunks)
    fixed = _f32_nan(block)
    return chunks if fixed is block else _split(fixed, list(map(len, chunks)))


def _chunks(col: Sequence[Any], kind: Literal["f", "q"]) -> tuple[list[Any], list[int]]:
    """Per-sample vectors as little-endian float32 ("f") or int64 ("q") bytes: one chunk per
    batch (None where absent), and their lengths (-1: absent). Non-finite floats are not
    touched here (see :func:`_nan_for_nonfinite`).

    The snapshots of a request are converted per dtype as one block: float32 losses and
    int64 indices, the common case, need no conversion, no tensor operation and no Python
    loop. Python sequences (the slow, rare path) are packed one by one.
    """
    vals = _ready(col)
    out: list[Any] = [None] * len(vals)
    lens = [-1] * len(vals)
    groups = _by_dtype(vals)
    if groups:
        import torch

        target, width = (torch.float32, 4) if kind == "f" else (torch.int64, 8)
        pos: list[int] = []
        chunks: list[Any] = []
        for dtype, where in groups:
            if len(where) == len(vals):
                raws = list(map(_data, vals))
            else:
                raws = [vals[i][0] for i in where]
            pos += where
            chunks += raws if dtype == target else _converted(raws, dtype, target)
        sizes = [n // width for n in map(len, chunks)]
        if len(groups) == 1 and len(pos) == len(vals):  # the common case: all, in order
            return chunks, sizes
        for i, chunk, n in zip(pos, chunks, sizes, strict=True):
            out[i], lens[i] = chunk, n
    for i, v in enumerate(vals):
        if v is None or lens[i] >= 0:
            continue
        if kind == "f":
            arr: array[Any] = array(
                "f",
                (x if isinstance(x, (int, float)) and math.isfinite(x) else math.nan for x in v),
            )
        else:
            arr = array("q", (int(x) for x in v))
        out[i], lens[i] = arr.tobytes(), len(arr)
    return out, lens


def _packed(col: Sequence[Any], kind: Literal["f", "q"]) -> tuple[list[str | None], list[int]]:
    """Per-sample vectors as base64 of little-endian float32 ("f", non-finite as NaN) or
    int64 ("q"): one base64 text per batch (None where absent), and their lengths (-1:
    absent); see :func:`_chunks`."""
    chunks, lens = _chunks(col, kind)
    if -1 not in lens:  # the common case: every batch has one, no Python loop
        if kind == "f":
            chunks = _nan_for_nonfinite(chunks)
        return list(map(bytes.decode, map(_b2a, chunks))), lens
    present = [c for c in chunks if c is not None]
    if kind == "f" and present:
        fixed = iter(_nan_for_nonfinite(present))
        chunks = [None if c is None else next(fixed) for c in chunks]
    return [None if c is None else _b2a(c).decode() for c in chunks], lens


_INT_OR_NONE = {int, type(None)}


def _json_column(col: Sequence[Any]) -> list[str]:
    """JSON text of each value (ints, the common case, without json.dumps per value)."""
    types = set(map(type, col))
    if types == {int}:
        return list(map(str, col))
    if types <= _INT_OR_NONE:
        return ["null" if v is None else str(v) for v in col]
    return [json.dumps(v) for v in col]


def _any_set(col: Sequence[Any]) -> bool:
    """Whether a value in ``col`` is not None (by identity: no ``==`` on a tensor)."""
    return any(map(is_not, col, repeat(None)))


def _column(name: str, texts: Sequence[str | None], quoted: bool) -> tuple[str, Sequence[str]]:
    """A field's format and its values: ``"name":"%s"`` over the texts when every batch has
    one (no Python loop), else ``"name":%s`` over JSON literals, null where absent."""
    if None not in texts:
        return (f',"{name}":"%s"' if quoted else f',"{name}":%s'), cast("Sequence[str]", texts)
    if quoted:
        return f',"{name}":%s', ["null" if t is None else '"' + t + '"' for t in texts]
    return f',"{name}":%s', ["null" if t is None else t for t in texts]


class _Unreadable(ValueError):
    """One field of a request's batches could not be read (see :func:`_encode`)."""

    def __init__(self, field: str, exc: Exception) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.field = field


def _left_out(warned: set[str], field: str, why: str) -> None:
    """Warn that batches are left out for ``why``, once per ``field`` (``warned`` holds the
    fields warned about already)."""
    if field not in warned:
        warned.add(field)
        logger.warning("h3: batches left out (counted rejected): %s", why)


def _read(field: str, convert: Callable[..., Any], *args: Any) -> Any:
    try:
        return convert(*args)
    except Exception as exc:
        raise _Unreadable(field, exc) from exc


def _encode(items: Sequence[BatchItem], warned: set[str]) -> tuple[str, int, int]:
    """The JSON objects of ``items``, comma-separated; how many there are; how many were left
    out as unreadable (each field that left one out warned about once, in ``warned``).

    Every column is converted as a whole, and the objects are written with one format
    operation for the whole request: no Python loop over the batches in the common case.
    Raises :class:`_Unreadable` naming the field that could not be read at all.
    """
    seqs, ts, losses, vecs, idxs, ns, epochs, steps, phases = zip(*items, strict=True)
    loss_vals, bad = _read("loss", _scalars, losses)
    if bad:
        _left_out(warned, "loss", f"loss of batch seq={seqs[min(bad)]} is not one number")
    fmt = '{"seq":%d,"t":%r'
    cols: list[Sequence[Any]] = [seqs, ts]
    # each loss as a float, as the packed columns write it: a bool (a bool tensor's item())
    # is 1.0 or 0.0, not ``True``, which is not JSON and would sink the whole request
    if None in loss_vals:
        fmt += ',"loss":%s'
        cols.append(["null" if v is None else repr(float(v)) for v in loss_vals])
    else:
        fmt += ',"loss":%r'
        cols.append(list(map(float, cast("list[float]", loss_vals))))
    lens = [-1] * len(items)
    if _any_set(vecs):
        f32, lens = _read("losses", _packed, vecs, "f")
        if set(ns) == {None} and -1 not in lens:
            ns = tuple(lens)
        else:
            ns = tuple(lens[i] if n is None and lens[i] >= 0 else n for i, n in enumerate(ns))
        f, c = _column("losses_f32", f32, quoted=True)
        fmt, cols = fmt + f, [*cols, c]
    if _any_set(idxs):
        i64, ilens = _read("indices", _packed, idxs, "q")
        if ilens != lens:
            for i, (a, b) in enumerate(zip(lens, ilens, strict=True)):
                if b >= 0 and a != b:  # indices without losses, or of another length
                    bad.add(i)
                    why = f"indices of batch seq={seqs[i]}: {b} for {max(a, 0)} per-sample losses"
                    _left_out(warned, "indices", why)
        f, c = _column("indices_i64", i64, quoted=True)
        fmt, cols = fmt + f, [*cols, c]
    for name, col in (("n", ns), ("epoch", epochs), ("step", steps), ("phase", phases)):
        if _any_set(col):
            fmt += f',"{name}":%s'
            cols.append(_json_column(col))
    fmt += "}"
    rows: Any = zip(*cols, strict=True)
    if bad:
        rows = [r for i, r in enumerate(rows) if i not in bad]
    values = tuple(chain.from_iterable(rows))
    count = len(values) // len(cols)
    return ",".join([fmt] * count) % values, count, len(bad)


def _encode_columns(items: Sequence[BatchItem]) -> bytes | None:
    """The body of a request for ``items`` with its batches as packed columns, in the
    daemon's binary form (:data:`~h3client.client.COLUMNS_MEDIA_TYPE`): a one-line JSON
    header, then each packed column's bytes as they are, no base64 (which was a third of
    this thread's work per batch, held under the GIL). Each column is packed whole with a
    few C calls, nothing done per batch in Python, and the body is built by one final
    join. None when the items need the row form: an unreadable loss, or indices that do
    not pair with the per-sample losses (those batches are then left out one by one)."""
    seqs, ts, losses, vecs, idxs, ns, epochs, steps, phases = zip(*items, strict=True)
    loss_vals, bad = _scalars(losses)
    if bad:
        return None
    time.sleep(0)  # here and below: the GIL yielded between steps of about 0.1-0.3 ms
    if None in loss_vals:  # non-finite: NaN on the wire, stored as missing
        loss_vals = [math.nan if v is None else v for v in loss_vals]
    blocks: list[Any] = [
        array("q", seqs),
        array("d", ts),
        array("d", cast("list[float]", loss_vals)),
    ]
    lens = [-1] * len(items)
    if _any_set(vecs):
        chunks, lens = _chunks(vecs, "f")
        time.sleep(0)
        blocks += [array("q", lens), _f32_nan(b"".join(filter(None, chunks)))]
    if _any_set(idxs):
        chunks, ilens = _chunks(idxs, "q")
        if ilens != lens:
            return None
        time.sleep(0)
        blocks.append(b"".join(filter(None, chunks)))
    # seq, t, loss; then sizes and losses; then indices (only with losses: see above)
    header: dict[str, Any] = dict(zip(PACKED_COLUMNS, map(_nbytes, blocks), strict=False))
    if _any_set(ns):  # else the daemon takes each batch's number of per-sample losses
        ns = tuple(lens[i] if n is None and lens[i] >= 0 else n for i, n in enumerate(ns))
    for name, col in (("n", ns), ("epoch", epochs), ("step", steps), ("phase", phases)):
        if _any_set(col):
            header[name] = col
    head = json.dumps({"nonfinite_as_null": True, "columns": header}, separators=(",", ":"))
    return b"".join([head.encode(), b"\n", *blocks])


def _nbytes(block: Any) -> int:
    return memoryview(block).nbytes


#: The largest request body the worker builds: half the daemon's default limit on a body
#: (``H3D_MAX_BODY_BYTES``, 32 MiB), so that many batches of per-sample (per-token) losses
#: go in several requests, not in one the daemon refuses whole.
MAX_REQUEST_BYTES = 16 * 1024 * 1024

#: Batches converted between two yields of the GIL (about 1 ms of work, see encode_batches).
SLICE = 250


def _encode_each(items: Sequence[BatchItem], warned: set[str]) -> tuple[str, int, int]:
    """``_encode``, and when something in ``items`` is unreadable: item by item, keeping the
    rest (each field that cannot be read warned about once, in ``warned``)."""
    try:
        return _encode(items, warned)
    except Exception:
        parts, count, bad = [], 0, 0
        for item in items:
            try:
                one, c, b = _encode([item], warned)
            except Exception as exc:
                one, c, b = "", 0, 1
                field = exc.field if isinstance(exc, _Unreadable) else type(exc).__name__
                _left_out(warned, field, f"{field} of batch seq={item[0]} cannot be read ({exc})")
            if c:
                parts.append(one)
            count += c
            bad += b
        return ",".join(parts), count, bad


#: The daemon's bounds on a batch's ``n``, ``epoch`` and ``step`` (JSON-safe integers: the
#: largest a double holds exactly; the profiler's ``n_train`` and config integers too) and
#: on its ``phase`` (h3d.api.schemas); one batch outside them would make the daemon refuse
#: the whole request, so the worker leaves it out alone.
INT_MAX, PHASE_MAX = 2**53 - 1, 32
_META_FIELDS = ((5, "n"), (6, "epoch"), (7, "step"))


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text``, escaped (``\\ud800``), or None: the daemon
    refuses text that holds one (``h3d.api.schemas.check_text``)."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return exc.object[exc.start : exc.end].encode("unicode_escape").decode()
    return None


def _storable(text: str) -> bool:
    """Whether the daemon stores ``text``: no NUL, no lone surrogate (no Unicode text), as
    ``h3d.api.schemas.check_text`` checks a batch's phase."""
    return "\x00" not in text and lone_surrogate(text) is None


def _checked_meta(
    items: Sequence[BatchItem], warned: set[str] | None = None
) -> tuple[Sequence[BatchItem], int]:
    """``items`` with their ``n``/``epoch``/``step`` as ints (a numpy or 0-dim tensor integer
    is converted), less those whose fields the daemon would refuse (counted, and named in a
    warning once per field in ``warned``). One pass of C calls per column when all is well."""
    warned = set() if warned is None else warned
    fixed: dict[int, list[Any]] = {}
    bad: dict[int, str] = {}
    for k, name in _META_FIELDS:
        col: list[Any] = [it[k] for it in items]
        kinds = set(map(type, col)) - {type(None)}
        if not kinds:
            continue
        if kinds == {int}:
            values = [v for v in col if v is not None]
            if min(values) >= 0 and max(values) <= INT_MAX:
                continue
        for i, v in enumerate(col):  # something to convert, or to refuse
            if v is None or type(v) is int and 0 <= v <= INT_MAX:
                continue
            try:
                iv = -1 if isinstance(v, bool) else index(v)
            except (TypeError, ValueError, RuntimeError):
                iv = -1
            if 0 <= iv <= INT_MAX:
                fixed.setdefault(i, list(items[i]))[k] = iv
            else:
                bad.setdefault(i, f"{name} {v!r:.40} is not an integer from 0 to {INT_MAX}")
    phases = [it[8] for it in items]
    odd = set(map(type, phases)) - {type(None), str}
    if (
        odd
        or max((len(p) for p in phases if p is not None), default=0) > PHASE_MAX
        or not _storable("".join(filter(None, phases)))  # one pass over the column
    ):
        for i, ph in enumerate(phases):
            if ph is not None and not (
                isinstance(ph, str) and len(ph) <= PHASE_MAX and _storable(ph)
            ):
                bad.setdefault(
                    i,
                    f"phase {ph!r:.40} is not a string of at most {PHASE_MAX} characters "
                    "without a NUL or a lone surrogate",
                )
    if not (fixed or bad):
        return items, 0
    for why in dict.fromkeys(w.split(" ", 1)[0] for w in bad.values()):
        if why not in warned:
            warned.add(why)
            first = next(w for w in bad.values() if w.startswith(why))
            logger.warning("h3: batches left out (counted rejected): %s", first)
    kept = [tuple(fixed[i]) if i in fixed else it for i, it in enumerate(items) if i not in bad]
    return cast("list[BatchItem]", kept), len(bad)


def encode_batches(
    items: Sequence[BatchItem], warned: set[str] | None = None
) -> tuple[Request | None, int]:
    """One ``POST /v1/runs/{id}/batches`` request for ``items`` (None if none was readable),
    and how many items were unreadable and left out (a loss that is not a number; indices
    that do not match the per-sample losses; a vector that cannot be read; an ``n``,
    ``epoch``, ``step`` or ``phase`` the daemon would refuse, see :func:`_checked_meta`).

    The request carries packed columns (:func:`_encode_columns`). Only when something in it
    cannot be read does it fall back to one JSON object per batch, converted ``SLICE``
    batches at a time with the GIL yielded in between (base64 and formatting are C calls
    that keep it, and a training thread that wants it back after a torch operation would
    otherwise wait for the interpreter's switch interval, 5 ms), which leaves out the
    unreadable batches one by one.
    """
    warned = set() if warned is None else warned
    items, invalid = _checked_meta(items, warned)
    if not items:
        return None, invalid
    try:
        columns = _encode_columns(items)
    except Exception:  # something unreadable: the row form finds which batches
        columns = None
    if columns is not None:
        return Request("batches", columns, len(items), binary=True), invalid
    parts: list[str] = []
    count, bad = 0, invalid
    for k in range(0, len(items), SLICE):
        if k:
            time.sleep(0)  # releases the GIL: a waiting training thread takes it first
        text, c, b = _encode_each(items[k : k + SLICE], warned)
        if c:
            parts.append(text)
        count += c
        bad += b
    if not count:
        return None, bad
    body = '{"nonfinite_as_null":true,"batches":[' + ",".join(parts) + "]}"
    return Request("batches", body.encode(), count), bad


# --- the worker ------------------------------------------------------------------------------

Route = Literal["sent", "rejected", "spooled", "held", "too_large"]


#: ``add("epochs", {"epochs": [...]})``'s body, as ``json.dumps`` writes it.
_EPOCHS_HEAD, _EPOCHS_TAIL = b'{"epochs": [', b"]}"
#: Epochs sent in one request at most (the daemon takes up to 10 000).
MAX_EPOCHS_MERGED = 1000


def _merge_epochs(first: Request, source: deque[Request], most: int) -> tuple[Request, int]:
    """``first`` with the epochs requests queued right behind it, as one request.

    One request an epoch held a loop of fast epochs (a ``log_epoch`` per step of a
    streaming loop) to ~170 epochs/s: 10 000 of them outlasted ``stop()``'s 30 s, and a run
    that ended normally was failed with half its epochs in the spool. Merged in order, up to
    :data:`MAX_EPOCHS_MERGED` and ``most`` requests in all (the pass's snapshot: an epoch
    queued after it may follow batches the pass does not send, and what comes after it, the
    final update, must not overtake them). Returns the request and how many it replaces;
    the caller holds the lock."""
    head, tail = _EPOCHS_HEAD, _EPOCHS_TAIL
    if not (first.body.startswith(head) and first.body.endswith(tail)):
        return first, 1
    parts = [first.body[len(head) : -len(tail)]]
    most = min(most, MAX_EPOCHS_MERGED)
    while len(parts) < most and source and source[0].op == "epochs":
        body = source[0].body
        if not (body.startswith(head) and body.endswith(tail)):
            break
        source.popleft()
        parts.append(body[len(head) : -len(tail)])
    if len(parts) == 1:
        return first, 1
    return first._replace(body=head + b", ".join(parts) + tail), len(parts)


class BatchProcessor:
    """The queue and its sender thread. ``posted``, ``spooled``, ``rejected`` and ``lost``
    count batches; with ``logged`` the number added, at ``close()``:
    logged = posted + spooled + rejected + lost."""

    def __init__(
        self,
        exporter: Exporter,
        *,
        max_batch: int = 2000,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
        on_tick: Callable[[], None] | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.exporter = exporter
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        # batches that fit one request, learned from the bodies encoded: per-token losses
        # (65 536 a batch, about 1 MiB encoded) fill a 16 MiB request with about 14
        self._fit = max_batch
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        # where the training thread drops the oldest: room for a full request past the
        # overflow threshold, whatever max_queue
        self.hard_limit = max(4 * max_queue, max_queue + max_batch)
        # the queue length at which log_batch wakes the worker: a full request, or the
        # overflow threshold if lower (past it the oldest go to disk, which only the worker
        # does: woken at max_batch alone, a small max_queue reached the hard limit first)
        self.wake_at = min(max_batch, max_queue)
        self.on_tick = on_tick
        self.batches: deque[BatchItem] = deque()
        self.others: deque[Request] = deque()
        self.dropped = 0  # by the training thread, past hard_limit
        self.posted = self.spooled = self.rejected = 0
        self.lost_on_disk = 0  # stop(): neither the daemon nor the disk took them
        self._held: deque[Request] = deque()  # neither daemon nor disk took them: retried
        self._inflight: Request | list[BatchItem] | None = None
        self._lock = threading.Lock()  # the worker and close() taking work; never log_batch
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._busy = False
        self._closing = False
        self._exit = False
        self._abandoned = False
        self._converting = False  # the worker is in torch code (see close())
        self._rate = 10_000.0  # batches/s the worker converts (measured): close() plans by it
        self._close_result: bool | None = None
        # close() tries the daemon once whatever the exporter's back-off (up to 10 s): the
        # daemon may be answering again, and what is spooled now waits for `h3d import`
        self._try_once = False
        self._warned: set[str] = set()  # fields of left-out batches, warned about once
        self._requeued = 0  # batches of a request over the daemon's limit, queued again
        # when flush() wakes the worker next, after a pass that held a request back
        self._next_try = 0.0
        self._thread = threading.Thread(target=self._worker, name="h3-exporter", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> int:
        return self.dropped + self.lost_on_disk

    # --- the training thread's side -------------------------------------------------------

    def add_batch(self, item: BatchItem) -> None:
        """Queue one batch (``H3Profiler.log_batch`` does the same inline)."""
        q = self.batches
        q.append(item)
        queued = len(q)
        if queued == self.wake_at:
            self._wake.set()
        elif queued > self.hard_limit:
            self.drop_oldest()

    def wake(self) -> None:
        """A full request (or ``max_queue`` batches) is queued: the worker sends it now, not
        at its next tick."""
        self._wake.set()

    def drop_oldest(self) -> None:
        """Past ``hard_limit``: the oldest queued batch goes, counted as lost."""
        try:
            self.batches.popleft()
            self.dropped += 1
        except IndexError:  # the worker took it meanwhile
            pass

    def add(self, op: str, body: dict[str, Any]) -> None:
        """Anything but batches (create, epochs, update): rare, ordered with the batches.

        Raises ValueError/TypeError if ``body`` is not JSON (NaN included).
        """
        self.others.append(Request(op, json.dumps(body, allow_nan=False).encode()))
        self._wake.set()

    # --- the worker ------------------------------------------------------------------------

    def _route(self, req: Request, prefer_spool: bool = False) -> Route:
        exp = self.exporter
        for way in ("spool", "send") if prefer_spool else ("send", "spool"):
            try:
                if way == "send":
                    if exp.ready() or self._try_once:
                        outcome = exp.send(req)
                        if outcome != "down":
                            return outcome
                        self._try_once = False  # tried: the back-off holds from here
                elif not self._abandoned and exp.spool(req):
                    return "spooled"
            except Exception:  # an exporter bug: keep the request, never end the worker
                if not self._abandoned:
                    logger.exception("h3: export failed")
        return "held"

    def _count(self, req: Request, route: Route) -> None:
        n = req.n_batches
        if route == "sent":
            self.posted += n
        elif route == "spooled":
            self.spooled += n
        elif route == "rejected":
            self.rejected += n

    def _deliver(
        self, req: Request, prefer_spool: bool = False, items: list[BatchItem] | None = None
    ) -> bool:
        """Route ``req`` (the worker's in-flight request); False if it is held back.

        A batches request the daemon finds over its body limit goes back to the queue's
        front as its ``items``, in order, to be sent fewer at a time (``_requeued`` says how
        many); a single batch over the limit is counted rejected."""
        route = self._route(req, prefer_spool)
        with self._lock:
            if self._inflight is not req:
                return False  # close() took it over and counts it
            self._inflight = None
            if route == "held":
                self._held.appendleft(req)
                return False
            if route == "too_large":
                if items is not None and len(items) > 1:
                    self.batches.extendleft(reversed(items))
                    self._requeued = len(items)
                    self._fit = max(1, len(items) // 2)
                    self.max_request_bytes = min(self.max_request_bytes, len(req.body) // 2)
                    return True
                route = "rejected"
                logger.warning(
                    "h3: %d batch(es) of %d bytes over the daemon's body limit (413): left "
                    "out; log fewer per-sample losses a batch",
                    req.n_batches,
                    len(req.body),
                )
            self._count(req, route)
            return True

    def _pop(self, source: deque[Request], most: int = 1) -> tuple[Request | None, int]:
        """The next request of ``source`` (epochs queued behind it merged in, ``most``
        requests in all) and how many queued requests it stands for."""
        with self._lock:
            if self._abandoned or not source:
                return None, 0
            req, taken = source.popleft(), 1
            if req.op == "epochs" and most > 1:
                req, taken = _merge_epochs(req, source, most)
            self._inflight = req
            return req, taken

    def _pop_items(self, count: int) -> list[BatchItem] | None:
        with self._lock:
            if self._abandoned:
                return None
            items = []
            q = self.batches
            for _ in range(count):
                try:
                    items.append(q.popleft())
                except IndexError:
                    break
            self._inflight = items
            return items

    def _drain_once(self) -> bool:
        """Send what was queued when this pass began; False when there was nothing.

        Only a snapshot: items logged while a request is in flight wait for the next pass,
        so a fast loop yields a few large requests, not a stream of tiny ones. A request
        held back (no daemon, no disk) ends the pass: nothing newer overtakes it.
        """
        n_batches, n_others = len(self.batches), len(self.others)
        if not (n_batches or n_others or self._held):
            return False
        while self._held:
            req, _n = self._pop(self._held)
            if req is None or not self._deliver(req):
                return True
        # a create queued before the batches must reach the daemon before they do
        while n_others and self.others and self.others[0].op == "create":
            n_others -= 1
            req, _n = self._pop(self.others)
            if req is None or not self._deliver(req):
                return True
        while n_batches > 0:
            take = min(self.max_batch, n_batches, self._fit)
            n_batches -= take
            # behind by more than max_queue: the oldest go to disk, not to memory
            overflowing = len(self.batches) > self.max_queue
            items = self._pop_items(take)
            if items is None:
                return True
            self._converting = True
            t0 = time.perf_counter()
            try:
                req, invalid = encode_batches(items, self._warned)
            finally:
                self._converting = False
            if len(items) >= 100:
                rate = len(items) / max(1e-6, time.perf_counter() - t0)
                self._rate = 0.5 * self._rate + 0.5 * rate
            if self._refit(len(items), req):  # over the body limit: back to the queue's
                with self._lock:  # front, in order, and taken again fewer at a time
                    if self._inflight is not items:
                        return True  # close() took them over
                    self.batches.extendleft(reversed(items))
                    self._inflight = None
                n_batches += len(items)
                continue
            with self._lock:
                if self._inflight is not items:
                    return True  # close() took them over
                self.rejected += invalid
                self._inflight = req
            if req is not None and not self._deliver(req, overflowing, items):
                return True
            if self._requeued:  # the daemon's limit is lower than ours: sent again, split
                n_batches += self._requeued
                self.rejected -= invalid  # counted again when they are encoded again
                self._requeued = 0
        while n_others > 0:  # the requests queued when the pass began, epochs merged
            req, taken = self._pop(self.others, n_others)
            if req is None or not self._deliver(req):
                return True
            n_others -= taken
        return True

    def _refit(self, n_items: int, req: Request | None) -> bool:
        """Learn how many batches fit a request from one encoded of ``n_items``; True if
        that one is over ``max_request_bytes`` and must be split (a single batch is sent as
        it is: the daemon refuses it if it is over its own limit)."""
        if req is None or not req.n_batches:
            return False
        size = len(req.body)
        fit = int(n_items * 0.9 * self.max_request_bytes / max(1, size))
        if size > self.max_request_bytes and n_items > 1:
            self._fit = max(1, min(n_items - 1, fit))
            return True
        self._fit = max(1, min(self.max_batch, fit))
        return False

    def _worker(self) -> None:
        while not (self._exit or self._abandoned):
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            with self._done:
                self._busy = True
            behind = False
            try:
                self._drain_once()
                # still behind (batches logged during the pass): the next pass goes now
                behind = not self._held and len(self.batches) >= self.wake_at
                if self.on_tick is not None and not self._closing:
                    self.on_tick()
            except Exception:  # never let an exporter bug end the worker
                if not self._abandoned:
                    logger.exception("h3: export failed")
            finally:
                with self._done:
                    self._busy = False
                    if self._held:  # no progress: the next try waits for the retry time
                        self._next_try = time.monotonic() + self._retry_pause()
                    elif behind:
                        self._wake.set()
                    self._done.notify_all()

    def _retry_pause(self) -> float:
        """How long a request held back waits for its next try: the exporter's back-off
        (``retry_in``, where it has one), at most ``flush_interval_s`` (the worker's own
        pace: the disk may take it sooner)."""
        retry_in = getattr(self.exporter, "retry_in", None)
        pause = (retry_in() if retry_in is not None else 0.0) or self.flush_interval_s
        return max(0.0, min(self.flush_interval_s, float(pause)))

    # --- control ---------------------------------------------------------------------------

    def _pending(self) -> bool:
        return bool(self.batches or self.others or self._held or self._inflight is not None)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Send everything queued so far; True if it finished within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._done:
            while self._pending() or self._busy:
                if self._abandoned or not self._thread.is_alive():
                    return False
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return False
                if self._busy:  # a pass is running: its end is notified, then decided on
                    self._done.wait(min(left, 0.05))
                    continue
                if self._held and not self._try_once:
                    # the last pass held a request back (neither the daemon nor the disk
                    # took it): waking the worker at once would only spin a core until the
                    # deadline; it tries again at the retry time
                    pause = self._next_try - now
                    if pause > 0:
                        self._done.wait(min(left, pause))
                        continue
                self._wake.set()
                self._done.wait(min(left, 0.05))
        return True

    def _take_over(self) -> None:
        """Stop the worker from taking more work; spool everything it has not finished.

        Runs on the calling thread, so it works when the worker is stuck (a daemon that
        accepts connections and never answers, say). Order in the spool: the request in
        flight, those held back, creates, the batches, then epochs and the final status.
        """
        with self._lock:
            self._abandoned = True
            first: list[Request | list[BatchItem]] = []
            if self._inflight is not None:
                first.append(self._inflight)
                self._inflight = None
            first.extend(self._held)
            self._held.clear()
            others = list(self.others)
            self.others.clear()
            items = list(self.batches)
            self.batches.clear()
        todo: list[Request] = []
        chunks = first + [r for r in others if r.op == "create"]
        chunks += [items[i : i + self.max_batch] for i in range(0, len(items), self.max_batch)]
        for chunk in chunks:
            if isinstance(chunk, Request):
                todo.append(chunk)
                continue
            start = 0
            while start < len(chunk):  # spool lines within the body limit, for `h3d import`
                part = chunk[start : start + self._fit]
                req, invalid = encode_batches(part, self._warned)
                if self._refit(len(part), req):
                    continue
                start += len(part)
                self.rejected += invalid
                if req is not None:
                    todo.append(req)
        todo += [r for r in others if r.op != "create"]
        for req in todo:
            if self.exporter.spool(req):
                self.spooled += req.n_batches
            else:
                self.lost_on_disk += req.n_batches

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is queued, stop the worker, shut the exporter down. Idempotent.

        Returns True if everything reached the daemon or the spool through the worker
        within ``timeout_s``. If not, whatever is left is spooled from this thread (counted
        as spooled, or as lost where the disk refused), starting early enough to finish in
        ``timeout_s`` at the rate the worker has been converting batches, so the call
        returns in about ``timeout_s`` however stuck the daemon or the worker is.
        """
        if self._close_result is not None:
            return self._close_result
        deadline = time.monotonic() + timeout_s
        self._closing = True
        self._try_once = True
        while True:
            # keep enough time to convert and spool what is still queued, at the rate the
            # worker has been converting (x2, plus a margin for the disk)
            backlog = len(self.batches) + sum(r.n_batches for r in self._held) + self.max_batch
            budget = deadline - time.monotonic() - 0.1 * timeout_s - 2 * backlog / self._rate
            if budget <= 0:
                ok = False
                break
            if self.flush(min(budget, 0.1)):
                ok = True
                break
        if not ok:
            self._take_over()
        self._exit = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.exporter.shutdown()
        if self._thread.is_alive():
            # closing the exporter's connection unblocks a worker stuck in a request; it
            # then sees it was abandoned and ends without touching tensors or the network.
            # A worker still converting tensors is waited for (briefly): torch code running
            # on a daemon thread while the interpreter finalises aborts the process.
            grace = time.monotonic() + 2.0
            self._thread.join(0.2)
            while self._converting and self._thread.is_alive() and time.monotonic() < grace:
                self._thread.join(0.05)
        self._close_result = ok
        return ok

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()
