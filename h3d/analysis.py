"""Run-level figures built from the store: energy, η, series, reports.

Functions take a session and the sampler's device table; they read, never write.

A run spread over ranks and nodes: its energy is, per node, that node's devices once times
the share of the union of the run's processes there (rank -1 shares), summed over the nodes
it ran on; devices of other nodes in a shared store never count. Its loss curve is over the
global step: the k-th batch of every rank is step k, and the step's loss is their mean.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from h3d.config import Settings

from h3d import carbon
from h3d import efficiency as eff
from h3d.attribution import SPLIT_RANK
from h3d.downsample import bucket_means, lttb
from h3d.energy import EnergyCurve, max_gap
from h3d.errors import InvalidInput
from h3d.power.base import MEASURED_SOURCES, caveat
from h3d.storage import repository as repo
from h3d.storage.models import Batch, Device, Run, RunRank


def window(run: Run, now: float | None = None) -> tuple[float, float]:
    end = run.finished_at if run.finished_at is not None else (now or time.time())
    return run.created_at, max(end, run.created_at)


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
    # (the first from the window's start, the last to its end: a run whose process is gone
    # keeps its last measured share). The sampler stores a run's rows tiling its time.
    starts: list[float]
    shares: list[float]
    # the idle baseline that applies to the run (W): stored at its end, else the device's now
    idle_w: float | None = None
    # each piece's own end as stored (t1): what the per-rank rows are weighed over
    ends: list[float] | None = None
    # where the last piece ends: None, the window's end (a finished run); a running run's
    # ends where its last stored row does, so that its energy only grows as rows arrive
    # (stretched to now at the last share, it fell when a lower share replaced the stretch)
    last_end: float | None = None
    # the pieces whose share was measured (rank -1 rows, not split ones): (t0, t1)
    measured: list[tuple[float, float]] | None = None

    def attribution(self, a: float, b: float) -> str:
        """``process`` where a measured share covers part of [a, b]; else the run had the
        whole device, alone or split evenly with the runs beside it (``whole_device``)."""
        if any(t0 <= b and t1 >= a for t0, t1 in self.measured or ()):
            return "process"
        return "whole_device"

    def attributed(self, a: float, b: float, idle_w: float | None) -> tuple[float, float | None]:
        """(energy × share, (energy − idle) × share) over [a, b]. The idle draw is taken off
        for the time the energy covers: a gap holds no energy, so no idle either. Energy
        above idle is summed over the pieces as it is, and only the sum is kept from going
        below 0: a piece below the baseline takes off what it drew less."""
        covered = self.curve.covered
        if not self.starts:
            e = self.curve.between(a, b)
            return e, (max(0.0, e - idle_w * covered(a, b)) if idle_w is not None else None)
        total = active = 0.0
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        while i < len(self.starts) and (i == 0 or self.starts[i] < b):
            pa = a if i == 0 else max(a, self.starts[i])
            if i + 1 < len(self.starts):
                pb = min(b, self.starts[i + 1])
            else:
                pb = b if self.last_end is None else min(b, self.last_end)
            if pb > pa:
                e = self.curve.between(pa, pb)
                total += self.shares[i] * e
                if idle_w is not None:
                    active += self.shares[i] * (e - idle_w * covered(pa, pb))
            i += 1
        return total, (max(0.0, active) if idle_w is not None else None)


def _weigh(rows: list[repo.SharePiece], a: float, b: float) -> float:
    """Share-seconds of ``rows`` (t0, t1, share) within [a, b]; for a point (a == b), the
    share of the row that holds it."""
    if b <= a:
        return next((v for t0, t1, v in rows if t0 <= a <= t1), 0.0)
    return sum(v * max(0.0, min(b, t1) - max(a, t0)) for t0, t1, v in rows)


def _weights(rows: list[repo.SharePiece], pieces: list[tuple[float, float]]) -> list[float]:
    """``_weigh(rows, a, b)`` for each piece [a, b], each by binary searches over ``rows``
    (ordered by t0) for the rows that meet it: a day of one row a second against as many
    pieces was 10⁹ steps. The same floats: a row that does not meet the piece adds 0."""
    t0s = [r[0] for r in rows]
    reach = list(itertools.accumulate((r[1] for r in rows), max))  # latest t1 so far
    out: list[float] = []
    for a, b in pieces:
        if b <= a:  # the first row that holds the point: after those that all end before it
            lo, hi = bisect.bisect_left(reach, a), bisect.bisect_right(t0s, a)
            out.append(next((v for t0, t1, v in rows[lo:hi] if t0 <= a <= t1), 0.0))
        else:  # rows before lo end by a, rows from hi on start at b or later
            lo, hi = bisect.bisect_right(reach, a), bisect.bisect_left(t0s, b)
            out.append(
                sum((v * max(0.0, min(b, t1) - max(a, t0)) for t0, t1, v in rows[lo:hi]), 0.0)
            )
    return out


def run_nodes(session: Session, run: Run) -> set[str] | None:
    """The nodes a run ran on (its creating daemon's and its ranks'); None: unknown, all."""
    if run.node is None:
        return None
    return {run.node} | {r.node for r in repo.run_ranks(session, run_id=run.id)}


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
        nodes: set[str] | None = None,
        running: bool = False,
    ) -> None:
        self.devices: list[_DeviceModel] = []
        shares = repo.run_share_rows(session, run_id=run_id) if run_id else {}
        kept = repo.run_idle(session, run_id=run_id) if run_id else None
        self.idle_kept = kept is not None  # the baselines are those the run ended with
        # per-rank pieces, for the breakdown: (node, rank, kind) -> pieces
        self.rank_shares = {k: v for k, v in shares.items() if k[1] >= 0}
        devs = repo.devices(session, nodes=nodes)
        # devices that read none of the window are left out of ``devices``; that there are
        # some tells a window no reading covers from a store with no device at all
        self.has_devices = bool(devs)
        for dev in devs:
            samples = repo.power_window(session, device_id=dev.id, t0=t0, t1=t1)
            curve = EnergyCurve(samples, max_gap_s=max_gap(interval_s))
            if curve.method == "none":
                continue
            measured = shares.get((dev.node, -1, share_kind(dev)), [])
            split = shares.get((dev.node, SPLIT_RANK, share_kind(dev)), [])
            pieces = sorted([*measured, *split])
            idle = kept.get(dev.id) if kept is not None else dev.idle_power_w
            starts, ends, values = (
                [p[0] for p in pieces],
                [p[1] for p in pieces],
                [p[2] for p in pieces],
            )
            last_end = ends[-1] if running and ends else None
            self.devices.append(
                _DeviceModel(
                    dev, curve, starts, values, idle, ends, last_end, [p[:2] for p in measured]
                )
            )

    def breakdown(
        self, a: float, b: float, ranks: list[RunRank], counts: dict[int, int]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(per node, per rank) attributed energy over [a, b].

        A rank gets, in each interval, its fraction of its node's part of a device: its own
        share over the sum of the node's ranks' shares then (0 once it left), each rank's
        rows counted over their own [t0, t1] (a late rank's first row spans several of the
        union's). Where the device reports no per-rank figures the node's part is split
        evenly over its ranks. So the ranks of a node add up to the node, and the nodes to
        the run.
        """
        b = max(a, b)
        by_node: dict[str, dict[str, Any]] = {}
        for m in self.devices:
            n = by_node.setdefault(
                m.dev.node,
                {"node": m.dev.node, "energy_j": 0.0, "device_energy_j": 0.0, "ranks": []},
            )
            n["energy_j"] += m.attributed(a, b, None)[0]
            n["device_energy_j"] += m.curve.between(a, b)
        on_node: dict[str, list[int]] = defaultdict(list)
        for r in ranks:
            on_node[r.node].append(r.rank)
            if r.node in by_node:
                by_node[r.node]["ranks"].append(r.rank)
        energy: dict[int, float] = defaultdict(float)
        for m in self.devices:
            local = on_node.get(m.dev.node, [])
            if not local:
                continue
            kind = share_kind(m.dev)
            own = {k: self.rank_shares.get((m.dev.node, k, kind), []) for k in local}
            if not m.starts or not any(own.values()):
                for k in local:
                    energy[k] += m.attributed(a, b, None)[0] / len(local)
                continue
            ends = m.ends if m.ends is not None else m.starts[1:] + [m.starts[-1]]
            # each rank's share-seconds within each union piece
            pieces = list(zip(m.starts, ends, strict=True))
            weight = {k: _weights(own[k], pieces) for k in local}
            totals = [sum(weight[q][i] for q in local) for i in range(len(pieces))]
            for k in local:
                shares = []
                for i, union in enumerate(m.shares):
                    total = totals[i]
                    frac = weight[k][i] / total if total > 0 else 1.0 / len(local)
                    shares.append(union * frac)
                part = _DeviceModel(m.dev, m.curve, m.starts, shares, last_end=m.last_end)
                energy[k] += part.attributed(a, b, None)[0]
        by_rank = [
            {
                "rank": r.rank,
                "node": r.node,
                "energy_j": energy[r.rank],
                "n_batches": counts.get(r.rank, 0),
                "status": r.status,
            }
            for r in ranks
        ]
        return sorted(by_node.values(), key=lambda n: n["node"]), by_rank

    def energy(self, a: float, b: float) -> dict[str, Any]:
        by_device: list[dict[str, Any]] = []
        for m in self.devices:
            integral = m.curve.integral(a, max(a, b), granularity_s=m.dev.granularity_s)
            energy, active = m.attributed(a, max(a, b), m.idle_w)
            active, idle_note = _active_or_unknown(
                active, m.idle_w, integral.energy_j, integral.covered_s, ended=self.idle_kept
            )
            by_device.append(
                {
                    "device": m.dev.name,
                    "node": m.dev.node,
                    "kind": m.dev.kind,
                    "source": m.dev.source,
                    "model": m.dev.model,
                    "method": integral.method,
                    "energy_j": energy,
                    "device_energy_j": integral.energy_j,
                    "active_energy_j": active,
                    "idle_power_w": m.idle_w,
                    "idle_note": idle_note,
                    "share": energy / integral.energy_j if integral.energy_j > 0 else 0.0,
                    "attribution": m.attribution(a, max(a, b)),
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
        # a window no device read any of (the daemon was not sampling then, or a window
        # shorter than a sampling period whose next reading is not in yet) has an unknown
        # energy, not 0 J; an empty window's is a known 0
        read = bool(by_device) and (b <= a or any(d["covered_s"] > 0 for d in by_device))
        if not read and (by_device or self.has_devices):
            notes = [UNREAD_NOTE]
        return {
            "energy_j": sum(d["energy_j"] for d in by_device) if read else None,
            "device_energy_j": sum(d["device_energy_j"] for d in by_device) if read else None,
            "active_energy_j": sum(known) if read and len(known) == len(actives) else None,
            "active_energy_note": notes[0] if notes else None,
            "source": combined_source(set(sources)),
            "measured": bool(sources) and sources <= MEASURED_SOURCES,
            "t_start": a,
            "t_end": b,
            "duration_s": b - a,
            "by_device": by_device,
        }


#: Why a window no device read any of has no energy, nor energy above idle.
UNREAD_NOTE = (
    "no power reading covers the run: the daemon was not sampling then, "
    "or its next reading is not in yet"
)

#: A device that drew less than this much above its idle baseline over a run's window was,
#: in all likelihood, not idle when the baseline was measured (other work on the machine).
IDLE_SEPARATION = 0.02


def _active_or_unknown(
    active: float | None,
    idle_w: float | None,
    device_j: float,
    covered_s: float,
    *,
    ended: bool = False,
) -> tuple[float | None, str | None]:
    """Energy above idle, or None with the reason when the baseline cannot be trusted.
    ``ended``: the baseline is the one the run kept when it ended."""
    how = "the daemon sets one after H3D_IDLE_MIN_S seconds without a run, 30 by default"
    if idle_w is None and ended:
        return (
            None,
            f"no idle baseline when the run ended: {how}, and a run keeps the one it ends with",
        )
    if idle_w is None:
        return None, f"no idle baseline yet: {how}"
    if device_j > 0 and idle_w * covered_s >= (1.0 - IDLE_SEPARATION) * device_j:
        return None, (
            f"the device drew no more than its idle baseline of {idle_w:.3g} W during the run: "
            "the baseline was measured while the machine was busy, so energy above idle is unknown"
        )
    return active, None


def run_model(
    session: Session, *, run: Run, interval_s: float, now: float | None = None
) -> EnergyModel:
    t0, t1 = window(run, now)
    return EnergyModel(
        session,
        t0=t0,
        t1=t1,
        interval_s=interval_s,
        run_id=run.id,
        nodes=run_nodes(session, run),
        running=run.finished_at is None,
    )


def _energy_with_breakdown(
    session: Session, model: EnergyModel, run: Run, t0: float, t1: float
) -> dict[str, Any]:
    out = {"run_id": run.id, **model.energy(t0, t1)}
    ranks = repo.run_ranks(session, run_id=run.id)
    counts = repo.rank_batch_counts(session, run_id=run.id) if ranks else {}
    out["by_node"], out["by_rank"] = model.breakdown(t0, t1, ranks, counts)
    return out


def run_carbon(
    settings: Settings | None, model: EnergyModel, t0: float, t1: float
) -> dict[str, Any]:
    """The run's co2e_g with its provenance (h3d.carbon); null without settings."""
    if settings is None:
        return {"co2e_g": None, "carbon_source": "none", "carbon_detail": "not computed"}
    # grams of a known energy: a stretch no device read adds none, as it adds no joules
    known = model.energy(t0, t1)["energy_j"] is not None
    return carbon.run_carbon(
        settings, lambda a, b: (model.energy(a, b)["energy_j"] or 0.0) if known else None, t0, t1
    )


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
    return {
        **_energy_with_breakdown(session, model, run, t0, t1),
        **run_carbon(settings, model, t0, t1),
    }


StepRow = tuple[float, float, float, int | None, str | None]  # (t, loss, n, epoch, phase)


#: Step rows of the runs that ended most recently read, newest last. A run that ended takes
#: no more batches, so the report and the series of its page (three requests, each reading
#: every batch) and every later view share one read. Keyed by the store and what would
#: change if batches were ever added; a 100 000-batch run's rows take about 20 MB.
_ENDED_ROWS: OrderedDict[tuple[Any, ...], list[StepRow]] = OrderedDict()
ENDED_ROWS_KEPT = 4
_ended_rows_lock = threading.Lock()


def step_rows(session: Session, run: Run) -> list[StepRow]:
    """The run's finite batch losses in order; for a distributed run, one row per global
    step: the k-th batch of every rank, loss their n-weighted mean, at the latest one's time.
    A run that ended is read once (see ``_ENDED_ROWS``); do not change the list returned.
    """
    if run.status == "running":
        return _read_step_rows(session, run)
    key = (str(session.get_bind().engine.url), run.id, run.n_batches, run.last_seq, run.world_size)
    with _ended_rows_lock:
        rows = _ENDED_ROWS.get(key)
        if rows is not None:
            _ENDED_ROWS.move_to_end(key)
            return rows
    rows = _read_step_rows(session, run)
    with _ended_rows_lock:
        _ENDED_ROWS[key] = rows
        while len(_ENDED_ROWS) > ENDED_ROWS_KEPT:
            _ENDED_ROWS.popitem(last=False)
    return rows


def _point(t: float, loss: float | None, n: int | None) -> eff.BatchPoint | None:
    """A batch as a point of the sample-weighted loss, weighed by its ``n`` (1 when not
    sent); None when it has no part in it: a loss missing or not finite, or no samples."""
    if loss is None or not math.isfinite(loss) or n == 0:
        return None
    return (t, loss, 1.0 if n is None else float(n))


def _read_step_rows(session: Session, run: Run) -> list[StepRow]:
    rows = repo.batch_points(session, run_id=run.id)
    if not run.world_size or run.world_size < 2:
        return [
            (*p, epoch, phase)
            for _seq, t, loss, n, epoch, phase, _rank in rows
            if (p := _point(t, loss, n)) is not None
        ]
    ordinal: dict[int | None, int] = defaultdict(int)
    steps: dict[int, list[float]] = {}  # step -> [t, Σ n·loss, Σ n, epoch, phase]
    meta: dict[int, tuple[int | None, str | None]] = {}
    for _seq, t, loss, n, epoch, phase, rank in rows:
        k = ordinal[rank]
        ordinal[rank] = k + 1
        p = _point(t, loss, n)
        if p is None:
            continue
        _t, v, w = p
        acc = steps.get(k)
        if acc is None:
            steps[k] = [t, w * v, w]
            meta[k] = (epoch, phase)
        else:
            acc[0] = max(acc[0], t)
            acc[1] += w * v
            acc[2] += w
    return [(acc[0], acc[1] / acc[2], acc[2], *meta[k]) for k, acc in sorted(steps.items())]


def _points(session: Session, run: Run) -> list[eff.BatchPoint]:
    return [(t, loss, n) for t, loss, n, _epoch, _phase in step_rows(session, run)]


#: From this many finite batch losses on, η's smoothing windows are at their caps
#: (``smoothing_k`` 50, ``start_k`` 5) and :func:`run_eta` reads only the points it needs.
_LONG_RUN = 600
_SLACK = 4  # rows read per point needed (non-finite losses are stored as null and skipped)


def _finite(rows: Any) -> list[eff.BatchPoint]:
    return [p for t, loss, n in rows if (p := _point(t, loss, n)) is not None]


def _eta_points(
    session: Session, run: Run
) -> (
    tuple[int, list[eff.BatchPoint], list[eff.BatchPoint], Callable[[float, int], float | None]]
    | None
):
    """For a long single-process run, what η needs without reading every point: the count,
    the first points, the last ``k``, and the smoothed loss of the ``k`` before a time, each an
    indexed query of at most a few hundred rows. None: read everything (a short or
    distributed run, or too many non-finite losses where the points were looked for)."""
    n = run.n_batches - run.n_nonfinite
    if (run.world_size or 1) > 1 or n < _LONG_RUN:
        return None
    k, k0 = eff.smoothing_k(n), eff.start_k(n)
    cols = select(Batch.t, Batch.loss, Batch.n).where(Batch.run_id == run.id)
    head = _finite(session.execute(cols.order_by(Batch.seq).limit(k0 * _SLACK)))
    tail = _finite(session.execute(cols.order_by(Batch.seq.desc()).limit(k * _SLACK)))[::-1]
    if len(head) < k0 or len(tail) < k:
        return None

    def before(t: float, k: int) -> float | None:
        rows = list(
            session.execute(cols.where(Batch.t <= t).order_by(Batch.seq.desc()).limit(k * _SLACK))
        )
        pts = _finite(rows)[::-1]
        if len(pts) < k and len(rows) == k * _SLACK:  # nulls hide the points further back
            return eff.loss_before(_points(session, run), t, k)
        return eff.smoothed(pts[-k:]) if pts else None

    return n, head, tail, before


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
    few = _eta_points(session, run) if pts is None else None
    if few is not None:  # a long run: the points η needs, read as three short queries
        n, head, tail, before = few
    else:
        pts = _points(session, run) if pts is None else pts
        n, head, tail = len(pts), pts, pts

        def before(t: float, k: int, pts: list[eff.BatchPoint] = pts) -> float | None:
            return eff.loss_before(pts, t, k)

    k = eff.smoothing_k(n)
    l0 = eff.loss_at_start_of(head, n) if n >= 2 else None
    lt = eff.smoothed(tail[-k:]) if n >= 2 else None
    bits = eff.info_gain_bits(l0, lt)
    energy = model.energy(t0, t1)
    # The window ends where the run's energy does once it has ended: what it spent after
    # its last batch (a final evaluation, a checkpoint, a rank waiting for the others) is
    # part of what the last stretch cost. A running run's ends at its last batch: the
    # energy spent since has no loss logged for it yet.
    w_end = t1 if run.finished_at is not None or not n else tail[-1][0]
    w0 = max(t0, w_end - window_s)
    whole_run = w0 <= t0  # the run is younger than the window: since its start
    l_w = before(w0, k) if n and not whole_run else None
    if l_w is None:  # no batch before the window (or the run): the loss there is L₀'s
        l_w = l0
    if not n:
        w_energy = None
    elif whole_run:  # ΔI since the start: over the energy since the start, η's own
        w_energy = energy["energy_j"]
    else:
        w_energy = model.energy(w0, w_end)["energy_j"]
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


def loss_series(session: Session, *, run: Run, points: int) -> list[tuple[float, float]]:
    pts = [(t, loss) for t, loss, _n in _points(session, run)]
    return lttb(pts, points)


def loss_means(session: Session, *, run: Run, points: int) -> tuple[list[tuple[float, float]], int]:
    """The loss as at most ``points`` means of buckets of ``k`` consecutive batches (global
    steps for a distributed run), each weighted by its ``n`` as the smoothed loss is, at the
    mean of their times; and ``k``. LTTB keeps each bucket's extreme: a rolling mean of
    those is not the loss's level."""
    return bucket_means(_points(session, run), points)


def power_series(
    session: Session,
    *,
    run: Run,
    points: int,
    device: str | None = None,
    node: str | None = None,
    interval_s: float = 0.1,
    now: float | None = None,
) -> list[tuple[float, float]]:
    """Total power of the run's devices (or of those of one node, or of one device) over its
    window.

    Device names are unique per node only (every node of a cluster has its ``nvml:0``): a
    ``device`` held by several of the run's nodes needs ``node``, else InvalidInput. Each
    node's sampler ticks at its own instants, so a sum over devices is taken at every time
    any of them was read, each device's power there interpolated between its own readings
    (held at the window's edges); across a gap of its readings (``max_gap``) a device adds
    nothing, as it adds no energy there.
    """
    t0, t1 = window(run, now)
    devs = repo.devices(session, nodes=run_nodes(session, run))
    if node is not None:
        devs = [d for d in devs if d.node == node]
        if not devs:
            raise InvalidInput(f"the run has no device on node {node!r}")
    if device is not None:
        devs = [d for d in devs if d.name == device]
        if not devs:
            where = f" on node {node!r}" if node is not None else ""
            raise InvalidInput(f"no device named {device!r}{where} (see /v1/devices)")
        held = sorted({d.node for d in devs})
        if len(held) > 1:
            raise InvalidInput(
                f"device {device!r} is on nodes {', '.join(held)} of this run: name one with node="
            )
    readings = []
    for dev in devs:
        pts = [
            (t, p)
            for t, p, _e in repo.power_window(session, device_id=dev.id, t0=t0, t1=t1)
            if p is not None
        ]
        if pts:
            readings.append(pts)
    if len(readings) == 1:
        return lttb([(t, p) for t, p in readings[0] if t0 <= t <= t1], points)
    times = sorted({t for pts in readings for t, _p in pts if t0 <= t <= t1})
    total = [0.0] * len(times)
    gap = max_gap(interval_s)
    for pts in readings:
        j = 0  # pts[j] is the device's last reading at or before times[i], if any
        for i, t in enumerate(times):
            while j + 1 < len(pts) and pts[j + 1][0] <= t:
                j += 1
            ta, pa = pts[j]
            if ta == t:
                total[i] += pa
            elif ta > t:  # before the device's first reading
                total[i] += pa if ta - t <= gap else 0.0
            elif j + 1 == len(pts):  # after its last
                total[i] += pa if t - ta <= gap else 0.0
            elif pts[j + 1][0] - ta <= gap:
                tb, pb = pts[j + 1]
                total[i] += pa + (pb - pa) * (t - ta) / (tb - ta)
    return lttb(list(zip(times, total, strict=True)), points)


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
    pts = _points(session, run)
    if len(pts) < 2:
        return []
    model = run_model(session, run=run, interval_s=interval_s, now=now)
    k = eff.smoothing_k(len(pts))
    l0 = eff.loss_at_start(pts)
    # at most ``points`` batches, evenly to the last (or the curve's tail stands on one x):
    # energy from the first batch (the dashboard places each loss point on this curve, and a
    # curve that began at the k-th left the run's first, steepest batches off its chart); η
    # from the k-th, the first whose smoothing window is whole
    first = 0 if metric == "energy" else k
    span = len(pts) - 1 - first
    m = min(max(points, 1), span + 1)
    grid = [first + span * j // (m - 1) for j in range(m)] if m > 1 else [len(pts) - 1]
    out = []
    # summed step by step: each point's energy from the start would walk every share piece
    # before it again (a run that shared its device with 200 others: 4x the whole request).
    # Unknown (None) until a device has read some of it; a stretch none read adds nothing
    # then, as a gap adds nothing to the run's energy.
    e: float | None = None
    prev = t0
    for i in grid:
        t = pts[i][0]
        if t > prev:
            part = model.energy(prev, t)["energy_j"]
            if part is not None:
                e = part if e is None else e + part
            prev = t
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
    pts: list[eff.BatchPoint] = []
    by_epoch: dict[int, list[eff.BatchPoint]] = defaultdict(list)
    # a phase's stretches of consecutive batches, in order: a name that recurs (train,
    # evaluate, train) has a stretch each time; each with the epoch of its last batch
    stretches: list[tuple[str, list[eff.BatchPoint]]] = []
    last_epoch: list[int | None] = []
    for t, loss, n, epoch, phase in step_rows(session, run):
        p = (t, loss, n)
        pts.append(p)
        if epoch is not None:
            by_epoch[epoch].append(p)
        if phase is not None:
            if not stretches or stretches[-1][0] != phase:
                stretches.append((phase, []))
                last_epoch.append(None)
            stretches[-1][1].append(p)
            last_epoch[-1] = epoch
    eta = run_eta(
        session, run=run, window_s=window_s, interval_s=interval_s, now=now, model=model, pts=pts
    )
    co2 = run_carbon(settings, model, t0, t1)
    energy = {**_energy_with_breakdown(session, model, run, t0, t1), **co2}
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
                # the mean of the epoch's batch losses; the loss logged with the epoch when
                # it has none (that one is logged_loss, as sent)
                "loss": eff.smoothed(ep_pts) if ep_pts else (row.loss if row is not None else None),
                "logged_loss": row.loss if row is not None else None,
                "end_loss": end_loss,
                "accuracy": row.accuracy if row is not None else None,
                "val_loss": row.val_loss if row is not None else None,
                "metrics": row.metrics if row is not None else {},
                "energy_j": e["energy_j"],
                "info_gain_bits": bits,
                "eta_bits_per_j": eff.eta(bits, e["energy_j"]),
            }
        )
        prev_t = max(prev_t, t_end)  # an epoch stamped earlier reopens no time charged already
        prev_loss = end_loss if end_loss is not None else prev_loss
    # the phases' stretches tile the run as the epochs do: each from the previous one's end
    # (the first from the run's start) to the end of the epoch that holds its last batch, or
    # its last batch when the next stretch starts inside that epoch; never back in time
    epoch_end = {e["epoch"]: e["t_end"] for e in epochs_out}
    phases_out = []
    b = t0
    for i, (name, ph_pts) in enumerate(stretches):
        a, last = b, ph_pts[-1][0]
        nxt = stretches[i + 1][1][0][0] if i + 1 < len(stretches) else t1
        last_ep = last_epoch[i]
        end = epoch_end.get(last_ep, last) if last_ep is not None else last
        b = max(a, last, min(end, nxt))
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
    return {
        "run": run.id,
        "name": run.name,
        "status": run.status,
        "duration_s": t1 - t0,
        "n_batches": run.n_batches,
        "n_steps": len(pts),
        "n_nonfinite": run.n_nonfinite,
        "node": run.node,
        "world_size": run.world_size,
        "ranks": [
            {
                "rank": r["rank"],
                "node": r["node"],
                "n_batches": r["n_batches"],
                "status": r["status"],
            }
            for r in energy["by_rank"]
        ],
        "energy": energy,
        "eta": eta,
        "epochs": epochs_out,
        "phases": phases_out,
        "landauer_bits_per_j_300k": eff.LANDAUER_BITS_PER_J_300K,
        "co2e_g": co2["co2e_g"],
        "carbon_source": co2["carbon_source"],
    }
