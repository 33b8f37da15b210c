from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

from h3d.api._routes import Routes
from h3d.api.deps import SeenRun, SettingsDep, StoreDep
from h3d.api.schemas import BatchesIn, BatchIn, EpochsIn, IngestResult
from h3d.errors import NonFiniteLoss, PayloadTooLarge
from h3d.storage import repository as repo

router = Routes(prefix="/runs", tags=["ingest"])

F32_MAX = 3.4028234663852886e38  # per-sample losses are stored as float32


def _bad(b: BatchIn, what: str, allow_null: bool) -> NonFiniteLoss:
    hint = "" if allow_null else " (send it as null/NaN with nonfinite_as_null=true)"
    return NonFiniteLoss(
        f"batch seq={b.seq}: {what} is not a finite number (float32 for losses){hint}",
        details={"seq": b.seq, "field": what},
    )


def _check_values(b: BatchIn, values: Sequence[float], allow_null: bool, what: str) -> None:
    # fsum is NaN/inf iff some value is (or it overflows); max/min then bound the range
    # that float32 storage can hold. Three C-speed passes instead of a Python loop.
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if values and (not math.isfinite(total) or max(values) > F32_MAX or min(values) < -F32_MAX):
        raise _bad(b, what, allow_null)


def _packed(b: BatchIn, allow_null: bool) -> bytes | None:
    """The packed float32 losses, checked; non-finite ones become NaN (missing) if allowed."""
    raw = b.packed_losses()
    if raw is None:
        return None
    arr = array("f")
    arr.frombytes(raw)
    bad = (
        [i for i, v in enumerate(arr) if not math.isfinite(v)]
        if not math.isfinite(math.fsum(arr))
        else []
    )
    if bad and not allow_null:
        raise _bad(b, "losses_f32", allow_null)
    if any(not math.isnan(arr[i]) for i in bad):  # ±inf: stored as missing, like NaN
        for i in bad:
            arr[i] = math.nan
        raw = arr.tobytes()
    return raw


def _finite_or_null(b: BatchIn, allow_null: bool) -> None:
    """Reject a batch carrying NaN/inf unless the client sent them as missing values."""
    if b.loss is None:
        if not allow_null:
            raise _bad(b, "loss", allow_null)
    elif not math.isfinite(b.loss):
        raise _bad(b, "loss", allow_null)
    if b.losses is not None:
        values = [v for v in b.losses if v is not None]
        if len(values) != len(b.losses) and not allow_null:
            raise _bad(b, "losses", allow_null)
        _check_values(b, values, allow_null, "losses")


@router.post("/{run_id}/batches", response_model=IngestResult, dependencies=[SeenRun])
async def post_batches(
    run_id: str, body: BatchesIn, store: StoreDep, settings: SettingsDep
) -> IngestResult:
    # async: the checks below are a few C-speed passes, and the write is awaited, so an
    # ingest never takes a threadpool thread (see Store.write_async).
    if len(body.batches) > settings.max_batches_per_request:
        raise PayloadTooLarge(
            f"{len(body.batches)} batches in one request; the limit is "
            f"{settings.max_batches_per_request}"
        )
    rows = []
    for b in body.batches:
        _finite_or_null(b, body.nonfinite_as_null)
        packed = _packed(b, body.nonfinite_as_null)
        rows.append(
            repo.BatchRow(
                seq=b.seq,
                t=b.t,
                loss=b.loss,
                n=b.n,
                epoch=b.epoch,
                step=b.step,
                phase=b.phase,
                rank=b.rank if b.rank is not None else body.rank,
                losses=packed if packed is not None else b.losses,
                indices=b.packed_indices() if b.indices_i64 is not None else b.indices,
            )
        )
    accepted, dups = await store.write_async(
        lambda s: repo.add_batches(s, run_id=run_id, batches=rows)
    )
    return IngestResult(accepted=accepted, duplicates=dups)


@router.post("/{run_id}/epochs", response_model=IngestResult, dependencies=[SeenRun])
async def post_epochs(run_id: str, body: EpochsIn, store: StoreDep) -> IngestResult:
    for e in body.epochs:
        values = [e.t, e.accuracy, e.loss, e.val_loss, *e.metrics.values()]
        if any(v is not None and not math.isfinite(v) for v in values):
            raise NonFiniteLoss(
                f"epoch {e.epoch}: a value is not a finite number", details={"epoch": e.epoch}
            )
    epochs = [e.model_dump() for e in body.epochs]
    accepted, dups = await store.write_async(
        lambda s: repo.add_epochs(s, run_id=run_id, epochs=epochs)
    )
    return IngestResult(accepted=accepted, duplicates=dups)
