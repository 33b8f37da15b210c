"""Run-level figures built from the store: energy, η, series, reports.

Functions take a session and the sampler's device table; they read, never write.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from h3d.config import Settings

from h3d import carbon
from h3d import efficiency as eff
from h3d.downsample import lttb
from h3d.energy import EnergyCurve
from h3d.power.base import MEASURED_SOURCES, caveat
from h3d.storage import repository as repo
from h3d.storage.models import Device, Run


def window(run: Run, now: float | None = None) -> tuple[float, float]:
    end = run.finished_at if run.finished_at is not None else (now or time.time())
    return run.created_at, max(end, run.created_at)


def _max_gap(interval_s: float) -> float:
    return max(1.0, 10.0 * interval_s)


def combined_source(sources: set[str]) -> str:
    if not sources:
        return "none"
    return sources.pop() if len(sources) == 1 else "mixed"


def share_kind(dev: Device) -> str:
    return f"gpu:{dev.name}" if dev.kind == "gpu" else "cpu"


@dataclass
class _DeviceModel:
    dev: Device
    curve: EnergyCurve
    # piecewise-constant share of the device: (start, share); each piece runs to the next
    starts: list[float]
    shares: list[float]

    def attributed(self, a: float, b: float, idle_w: float | None) -> tuple[float, float | None]:
        """(energy × share, (energy − idle) × share) over [a, b]."""
        if not self.starts:
            e = self.curve.between(a, b)
            return e, (max(0.0, e - idle_w * (b - a)) if idle_w is not None else None)
        total = active = 0.0
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        while i < len(self.starts) and (i == 0 or self.starts[i] < b):
            pa = a if i == 0 else max(a, self.starts[i])
            pb = b if i + 1 >= len(self.starts) else min(b, self.starts[i + 1])
            if pb > pa:
                e = self.curve.between(pa, pb)
                total += self.shares[i] * e
                if idle_w is not None:
                    active += self.shares[i] * max(0.0, e - idle_w * (pb - pa))
            i += 1
        return total, (active if idle_w is not None else None)


class EnergyModel:
    """Every device's energy curve over a window, built once; any sub-window is then cheap."""

    def __init__(
        self,
        session: Session,
        *,
        t0: float,
        t1: float,
        interval_s: float,
        run_id: str | None = None,
    ) -> None:
        self.devices: list[_DeviceModel] = []
        shares = repo.run_shares(session, run_id=run_id) if run_id else {}
        for dev in repo.devices(session):
            samples = repo.power_window(session, device_id=dev.id, t0=t0, t1=t1)
            curve = EnergyCurve(samples, max_gap_s=_max_gap(interval_s))
            if curve.method == "none":
                continue
            pieces = shares.get(share_kind(dev), [])
            self.devices.append(
                _DeviceModel(dev, curve, [p[0] for p in pieces], [p[1] for p in pieces])
            )

    def energy(self, a: float, b: float) -> dict[str, Any]:
        by_device: list[dict[str, Any]] = []
        for m in self.devices:
            integral = m.curve.integral(a, max(a, b), granularity_s=m.dev.granularity_s)
            energy, active = m.attributed(a, max(a, b), m.dev.idle_power_w)
            active, idle_note = _active_or_unknown(
                active, m.dev.idle_power_w, integral.energy_j, integral.covered_s
            )
            by_device.append(
                {
                    "device": m.dev.name,
                    "kind": m.dev.kind,
                    "source": m.dev.source,
                    "model": m.dev.model,
                    "method": integral.method,
                    "energy_j": energy,
                    "device_energy_j": integral.energy_j,
                    "active_energy_j": active,
                    "idle_power_w": m.dev.idle_power_w,
                    "idle_note": idle_note,
                    "share": energy / integral.energy_j if integral.energy_j > 0 else 0.0,
                    "attribution": "process" if m.starts else "whole_device",
                    "n_samples": integral.n_samples,
                    "covered_s": integral.covered_s,
                    "gaps_s": integral.gaps_s,
                    "granularity_s": m.dev.granularity_s,
                    "below_granularity": integral.below_granularity,
                    "caveat": caveat(m.dev.source, m.dev.model or ""),
                }
            )
        sources: set[str] = {d["source"] for d in by_device}
        actives: list[float | None] = [d["active_energy_j"] for d in by_device]
        known = [x for x in actives if x is not None]
        notes = [d["idle_note"] for d in by_device if d["idle_note"]]
        return {
            "energy_j": sum(d["energy_j"] for d in by_device) if by_device else None,
            "device_energy_j": sum(d["device_energy_j"] for d in by_device) if by_device else None,
            "active_energy_j": sum(known) if by_device and len(known) == len(actives) else None,
            "active_energy_note": notes[0] if notes else None,
            "source": combined_source(set(sources)),
            "measured": bool(sources) and sources <= MEASURED_SOURCES,
            "t_start": a,
            "t_end": b,
            "duration_s": b - a,
            "by_device": by_device,
        }


#: A device that drew less than this much above its idle baseline over a run's window was,
#: in all likelihood, not idle when the baseline was measured (other work on the machine).
IDLE_SEPARATION = 0.02


def _active_or_unknown(
    active: float | None, idle_w: float | None, device_j: float, covered_s: float
) -> tuple[float | None, str | None]:
    """Energy above idle, or None with the reason when the baseline cannot be trusted."""
    if idle_w is None:
        return None, "no idle period measured yet: energy above idle is unknown"
    if device_j > 0 and idle_w * covered_s >= (1.0 - IDLE_SEPARATION) * device_j:
        return None, (
            f"the device drew no more than its idle baseline ({idle_w:.3g} W) during the run: "
            "the baseline was measured while the machine was busy, so energy above idle is unknown"
        )
    return active, None


def run_model(
    session: Session, *, run: Run, interval_s: float, now: float | None = None
) -> EnergyModel:
    t0, t1 = window(run, now)
    return EnergyModel(session, t0=t0, t1=t1, interval_s=interval_s, run_id=run.id)


def run_carbon(
    settings: Settings | None, model: EnergyModel, t0: float, t1: float
) -> dict[str, Any]:
    """The run's co2e_g with its provenance (h3d.carbon); null without settings."""
    if settings is None:
        return {"co2e_g": None, "carbon_source": "none", "carbon_detail": "not computed"}
    return carbon.run_carbon(settings, lambda a, b: model.energy(a, b)["energy_j"], t0, t1)


def run_energy(
    session: Session,
    *,
    run: Run,
    interval_s: float,
    now: float | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    model = run_model(session, run=run, interval_s=interval_s, now=now)
    return {"run_id": run.id, **model.energy(t0, t1), **run_carbon(settings, model, t0, t1)}


def _points(session: Session, run_id: str) -> list[eff.BatchPoint]:
    return [
        (t, loss, float(n) if n else 1.0)
        for _seq, t, loss, n, _epoch, _phase in repo.batch_points(session, run_id=run_id)
        if loss is not None and math.isfinite(loss)
    ]


def run_eta(
    session: Session,
    *,
    run: Run,
    window_s: float,
    interval_s: float,
    now: float | None = None,
    model: EnergyModel | None = None,
    pts: list[eff.BatchPoint] | None = None,
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    model = model or run_model(session, run=run, interval_s=interval_s, now=now)
    pts = _points(session, run.id) if pts is None else pts
    k = eff.smoothing_k(len(pts))
    l0 = eff.loss_at_start(pts) if len(pts) >= 2 else None
    lt = eff.smoothed(pts[-k:]) if len(pts) >= 2 else None
    bits = eff.info_gain_bits(l0, lt)
    energy = model.energy(t0, t1)
    t_last = pts[-1][0] if pts else t1
    w0 = max(t0, t_last - window_s)
    l_w = eff.loss_before(pts, w0, k) if pts else None
    whole_run = l_w is None or w0 <= t0
    if l_w is None and len(pts) >= 2:  # the run is younger than the window: since its start
        l_w = l0
    w_energy = model.energy(w0, t_last)["energy_j"] if pts else None
    return {
        "run_id": run.id,
        "eta_bits_per_j": eff.eta(bits, energy["energy_j"]),
        "marginal_eta_bits_per_j": eff.eta(eff.info_gain_bits(l_w, lt), w_energy),
        "window_s": window_s,
        # True when the run is shorter than the window: the marginal η is then the whole run's
        "window_is_whole_run": whole_run,
        "info_gain_bits": bits,
        "info_gain_total_bits": bits * run.n_train if bits is not None and run.n_train else None,
        "loss_start": l0,
        "loss_now": lt,
        "energy_j": energy["energy_j"],
        "active_energy_j": energy["active_energy_j"],
        "window_energy_j": w_energy,
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
    """Total power of all devices at each sampler tick (one tick stamps every device)."""
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
    model = run_model(session, run=run, interval_s=interval_s, now=now)
    k = eff.smoothing_k(len(pts))
    l0 = eff.loss_at_start(pts)
    step = max(1, len(pts) // max(points, 1))
    out = []
    for i in range(k, len(pts), step):
        t = pts[i][0]
        e = model.energy(t0, t)["energy_j"]
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
    settings: Settings | None = None,
) -> dict[str, Any]:
    t0, t1 = window(run, now)
    model = run_model(session, run=run, interval_s=interval_s, now=now)
    rows = repo.batch_points(session, run_id=run.id)
    pts: list[eff.BatchPoint] = []
    by_epoch: dict[int, list[eff.BatchPoint]] = defaultdict(list)
    by_phase: dict[str, list[eff.BatchPoint]] = defaultdict(list)
    for _seq, t, loss, n, epoch, phase in rows:
        if loss is None or not math.isfinite(loss):
            continue
        p = (t, loss, float(n) if n else 1.0)
        pts.append(p)
        if epoch is not None:
            by_epoch[epoch].append(p)
        if phase is not None:
            by_phase[phase].append(p)
    eta = run_eta(
        session, run=run, window_s=window_s, interval_s=interval_s, now=now, model=model, pts=pts
    )
    co2 = run_carbon(settings, model, t0, t1)
    energy = {"run_id": run.id, **model.energy(t0, t1), **co2}
    epoch_rows = {e.epoch: e for e in repo.epochs(session, run_id=run.id)}
    epochs_out = []
    k_run = eff.smoothing_k(len(pts))
    prev_t, prev_loss = t0, eta["loss_start"]
    for ep in sorted(set(by_epoch) | set(epoch_rows)):
        ep_pts = by_epoch.get(ep, [])
        row = epoch_rows.get(ep)
        t_end = row.t if row is not None else (ep_pts[-1][0] if ep_pts else prev_t)
        # ΔI of an epoch: smoothed loss at its end against the one at the previous end
        end_loss = (
            eff.smoothed(ep_pts[-k_run:]) if ep_pts else (row.loss if row is not None else None)
        )
        e = model.energy(prev_t, max(t_end, prev_t))
        bits = eff.info_gain_bits(prev_loss, end_loss)
        epochs_out.append(
            {
                "epoch": ep,
                "t_end": t_end,
                "phase": row.phase if row is not None else None,
                "loss": eff.smoothed(ep_pts) if ep_pts else (row.loss if row is not None else None),
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
    for name, ph_pts in by_phase.items():
        a, b = ph_pts[0][0], ph_pts[-1][0]
        k = eff.smoothing_k(len(ph_pts))
        bits = eff.info_gain_bits(eff.loss_at_start(ph_pts), eff.smoothed(ph_pts[-k:]))
        e = model.energy(a, b)
        phases_out.append(
            {
                "phase": name,
                "t_start": a,
                "t_end": b,
                "batches": len(ph_pts),
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
        "co2e_g": co2["co2e_g"],
        "carbon_source": co2["carbon_source"],
    }
