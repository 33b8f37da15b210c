"""Turning a run's report (``GET /v1/runs/{id}/report``) into advice a person can act on."""

from __future__ import annotations

import re
from typing import Any

#: An epoch is past the point of diminishing returns when its η, and every later epoch's,
#: is below this fraction of the best epoch's η.
DIMINISHING_FRACTION = 0.10


def diminishing_returns(
    epochs: list[dict[str, Any]], fraction: float = DIMINISHING_FRACTION
) -> dict[str, Any] | None:
    """The suggested stopping point: the last epoch after which η stayed < fraction × peak.

    Returns ``{"epoch", "peak_eta_bits_per_j", "energy_after_j", "energy_after_frac"}`` or
    None when η never fell that far, or when its course cannot tell
    (:func:`stopping_point_unknown` says why: fewer than 3 epochs, η unknown).
    """
    if stopping_point_unknown(epochs) is not None:
        return None
    etas = [e.get("eta_bits_per_j") for e in epochs]
    peak = max(v for v in etas if v is not None)
    # the last epoch whose η is known and >= fraction × peak, with a known η below it after;
    # an epoch without η (no batches, no energy read in it) says nothing either way: it
    # neither withdraws a stop the known η's made nor makes one (the dashboard's rule too)
    stop, fell_after = None, False
    for i in range(len(epochs) - 1, -1, -1):
        v = etas[i]
        if v is None:
            continue
        if v >= fraction * peak:
            stop = i
            break
        fell_after = True
    if stop is None or not fell_after:
        return None
    after = sum(e.get("energy_j") or 0.0 for e in epochs[stop + 1 :])
    total = sum(e.get("energy_j") or 0.0 for e in epochs)
    return {
        "epoch": epochs[stop]["epoch"],
        "peak_eta_bits_per_j": peak,
        "energy_after_j": after,
        "energy_after_frac": after / total if total > 0 else None,
    }


def stopping_point_unknown(epochs: list[dict[str, Any]]) -> str | None:
    """Why η's course cannot tell a stopping point (too few epochs, no epoch's η known, none
    positive), or None when :func:`diminishing_returns`' None means "not reached yet"."""
    known = [v for e in epochs if (v := e.get("eta_bits_per_j")) is not None]
    if len(epochs) < 3:
        return f"{len(epochs)} epoch{'' if len(epochs) == 1 else 's'}, too few to tell"
    if not known:
        return "η is unknown for every epoch"
    if max(known) <= 0:
        return "no epoch's η was positive"
    return None


#: Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts a sequence
#: that can clear the screen), line breaks, and the bidirectional overrides.
_UNSHOWN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def shown(text: object) -> str:
    """``text`` safe to print, those characters written as escapes (``\\x1b``, ``\\n``):
    run names and phases are anyone's with the daemon's token, or anyone's who wrote the
    audit log, and must not clear the screen or break a table."""
    return _UNSHOWN.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))


def _f(v: Any, unit: str = "", digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    return f"{v}{unit}"


NEGATIVE_ETA_NOTE = (
    "  a negative η means the smoothed training loss rose over that stretch: the model lost "
    "information about its training data there (noise, a learning-rate spike, a new phase)"
)


def above_idle(e: dict[str, Any]) -> str:
    """Energy above idle, or ``unknown`` with the daemon's reason."""
    if e.get("active_energy_j") is None:
        note = e.get("active_energy_note")
        return "above idle unknown" + (f" ({note})" if note else "")
    return f"{_f(e['active_energy_j'], ' J')} above idle"


def marginal_window(eta: dict[str, Any]) -> str:
    """Which stretch the marginal η covers: the last window, or the whole (shorter) run."""
    if eta.get("window_is_whole_run"):
        return f"whole run, shorter than the {eta['window_s']:g} s window"
    return f"last {eta['window_s']:g} s"


def carbon(e: dict[str, Any]) -> str:
    """The carbon line: grams of CO2e and their source, or ``unknown`` with the daemon's
    reason (nothing configured, or a configured source failing and why)."""
    source = e.get("carbon_source", "none")
    if source != "none" and e.get("co2e_g") is not None:
        return f"  carbon              {_f(e['co2e_g'], ' g CO2e')} ({source})"
    why = e.get("carbon_detail") or "no carbon intensity configured"
    if source != "none":  # an intensity, but the energy is unknown
        why = f"{source}: energy unknown"
    return f"  carbon              unknown ({why})"


def provenance_note(e: dict[str, Any]) -> str:
    """What the energy's source means when it is not a measurement: nothing read at all
    (``none``: the energy is unknown) is no model's estimate."""
    if e["measured"]:
        return ""
    if e["source"] == "none":
        return "  (unknown: no device was readable)"
    return "  (ESTIMATED: a model, not a measurement)"


def format_report(rep: dict[str, Any]) -> str:
    e, eta = rep["energy"], rep["eta"]
    lines = [
        f"H3 report — run {rep['run']} ({shown(rep['name'])}, {rep['status']})",
        f"  duration            {_f(rep['duration_s'], ' s')}, {rep['n_batches']} batches",
        f"  energy              {_f(e['energy_j'], ' J')} attributed, {_f(e['device_energy_j'], ' J')} "
        f"whole devices, {above_idle(e)}",
        f"  provenance          {e['source']}{provenance_note(e)}",
        *([carbon(e)] if "carbon_source" in e else []),
        f"  loss                {_f(eta['loss_start'])} -> {_f(eta['loss_now'])} nats",
        f"  information gained  {_f(eta['info_gain_bits'], ' bits/sample')}"
        + (
            f", {_f(eta['info_gain_total_bits'], ' bits')} in total"
            if eta.get("info_gain_total_bits")
            else ""
        ),
        f"  efficiency          {_f(eta['eta_bits_per_j'], ' bits/J')} "
        f"(marginal, {marginal_window(eta)}: {_f(eta['marginal_eta_bits_per_j'], ' bits/J')})",
    ]
    if rep.get("phases"):
        lines.append("  phases:")
        for p in rep["phases"]:
            lines.append(
                f"    {shown(p['phase']):<15} {p['batches']:>7} batches  {_f(p['energy_j'], ' J'):>12}  "
                f"ΔI {_f(p['info_gain_bits'], ' bits/sample'):>19}  η {_f(p['eta_bits_per_j'], ' bits/J')}"
            )
    if rep.get("epochs"):
        lines.append(
            f"  {'epoch':>7} {'loss':>10} {'accuracy':>9} {'energy J':>10} {'η bits/J':>11}"
        )
        for ep in rep["epochs"]:
            lines.append(
                f"  {ep['epoch']:>7} {_f(ep['loss']):>10} {_f(ep['accuracy']):>9} "
                f"{_f(ep['energy_j']):>10} {_f(ep['eta_bits_per_j']):>11}"
            )
        if any((ep["eta_bits_per_j"] or 0.0) < 0 for ep in rep["epochs"]):
            lines.append(NEGATIVE_ETA_NOTE)
        dr = diminishing_returns(rep["epochs"])
        unknown = stopping_point_unknown(rep["epochs"])
        if unknown is not None:  # no claim about a course of η it does not have
            lines.append(f"  point of diminishing returns unknown ({unknown})")
        elif dr is None:  # the rule: η below the fraction from some epoch to the last known
            which = (
                "last epoch's"
                if rep["epochs"][-1].get("eta_bits_per_j") is not None
                else "last known"  # epochs without η say nothing either way
            )
            lines.append(
                f"  no point of diminishing returns yet (the {which} η is "
                f"not below {DIMINISHING_FRACTION:.0%} of its peak)"
            )
        else:
            lines.append(
                f"  diminishing returns after epoch {dr['epoch']}: η stayed below "
                f"{DIMINISHING_FRACTION:.0%} of its peak; energy beyond the stopping point "
                f"{_f(dr['energy_after_j'], ' J')} ({_f((dr['energy_after_frac'] or 0) * 100, ' %', 3)})"
            )
    return "\n".join(lines)
