"""Run-level figures built from the store: energy, η, series, reports.

Functions take a session and the sampler's device table; they read, never write.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from sqlalchemy.orm import Session

from h3d import efficiency as eff
from h3d.downsample import lttb
from h3d.energy import Integral, integrate
from h3d.power.base import MEASURED_SOURCES
from h3d.storage import repository as repo
from h3d.storage.models import Run


def window(run: Run, now: float | None = None) -> tuple[float, float]:
    end = run.finished_at if run.finished_at is not None else (now or time.time())
    return run.created_at, max(end, run.created_at)


def _max_gap(interval_s: float) -> float:
    return max(1.0, 10.0 * interval_s)


def device_integrals(
    session: Session, *, t0: float, t1: float, interval_s: float
) -> list[tuple[Any, Integral]]:
    out = []
    for dev in repo.devices(session):
        samples = repo.power_window(session, device_id=dev.id, t0=t0, t1=t1)
        if not samples:
            continue
        integral = integrate(samples, t0, t1, max_gap_s=_max_gap(interval_s))
        if integral.method != "none":
            out.append((dev, integral))
    return out


def combined_source(sources: set[str]) -> str:
    if not sources:
        return "none"
    return sources.pop() if len(sources) == 1 else "mixed"


def energy_between(session: Session, *, t0: float, t1: float, interval_s: float) -> dict[str, Any]:
    parts = device_integrals(session, t0=t0, t1=t1, interval_s=interval_s)
    by_device = []
    for dev, integral in parts:
        share = 1.0  # per-process attribution: see the power-measurement issue
        by_device.append(
            {
                "device": dev.name,
                "kind": dev.kind,
                "source": dev.source,
                "model": dev.model,
                "method": integral.method,
                "energy_j": integral.energy_j * share,
                "device_energy_j": integral.energy_j,
                "share": share,
                "attribution": "whole_device",
                "n_samples": integral.n_samples,
                "covered_s": integral.covered_s,
                "gaps_s": integral.gaps_s,
            }
        )
    total = sum(d["energy_j"] for d in by_device) if by_device else None
    device_total = sum(d["device_energy_j"] for d in by_device) if by_device else None
    sources = {d["source"] for d in by_device}
    return {
        "energy_j": total,
        "device_energy_j": device_total,
        "source": combined_source(set(sources)),
        "measured": bool(sources) and sources <= MEASURED_SOURCES,
        "t_start": t0,
        "t_end": t1,
        "duration_s": t1 - t0,
        "by_device": by_device,
    }


def run_energy(
    session: Session, *, run: Run, interval_s: float, now: float | None = None
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    return {"run_id": run.id, **energy_between(session, t0=t0, t1=t1, interval_s=interval_s)}


def _points(session: Session, run_id: str) -> list[eff.BatchPoint]:
    return [
        (t, loss, float(n) if n else 1.0)
        for _seq, t, loss, n, _epoch, _phase in repo.batch_points(session, run_id=run_id)
        if loss is not None and math.isfinite(loss)
    ]


def run_eta(
    session: Session, *, run: Run, window_s: float, interval_s: float, now: float | None = None
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    pts = _points(session, run.id)
    k = eff.smoothing_k(len(pts))
    l0 = eff.loss_at_start(pts) if len(pts) >= 2 else None
    lt = eff.smoothed(pts[-k:]) if len(pts) >= 2 else None
    bits = eff.info_gain_bits(l0, lt)
    energy = energy_between(session, t0=t0, t1=t1, interval_s=interval_s)
    t_last = pts[-1][0] if pts else t1
    w0 = max(t0, t_last - window_s)
    l_w = eff.loss_before(pts, w0, k) if pts else None
    if l_w is None and len(pts) >= 2:  # the run is younger than the window: since its start
        l_w = l0
    w_energy = energy_between(session, t0=w0, t1=t_last, interval_s=interval_s) if pts else None
    w_bits = eff.info_gain_bits(l_w, lt)
    return {
        "run_id": run.id,
        "eta_bits_per_j": eff.eta(bits, energy["energy_j"]),
        "marginal_eta_bits_per_j": eff.eta(w_bits, w_energy["energy_j"] if w_energy else None),
        "window_s": window_s,
        "info_gain_bits": bits,
        "info_gain_total_bits": bits * run.n_train if bits is not None and run.n_train else None,
        "loss_start": l0,
        "loss_now": lt,
        "energy_j": energy["energy_j"],
        "window_energy_j": w_energy["energy_j"] if w_energy else None,
        "source": energy["source"],
        "measured": energy["measured"],
        "smoothing_batches": k,
        "t": t1,
    }


def loss_series(session: Session, *, run_id: str, points: int) -> list[tuple[float, float]]:
    pts = [(t, loss) for t, loss, _n in _points(session, run_id)]
    return lttb(pts, points)


def power_series(
    session: Session, *, run: Run, points: int, now: float | None = None
) -> list[tuple[float, float]]:
    t0, t1 = window(run, now)
    total: dict[float, float] = defaultdict(float)
    for dev in repo.devices(session):
        for t, p, _e in repo.power_window(session, device_id=dev.id, t0=t0, t1=t1):
            if p is not None and t0 <= t <= t1:
                total[t] += p
    return lttb(sorted(total.items()), points)


def cumulative_series(
    session: Session,
    *,
    run: Run,
    points: int,
    interval_s: float,
    metric: str,
    now: float | None = None,
) -> list[tuple[float, float]]:
    """Cumulative energy, or η since start, on a grid of at most ``points`` batch times."""
    t0, _t1 = window(run, now)
    pts = _points(session, run.id)
    if len(pts) < 2:
        return []
    k = eff.smoothing_k(len(pts))
    l0 = eff.loss_at_start(pts)
    step = max(1, len(pts) // max(points, 1))
    out = []
    for i in range(k, len(pts), step):
        t = pts[i][0]
        e = energy_between(session, t0=t0, t1=t, interval_s=interval_s)["energy_j"]
        if metric == "energy":
            if e is not None:
                out.append((t, e))
            continue
        v = eff.eta(eff.info_gain_bits(l0, eff.smoothed(pts[i - k + 1 : i + 1])), e)
        if v is not None:
            out.append((t, v))
    return out


def run_report(
    session: Session,
    *,
    run: Run,
    interval_s: float,
    window_s: float = 60.0,
    now: float | None = None,
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    eta = run_eta(session, run=run, window_s=window_s, interval_s=interval_s, now=now)
    energy = run_energy(session, run=run, interval_s=interval_s, now=now)
    rows = repo.batch_points(session, run_id=run.id)
    by_epoch: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    by_phase: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for _seq, t, loss, n, epoch, phase in rows:
        if loss is None or not math.isfinite(loss):
            continue
        p = (t, loss, float(n) if n else 1.0)
        if epoch is not None:
            by_epoch[epoch].append(p)
        if phase is not None:
            by_phase[phase].append(p)
    epoch_rows = {e.epoch: e for e in repo.epochs(session, run_id=run.id)}
    epochs_out = []
    k_run = eff.smoothing_k(sum(len(v) for v in by_epoch.values()))
    prev_t, prev_loss = t0, eta["loss_start"]
    for ep in sorted(set(by_epoch) | set(epoch_rows)):
        pts = by_epoch.get(ep, [])
        row = epoch_rows.get(ep)
        t_end = row.t if row is not None else (pts[-1][0] if pts else prev_t)
        # ΔI of an epoch: smoothed loss at its end against the one at the previous end
        end_loss = eff.smoothed(pts[-k_run:]) if pts else (row.loss if row is not None else None)
        e = energy_between(session, t0=prev_t, t1=max(t_end, prev_t), interval_s=interval_s)
        bits = eff.info_gain_bits(prev_loss, end_loss)
        epochs_out.append(
            {
                "epoch": ep,
                "t_end": t_end,
                "phase": row.phase if row is not None else None,
                "loss": eff.smoothed(pts) if pts else (row.loss if row is not None else None),
                "end_loss": end_loss,
                "accuracy": row.accuracy if row is not None else None,
                "val_loss": row.val_loss if row is not None else None,
                "metrics": row.metrics if row is not None else {},
                "energy_j": e["energy_j"],
                "info_gain_bits": bits,
                "eta_bits_per_j": eff.eta(bits, e["energy_j"]),
            }
        )
        prev_t = t_end
        prev_loss = end_loss if end_loss is not None else prev_loss
    phases_out = []
    for name, pts in by_phase.items():
        a, b = pts[0][0], pts[-1][0]
        k = eff.smoothing_k(len(pts))
        bits = eff.info_gain_bits(eff.loss_at_start(pts), eff.smoothed(pts[-k:]))
        e = energy_between(session, t0=a, t1=b, interval_s=interval_s)
        phases_out.append(
            {
                "phase": name,
                "t_start": a,
                "t_end": b,
                "batches": len(pts),
                "energy_j": e["energy_j"],
                "info_gain_bits": bits,
                "eta_bits_per_j": eff.eta(bits, e["energy_j"]),
            }
        )
    phases_out.sort(key=lambda p: p["t_start"])
    return {
        "run": run.id,
        "name": run.name,
        "status": run.status,
        "duration_s": t1 - t0,
        "n_batches": run.n_batches,
        "n_nonfinite": run.n_nonfinite,
        "energy": energy,
        "eta": eta,
        "epochs": epochs_out,
        "phases": phases_out,
        "landauer_bits_per_j_300k": eff.LANDAUER_BITS_PER_J_300K,
    }
