"""``h3-report --tune SESSION``: an ``h3-tune`` session's runs, grouped by technique.

The tuner tags every trial ``tune:<session>`` and ``technique:<name>``; this view finds the
runs through the daemon's tag filter and reads their figures through ``/v1/compare``, so it
shows what the daemon stored (also for a session interrupted half-way).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from h3client._report import _f, shown
from h3client.client import Client

_COMPARE_MAX = 20  # the daemon's /v1/compare limit


def session_runs(client: Client, session: str) -> list[dict[str, Any]]:
    """Every run tagged ``tune:<session>``, oldest first (all pages)."""
    runs: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.list_runs(tag=f"tune:{session}", limit=1000, cursor=cursor)
        runs.extend(page["data"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return sorted(runs, key=lambda r: r["created_at"])


def _technique(run: dict[str, Any]) -> str:
    return next(
        (t.split(":", 1)[1] for t in run.get("tags", ()) if t.startswith("technique:")), "?"
    )


def tune_session(client: Client, session: str) -> dict[str, Any]:
    """``{"session", "groups": [{"technique", "runs": [compare rows]}]}`` in first-run order."""
    runs = session_runs(client, session)
    figures: dict[str, dict[str, Any]] = {}
    ids = [r["id"] for r in runs]
    for i in range(0, len(ids), _COMPARE_MAX):
        for row in client.compare(ids[i : i + _COMPARE_MAX])["runs"]:
            figures[row["run_id"]] = row
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_technique(r), []).append({**figures[r["id"]], "tags": r["tags"]})
    return {
        "session": session,
        "groups": [{"technique": k, "runs": v} for k, v in groups.items()],
    }


def _mean(values: list[Any]) -> float | None:
    vs = [float(v) for v in values if v is not None]
    return statistics.fmean(vs) if vs else None


def format_tune_session(data: dict[str, Any]) -> str:
    groups = data["groups"]
    if not groups:
        return f"no runs tagged tune:{shown(data['session'])}"
    lines = [
        f"h3-tune session {shown(data['session'])}: {sum(len(g['runs']) for g in groups)} runs, "
        f"{len(groups)} techniques (means over each technique's runs)",
        f"  {'technique':<16} {'runs':>4} {'η bits/J':>10} {'energy J':>10} {'time s':>8} "
        f"{'accuracy':>9}  status",
    ]
    for g in groups:
        rs = g["runs"]
        status = ",".join(sorted({r["status"] for r in rs}))
        lines.append(
            f"  {shown(g['technique']):<16} {len(rs):>4} "
            f"{_f(_mean([r['eta_bits_per_j'] for r in rs])):>10} "
            f"{_f(_mean([r['energy_j'] for r in rs])):>10} "
            f"{_f(_mean([r['duration_s'] for r in rs])):>8} "
            f"{_f(_mean([r['final_accuracy'] for r in rs])):>9}  {status}"
        )
        for r in rs:
            lines.append(f"      {r['run_id']}  {shown(r['name'])}")
    return "\n".join(lines)


def print_tune_session(client: Client, session: str, *, as_json: bool = False) -> int:
    """``h3-report --tune SESSION``: print the grouped view (or its JSON); exit code 0."""
    data = tune_session(client, session)
    print(json.dumps(data, indent=2) if as_json else format_tune_session(data))
    return 0
