"""The dashboard's static files, and the self-contained HTML report built from them.

The served page (``/``) loads ``/static/app.css``, ``/static/charts.js`` and ``/static/app.js``
as separate files, so it runs under a strict Content-Security-Policy. ``h3d show RUN --html``
inlines the very same files into one HTML page together with the run's data (the answers of
the /v1 endpoints the run page reads); app.js then draws the run page from that data. There is
one chart implementation.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import quote

STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

# The series resolutions of the run page: the same numbers as POINTS in static/app.js.
LOSS_POINTS = 1000
LOSS_MEAN_POINTS = 40
ENERGY_POINTS = 500
POWER_POINTS = 600


def static_path_exists(name: str) -> bool:
    return resources.files("h3d").joinpath("static", name).is_file()


@functools.cache
def shipped_static() -> frozenset[str]:
    """The names of the static files the package ships, read once. The set is built whole
    before anyone sees it: a page's requests for app.css, charts.js and app.js run on
    threadpool threads side by side, and a set filled while they read it had answered 404
    for a shipped file."""
    names = (f.name for f in resources.files("h3d").joinpath("static").iterdir())
    return frozenset(n for n in names if static_path_exists(n))


def static_text(name: str) -> str:
    return resources.files("h3d").joinpath("static", name).read_text(encoding="utf-8")


def run_bundle(get: Callable[[str], Any], run_id: str) -> dict[str, Any]:
    """What the run page draws, from the daemon's /v1 answers (as ``loadRunBundle`` in app.js)."""
    base = f"/v1/runs/{quote(run_id, safe='')}"
    report = get(f"{base}/report")
    # the loss's level: bucket means of every batch (weighted by n), drawn as the mean line
    mean = get(f"{base}/series?metric=loss&agg=mean&points={LOSS_MEAN_POINTS}")
    return {
        "run": get(base),
        "report": report,
        "loss": get(f"{base}/series?metric=loss&points={LOSS_POINTS}")["points"],
        "loss_mean": {"points": mean["points"], "bucket_batches": mean["bucket_batches"]},
        "energy": get(f"{base}/series?metric=energy&points={ENERGY_POINTS}")["points"],
        # one series per row of by_device, in its order: a device is named by its node and
        # its name together (every node of a cluster has its own nvml:0)
        "power": [
            get(
                f"{base}/series?metric=power&node={quote(d['node'], safe='')}"
                f"&device={quote(d['device'], safe='')}&points={POWER_POINTS}"
            )["points"]
            for d in report["energy"]["by_device"]
        ],
        "devices": get("/v1/devices")["devices"],
    }


def _inline(page: str, tag: str, replacement: str) -> str:
    if page.count(tag) != 1:
        raise RuntimeError(f"static/index.html no longer holds {tag!r} exactly once")
    return page.replace(tag, replacement)


def render_report(bundle: dict[str, Any], *, now: float | None = None) -> str:
    """One self-contained HTML page: the dashboard's CSS and JS inlined, the data embedded."""
    data = json.dumps({"bundle": bundle, "generated_at": now if now is not None else time.time()})
    # In a <script> element only "</" can end it early; \u003c keeps the JSON valid.
    data = data.replace("<", "\\u003c")
    page = static_text("index.html")
    # the tab icon (an SVG data URL) names the SVG namespace's URL: the file keeps none
    page = re.sub(r'<link rel="icon" [^>]*>\n', "", page, count=1)
    page = _inline(
        page, "<title>h3d</title>", f"<title>{_esc(bundle['run']['name'])} — h3d report</title>"
    )
    page = _inline(
        page,
        '<link rel="stylesheet" href="/static/app.css">',
        f"<style>\n{static_text('app.css')}</style>",
    )
    for name in ("charts.js", "app.js"):
        js = static_text(name)
        if "</script" in js.lower():
            raise RuntimeError(f"static/{name} holds '</script': it cannot be inlined")
        page = _inline(page, f'<script src="/static/{name}"></script>', f"<script>\n{js}</script>")
    # the data goes before the first script, which reads it
    first = page.index("<script>\n")
    return (
        page[:first]
        + f'<script type="application/json" id="h3d-data">{data}</script>\n'
        + page[first:]
    )


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
