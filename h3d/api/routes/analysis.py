from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from h3d import analysis
from h3d.api.deps import SamplerDep, SessionDep, SettingsDep
from h3d.api.schemas import EnergyPublic, EtaPublic, SeriesPublic
from h3d.errors import InvalidInput
from h3d.power.sampler import PowerSampler
from h3d.storage import repository as repo
from h3d.storage.engine import session_scope

router = APIRouter(tags=["analysis"])


def _fresh(sampler: PowerSampler | None) -> None:
    """Write the sampler's pending readings so a query sees up to now."""
    if sampler is not None:
        sampler.flush()


@router.get("/runs/{run_id}/energy", response_model=EnergyPublic)
def get_energy(
    run_id: str, session: SessionDep, settings: SettingsDep, sampler: SamplerDep
) -> dict[str, Any]:
    _fresh(sampler)
    run = repo.get_run(session, run_id=run_id)
    return analysis.run_energy(
        session, run=run, interval_s=settings.sample_interval_s, settings=settings
    )


@router.get("/runs/{run_id}/eta", response_model=EtaPublic)
def get_eta(
    run_id: str,
    session: SessionDep,
    settings: SettingsDep,
    sampler: SamplerDep,
    window: float = Query(60.0, gt=0, le=30 * 86400, description="Marginal-η window (s)."),
) -> dict[str, Any]:
    _fresh(sampler)
    run = repo.get_run(session, run_id=run_id)
    return analysis.run_eta(
        session, run=run, window_s=window, interval_s=settings.sample_interval_s
    )


@router.get("/runs/{run_id}/series", response_model=SeriesPublic)
def get_series(
    run_id: str,
    session: SessionDep,
    settings: SettingsDep,
    sampler: SamplerDep,
    metric: Literal["loss", "power", "eta", "energy"] = "loss",
    points: int = Query(500, ge=3, le=20_000),
    device: str | None = Query(
        None, max_length=200, description="metric=power only: one device's power, not the sum."
    ),
) -> SeriesPublic:
    _fresh(sampler)
    run = repo.get_run(session, run_id=run_id)
    if device is not None and metric != "power":
        raise InvalidInput("device is a filter of metric=power only")
    if metric == "loss":
        pts = analysis.loss_series(session, run=run, points=points)
    elif metric == "power":
        pts = analysis.power_series(session, run=run, points=points, device=device)
    else:
        pts = analysis.cumulative_series(
            session,
            run=run,
            points=min(points, 500),
            interval_s=settings.sample_interval_s,
            metric=metric,
        )
    return SeriesPublic(run_id=run.id, metric=metric, points=pts)


@router.get("/runs/{run_id}/report")
def get_report(
    run_id: str,
    session: SessionDep,
    settings: SettingsDep,
    sampler: SamplerDep,
    window: float = Query(60.0, gt=0, le=30 * 86400),
) -> dict[str, Any]:
    _fresh(sampler)
    run = repo.get_run(session, run_id=run_id)
    return analysis.run_report(
        session, run=run, interval_s=settings.sample_interval_s, window_s=window, settings=settings
    )


CSV_COLUMNS = ("seq", "t", "epoch", "step", "phase", "n", "loss")


@router.get("/runs/{run_id}/export.csv", response_class=StreamingResponse)
def export_csv(run_id: str, request: Request, session: SessionDep) -> StreamingResponse:
    repo.get_run(session, run_id=run_id)  # 404 before the stream starts
    factory = request.state.session_factory

    def rows() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        with session_scope(factory) as s:
            for i, b in enumerate(repo.iter_batches(s, run_id=run_id)):
                writer.writerow([b.seq, repr(b.t), b.epoch, b.step, b.phase, b.n, b.loss])
                if i % 2000 == 1999:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(
        rows(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{run_id}.csv"'},
    )


@router.get("/compare")
def compare(
    session: SessionDep,
    settings: SettingsDep,
    sampler: SamplerDep,
    runs: str = Query(..., description="Comma-separated run ids (2 to 20)."),
) -> dict[str, Any]:
    ids = [r for r in (x.strip() for x in runs.split(",")) if r]
    if not 1 <= len(ids) <= 20:
        raise InvalidInput("compare takes 1 to 20 comma-separated run ids")
    _fresh(sampler)
    out = []
    for rid in ids:
        run = repo.get_run(session, run_id=rid)
        rep = analysis.run_report(session, run=run, interval_s=settings.sample_interval_s)
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
