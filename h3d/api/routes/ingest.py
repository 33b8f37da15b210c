from __future__ import annotations

import math
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import cast

import anyio.to_thread
from fastapi import Request
from sqlalchemy.orm import Session

from h3d import reaper
from h3d.api._routes import PARSE_IN_THREAD_BYTES, Routes
from h3d.api.deps import SeenRun, SettingsDep, StoreDep
from h3d.api.schemas import (
    COLUMNS_MEDIA_TYPE,
    FUTURE_SLACK_S,
    BatchColumns,
    BatchesIn,
    BatchIn,
    EpochsIn,
    IngestResult,
    Text,
    nonfinite_positions,
)
from h3d.errors import InvalidInput, NonFiniteLoss, PayloadTooLarge
from h3d.storage import repository as repo
from h3d.storage.engine import Store

router = Routes(prefix="/runs", tags=["ingest"])

F32_MAX = 3.4028234663852886e38  # per-sample losses are stored as float32
# A run logs an epoch a request (the client does); a spool replayed by hand may carry more.
MAX_EPOCHS_PER_REQUEST = 10_000


def _bad(seq: int, what: str, allow_null: bool) -> NonFiniteLoss:
    hint = "" if allow_null else " (send it as null/NaN with nonfinite_as_null=true)"
    return NonFiniteLoss(
        f"batch seq={seq}: {what} is not a finite number (float32 for losses){hint}",
        details={"seq": seq, "field": what},
    )


def _latest_t() -> float:
    """The latest ``t`` a batch or an epoch may carry (as a run's ``created_at``)."""
    return time.time() + FUTURE_SLACK_S


def _bad_time(what: str, t: float, key: dict[str, int]) -> InvalidInput:
    """A ``t`` outside 1970 … a day from now. It cuts the run's energy windows (marginal η,
    per epoch, per phase) and its series' x axis, and a resend of the batch is a duplicate:
    stored, it could never be repaired. Far out is most often milliseconds or nanoseconds."""
    return InvalidInput(
        f"{what}: t={t!r} is not Unix seconds between 1970 and a day from now (a time in "
        "milliseconds or nanoseconds?)",
        details={**key, "field": "t", "t": t},
    )


def _check_values(b: BatchIn, values: Sequence[float], allow_null: bool, what: str) -> None:
    # max/min bound the range that float32 storage can hold: C-speed passes, no Python loop
    if values and (nonfinite_positions(values) or max(values) > F32_MAX or min(values) < -F32_MAX):
        raise _bad(b.seq, what, allow_null)


def _f32_block(raw: bytes, allow_null: bool) -> tuple[bytes, list[int]]:
    """Packed float32 values and the positions of the non-finite ones; with ``allow_null``
    every one of them is NaN (missing) in the bytes returned."""
    arr = array("f")
    arr.frombytes(raw)
    bad = nonfinite_positions(arr)
    if bad and allow_null and any(not math.isnan(arr[i]) for i in bad):
        for i in bad:  # ±inf: stored as missing, like NaN
            arr[i] = math.nan
        raw = arr.tobytes()
    return raw, bad


def _packed(b: BatchIn, allow_null: bool) -> bytes | None:
    """The packed float32 losses, checked; non-finite ones become NaN (missing) if allowed."""
    raw = b.packed_losses()
    if raw is None:
        return None
    raw, bad = _f32_block(raw, allow_null)
    if bad and not allow_null:
        raise _bad(b.seq, "losses_f32", allow_null)
    return raw


def _split(block: bytes | None, sizes: Sequence[int], width: int) -> list[bytes | None]:
    """Each batch's slice of a concatenated block (None where its size is -1)."""
    if block is None:
        return [None] * len(sizes)
    out: list[bytes | None] = []
    at = 0
    for n in sizes:
        if n < 0:
            out.append(None)
        else:
            out.append(block[at : at + n * width])
            at += n * width
    return out


def _column_rows(c: BatchColumns, allow_null: bool, rank: int | None) -> list[repo.BatchRow]:
    """The rows of a columnar request (validation has checked its lengths and ranges)."""
    seqs, k = c.seqs(), len(c)
    times, latest = c.times(), _latest_t()
    if k and (min(times) < 0.0 or max(times) > latest):  # C-speed passes; a scan if one fails
        i = next(i for i, t in enumerate(times) if not 0.0 <= t <= latest)
        raise _bad_time(f"batch seq={seqs[i]}", times[i], {"seq": seqs[i]})
    losses: list[float | None] = list(c.losses())
    bad = nonfinite_positions(cast("list[float]", losses))
    if bad and not allow_null:
        raise _bad(seqs[bad[0]], "loss_f64", allow_null)
    for i in bad:
        losses[i] = None
    sizes: Sequence[int] = c.sizes() or [-1] * k
    vectors: list[bytes | None] = [None] * k
    indices = vectors
    if c.losses_f32 is not None:
        raw, bad = _f32_block(c.losses_f32, allow_null)
        if bad and not allow_null:
            ends = list(accumulate(max(n, 0) for n in sizes))
            raise _bad(seqs[bisect_right(ends, bad[0])], "losses_f32", allow_null)
        vectors, indices = _split(raw, sizes, 4), _split(c.indices_i64, sizes, 8)
    none = [None] * k
    # n defaults to a batch's number of per-sample losses, also where the n column is null
    ns = [n if n >= 0 else None for n in sizes]
    if c.n is not None:
        ns = [m if n is None else n for n, m in zip(c.n, ns, strict=True)]
    return [
        repo.BatchRow(seq=q, t=t, loss=v, n=n, epoch=e, step=s, phase=p, rank=rank,
                      losses=vec, indices=idx)
        for q, t, v, n, e, s, p, vec, idx in zip(
            seqs, times, losses, ns, c.epoch or none, c.step or none, c.phase or none,
            vectors, indices, strict=True,
        )
    ]  # fmt: skip


def _finite_or_null(b: BatchIn, allow_null: bool) -> None:
    """Reject a batch carrying NaN/inf unless the client sent them as missing values."""
    if b.loss is None:
        if not allow_null:
            raise _bad(b.seq, "loss", allow_null)
    elif not math.isfinite(b.loss):
        raise _bad(b.seq, "loss", allow_null)
    if b.losses is not None:
        values = [v for v in b.losses if v is not None]
        if len(values) != len(b.losses) and not allow_null:
            raise _bad(b.seq, "losses", allow_null)
        _check_values(b, values, allow_null, "losses")


def _row(b: BatchIn, body: BatchesIn, latest: float) -> repo.BatchRow:
    if not 0.0 <= b.t <= latest:
        raise _bad_time(f"batch seq={b.seq}", b.t, {"seq": b.seq})
    _finite_or_null(b, body.nonfinite_as_null)
    packed = _packed(b, body.nonfinite_as_null)
    # n defaults to the batch's number of per-sample losses, as in the columns form: L is
    # sample-weighted, and a batch of 64 samples weighs 64, not 1
    return repo.BatchRow(
        seq=b.seq,
        t=b.t,
        loss=b.loss,
        n=b.n if b.n is not None else b.sample_count(),
        epoch=b.epoch,
        step=b.step,
        phase=b.phase,
        rank=b.rank if b.rank is not None else body.rank,
        losses=packed if packed is not None else b.losses,
        indices=b.packed_indices() if b.indices_i64 is not None else b.indices,
    )


def is_replay(request: Request) -> bool:
    """A spool's replay (``h3d import``, a profiler's): it may fill a run the reaper failed
    (see h3d/reaper.py)."""
    return request.headers.get(reaper.REPLAY_HEADER) == "1"


async def _write(
    store: Store, request: Request, run_id: str, add: Callable[[Session], tuple[int, int]]
) -> tuple[int, int]:
    """``add`` rows to the run in one awaited write; a replay's may fill a run the reaper
    failed (:func:`h3d.reaper.replaying`)."""
    replay, now = is_replay(request), time.time()

    def write(s: Session) -> tuple[int, int]:
        with reaper.replaying(s, run_id, replay=replay, now=now):
            return add(s)

    return await store.write_async(write)


@router.post(
    "/{run_id}/batches",
    response_model=IngestResult,
    dependencies=[SeenRun],
    # the binary form of the same body (BatchesIn.from_binary), beside the JSON one
    openapi_extra={
        "requestBody": {
            "content": {
                COLUMNS_MEDIA_TYPE: {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "(see BatchesIn.from_binary in docs/daemon.md)",
                }
            }
        }
    },
)
async def post_batches(
    run_id: Text, body: BatchesIn, store: StoreDep, settings: SettingsDep, request: Request
) -> IngestResult:
    # async: the checks below are a few C-speed passes, and the write is awaited, so an
    # ingest never takes a threadpool thread (see Store.write_async). A large body in rows
    # was parsed and validated in a worker thread (JSONRoute); its rows are checked in one
    # too: a Python call per batch, ~0.1 s for 2 000 batches of 1 500 per-sample losses.
    if body.count() > settings.max_batches_per_request:
        raise PayloadTooLarge(
            f"{body.count()} batches in one request; the limit is "
            f"{settings.max_batches_per_request}"
        )
    if body.columns is not None:
        rows = _column_rows(body.columns, body.nonfinite_as_null, body.rank)
    else:
        latest, batches = _latest_t(), body.batches or []

        def check() -> list[repo.BatchRow]:
            return [_row(b, body, latest) for b in batches]

        if len(await request.body()) > PARSE_IN_THREAD_BYTES:
            rows = await anyio.to_thread.run_sync(check)
        else:
            rows = check()
    accepted, dups = await _write(
        store, request, run_id, lambda s: repo.add_batches(s, run_id=run_id, batches=rows)
    )
    return IngestResult(accepted=accepted, duplicates=dups)


@router.post("/{run_id}/epochs", response_model=IngestResult, dependencies=[SeenRun])
async def post_epochs(
    run_id: Text, body: EpochsIn, store: StoreDep, request: Request
) -> IngestResult:
    if len(body.epochs) > MAX_EPOCHS_PER_REQUEST:
        raise PayloadTooLarge(
            f"{len(body.epochs)} epochs in one request; the limit is {MAX_EPOCHS_PER_REQUEST}"
        )
    latest = _latest_t()
    for e in body.epochs:
        values = [e.t, e.accuracy, e.loss, e.val_loss, *e.metrics.values()]
        if any(v is not None and not math.isfinite(v) for v in values):
            raise NonFiniteLoss(
                f"epoch {e.epoch}: a value is not a finite number", details={"epoch": e.epoch}
            )
        if not 0.0 <= e.t <= latest:
            raise _bad_time(f"epoch {e.epoch}", e.t, {"epoch": e.epoch})
    epochs = [e.model_dump() for e in body.epochs]
    accepted, dups = await _write(
        store, request, run_id, lambda s: repo.add_epochs(s, run_id=run_id, epochs=epochs)
    )
    return IngestResult(accepted=accepted, duplicates=dups)
