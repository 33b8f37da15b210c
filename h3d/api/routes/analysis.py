from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import Annotated, Any, Literal

from fastapi import Query
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from h3d import analysis
from h3d.api._routes import Routes
from h3d.api.deps import SettingsDep, StoreDep
from h3d.api.schemas import CheckText, EnergyPublic, EtaPublic, SeriesPublic, Text
from h3d.errors import InvalidInput
from h3d.storage import repository as repo

# Every read sees the sampler's readings up to now without flushing them: store.read()
# adds the ones not committed yet (h3d/storage/engine.py, Store.overlay).
router = Routes(tags=["analysis"])


@router.get("/runs/{run_id}/energy", response_model=EnergyPublic)
def get_energy(run_id: Text, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    with store.read() as s:
        run = repo.get_run(s, run_id=run_id)
        return analysis.run_energy(
            s, run=run, interval_s=settings.sample_interval_s, settings=settings
        )


@router.get("/runs/{run_id}/eta", response_model=EtaPublic)
def get_eta(
    run_id: Text,
    store: StoreDep,
    settings: SettingsDep,
    window: float = Query(
        60.0, gt=0, le=30 * 86400, allow_inf_nan=False, description="Marginal-η window (s)."
    ),
) -> dict[str, Any]:
    with store.read() as s:
        run = repo.get_run(s, run_id=run_id)
        return analysis.run_eta(s, run=run, window_s=window, interval_s=settings.sample_interval_s)


@router.get("/runs/{run_id}/series", response_model=SeriesPublic)
def get_series(
    run_id: Text,
    store: StoreDep,
    settings: SettingsDep,
    metric: Literal["loss", "power", "eta", "energy"] = "loss",
    points: int = Query(500, ge=3, le=20_000),
    agg: Annotated[
        Literal["lttb", "mean"],
        Query(
            description="metric=loss only. lttb: the batches LTTB keeps (the curve's shape, its "
            "spikes too); mean: each point the mean loss (weighted by n) and mean time of a "
            "bucket of bucket_batches consecutive batches (the loss's level)."
        ),
    ] = "lttb",
    device: Annotated[
        Annotated[str, StringConstraints(max_length=200), CheckText] | None,
        Query(
            description="metric=power only: one device's power, not the sum. Names are unique "
            "per node only: on a run over several nodes that have it, give node as well."
        ),
    ] = None,
    node: Annotated[
        Annotated[str, StringConstraints(max_length=255), CheckText] | None,
        Query(description="metric=power only: the devices of this node of the run only."),
    ] = None,
) -> SeriesPublic:
    if (device is not None or node is not None) and metric != "power":
        raise InvalidInput("device and node are filters of metric=power only")
    if agg != "lttb" and metric != "loss":
        raise InvalidInput("agg=mean is for metric=loss only")
    bucket: int | None = None
    with store.read() as s:
        run = repo.get_run(s, run_id=run_id)
        if metric == "loss" and agg == "mean":
            pts, bucket = analysis.loss_means(s, run=run, points=points)
        elif metric == "loss":
            pts = analysis.loss_series(s, run=run, points=points)
        elif metric == "power":
            pts = analysis.power_series(
                s,
                run=run,
                points=points,
                device=device,
                node=node,
                interval_s=settings.sample_interval_s,
            )
        else:
            pts = analysis.cumulative_series(
                s,
                run=run,
                points=points,
                interval_s=settings.sample_interval_s,
                metric=metric,
            )
    return SeriesPublic(
        run_id=run.id, metric=metric, points=[[x, y] for x, y in pts], bucket_batches=bucket
    )


@router.get("/runs/{run_id}/report")
def get_report(
    run_id: Text,
    store: StoreDep,
    settings: SettingsDep,
    window: float = Query(60.0, gt=0, le=30 * 86400, allow_inf_nan=False),
) -> dict[str, Any]:
    with store.read() as s:
        run = repo.get_run(s, run_id=run_id)
        return analysis.run_report(
            s, run=run, interval_s=settings.sample_interval_s, window_s=window, settings=settings
        )


CSV_COLUMNS = ("seq", "t", "epoch", "step", "rank", "phase", "n", "loss")
SAMPLE_CSV_COLUMNS = ("seq", "epoch", "index", "loss")


def _csv_download(
    store: Any,
    run_id: str,
    filename: str,
    columns: tuple[str, ...],
    page: Callable[[Any, int], tuple[list[Sequence[Any]], int | None]],
) -> StreamingResponse:
    """A run's rows as streamed CSV. ``page(session, after_seq)`` gives the next page's rows
    and its last seq (None: no more)."""
    with store.read() as s:
        repo.get_run(s, run_id=run_id)  # 404 before the stream starts

    def rows() -> Iterator[str]:
        # Starlette pulls each chunk in a threadpool thread of its own: a session is
        # opened per page, never held across those hops.
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        last = -1
        while True:
            with store.read() as s:
                lines, end = page(s, last)
            if end is None:
                break
            writer.writerows(lines)
            last = end
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(
        rows(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _csv_responses(what: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": what, "content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.get(
    "/runs/{run_id}/export.csv",
    response_class=StreamingResponse,
    responses=_csv_responses("The run's batches, one row a batch, in seq order."),
)
def export_csv(run_id: Text, store: StoreDep) -> StreamingResponse:
    """The run's batches as CSV: ``seq``, ``t`` (Unix seconds), ``epoch``, ``step``,
    ``rank`` (empty for a one-process run), ``phase``, ``n`` (the batch's weight in the loss:
    its samples, 1 when none was sent) and ``loss`` (nats; empty where it was not finite)."""

    def page(s: Any, after: int) -> tuple[list[Sequence[Any]], int | None]:
        got = repo.batch_page(s, run_id=run_id, after_seq=after, limit=2000)
        lines: list[Sequence[Any]] = [
            (
                b.seq,
                repr(b.t),
                b.epoch,
                b.step,
                b.rank,
                b.phase,
                1 if b.n is None else b.n,  # the weight the daemon gives it
                b.loss,
            )
            for b in got
        ]
        return lines, (got[-1].seq if got else None)

    return _csv_download(store, run_id, f"{run_id}.csv", CSV_COLUMNS, page)


@router.get(
    "/runs/{run_id}/samples.csv",
    response_class=StreamingResponse,
    responses=_csv_responses("The run's per-sample losses, one row a sample, in seq order."),
)
def export_samples_csv(run_id: Text, store: StoreDep) -> StreamingResponse:
    """The per-sample losses the client logged (``log_batch(..., losses=, indices=)``), one
    row per sample: its batch's seq and epoch, its dataset index (empty if none was logged)
    and its loss in nats (float32, empty where it was not finite). Batches logged without
    per-sample losses have no rows."""

    def page(s: Any, after: int) -> tuple[list[Sequence[Any]], int | None]:
        got = repo.sample_loss_page(s, run_id=run_id, after_seq=after, limit=200)
        lines: list[Sequence[Any]] = []
        for seq, epoch, losses, indices in got:
            # 9 significant digits: every float32 reads back exactly
            vals = ["" if math.isnan(v) else f"{v:.9g}" for v in losses]
            where = indices if indices is not None else [""] * len(vals)
            lines += zip(repeat(seq), repeat(epoch), where, vals, strict=False)
        return lines, (got[-1][0] if got else None)

    return _csv_download(store, run_id, f"{run_id}-samples.csv", SAMPLE_CSV_COLUMNS, page)


@router.get("/compare")
def compare(
    store: StoreDep,
    settings: SettingsDep,
    runs: Annotated[
        Annotated[
            str,
            # the count (1 to 20) is checked after splitting, not by a length: the spaces
            # the pattern allows around the commas made 20 ids "too long"
            StringConstraints(
                min_length=1, max_length=8192, pattern=r"^\s*[^,\s]+\s*(,\s*[^,\s]+\s*)*$"
            ),
            CheckText,
        ],
        Query(description="Comma-separated run ids (1 to 20)."),
    ],
) -> dict[str, Any]:
    ids = [r for r in (x.strip() for x in runs.split(",")) if r]
    if not 1 <= len(ids) <= 20:
        raise InvalidInput(f"compare takes 1 to 20 comma-separated run ids, not {len(ids)}")
    out = []
    for rid in ids:
        with store.read() as s:
            run = repo.get_run(s, run_id=rid)
            rep = analysis.run_report(s, run=run, interval_s=settings.sample_interval_s)
        last_acc = next(
            (e["accuracy"] for e in reversed(rep["epochs"]) if e["accuracy"] is not None), None
        )
        out.append(
            {
                "run_id": rid,
                "name": run.name,
                "status": run.status,
                "duration_s": rep["duration_s"],
                "n_batches": rep["n_batches"],
                "energy_j": rep["energy"]["energy_j"],
                "source": rep["energy"]["source"],
                "measured": rep["energy"]["measured"],
                "info_gain_bits": rep["eta"]["info_gain_bits"],
                "eta_bits_per_j": rep["eta"]["eta_bits_per_j"],
                "final_accuracy": last_acc,
                "loss_now": rep["eta"]["loss_now"],
            }
        )
    return {"runs": out}
