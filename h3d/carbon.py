"""Carbon: a run's grams of CO2e = Σ over time of its energy × the grid's intensity then.

The intensity is a step function of time (each point holds until the next one), with its
own provenance, ``carbon_source``:

- ``live``: Electricity Maps (``H3D_ELECTRICITYMAPS_TOKEN``, zone ``H3D_CARBON_ZONE`` or
  ``H3D_CARBON_REGION``). Fetched points are cached in the data directory and kept, so a
  run stays covered after the provider's 24 h history has moved on. When the provider
  fails, or cannot cover the run's window (its points are hourly: the latest one covers
  the hour after it), the next source below is used and ``carbon_detail`` says why.
- ``timeseries``: a CSV of ``time,g_per_kwh`` rows (Unix seconds or ISO 8601; naive
  times are UTC) at ``H3D_CARBON_TIMESERIES_CSV``.
- ``constant``: ``H3D_CARBON_INTENSITY_G_PER_KWH``.
- ``region_average``: the annual average of ``H3D_CARBON_REGION`` from the shipped table
  (:mod:`h3d.carbon_regions`, data set and year named in ``carbon_detail``).

Nothing configured: ``co2e_g`` is null and ``carbon_source`` is ``none``; a source configured
but unusable (every one failed) gives the same, with ``carbon_detail`` "carbon intensity
unavailable" and each failure. Unknown energy gives a null ``co2e_g``. Nothing is ever
guessed (no IP geolocation, no default country). Before the first point and after the last
one of a series the nearest value holds; ``carbon_detail`` says when that happened.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3d.carbon_regions import REGIONS, YEAR

if TYPE_CHECKING:
    from h3d.config import Settings

logger = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
LIVE_HISTORY_S = 24 * 3600.0  # what the provider's history endpoint returns
LIVE_RETRY_S = 60.0  # after a failure, do not ask again sooner than this
LIVE_STEP_S = 3600.0  # the provider's points are hourly: the latest stands for its hour


class CarbonConfigError(ValueError):
    """The carbon configuration cannot be used (unknown region, unreadable CSV)."""


@dataclass(frozen=True, slots=True)
class Intensity:
    source: str  # constant | region_average | timeseries | live
    detail: str
    points: tuple[tuple[float, float], ...]  # (unix s, g/kWh), sorted by time

    def pieces(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        """``[(a, b, g_per_kwh)]`` covering ``[t0, t1]``, one per step of the series."""
        ts = [p[0] for p in self.points]
        i = max(0, bisect.bisect_right(ts, t0) - 1)
        out = []
        a = t0
        while a < t1:
            b = min(t1, ts[i + 1]) if i + 1 < len(ts) else t1
            if b > a:
                out.append((a, b, self.points[i][1]))
            a = b
            i += 1
        return out

    def covers(self, t0: float, t1: float, *, last_holds_s: float = 0.0) -> bool:
        """Whether ``[t0, t1]`` lies within the points, the last one counting for
        ``last_holds_s`` more (a provider's hourly point stands for its hour)."""
        return (
            bool(self.points)
            and self.points[0][0] <= t0
            and t1 <= self.points[-1][0] + last_holds_s
        )


def co2e_g(
    energy_j: Callable[[float, float], float | None],
    intensity: Intensity | None,
    t0: float,
    t1: float,
) -> float | None:
    """Grams of CO2e over ``[t0, t1]``: Σ energy(piece) × intensity(piece) / 3.6 MJ/kWh."""
    if intensity is None:
        return None
    pieces = intensity.pieces(t0, t1)
    if not pieces:  # an empty window: 0 g of a known energy, unknown of an unknown one
        return None if energy_j(t0, t1) is None else 0.0
    total = 0.0
    for a, b, g_per_kwh in pieces:
        e = energy_j(a, b)
        if e is None:
            return None
        total += e * g_per_kwh / J_PER_KWH
    return total


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_timeseries(path: Path) -> tuple[tuple[float, float], ...]:
    """``time,g_per_kwh`` rows, sorted by time. Blank and ``#`` lines are skipped, and the
    first other row may be a header (its intensity column is not a number)."""
    try:
        # utf-8-sig: Excel's "CSV UTF-8" begins with a byte order mark
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CarbonConfigError(f"carbon time series {path}: unreadable ({exc})") from exc
    points: list[tuple[float, float]] = []
    first = True
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise CarbonConfigError(f"{path}:{n}: expected time,g_per_kwh; got {row!r}")
        header_allowed, first = first, False
        try:
            t, g = _parse_time(row[0]), float(row[1])
        except ValueError as exc:
            if header_allowed and not _is_number(row[1]):
                continue  # a header
            raise CarbonConfigError(f"{path}:{n}: {exc}") from exc
        if not g >= 0 or g == float("inf"):
            raise CarbonConfigError(f"{path}:{n}: intensity must be finite and >= 0, got {g}")
        points.append((t, g))
    if not points:
        raise CarbonConfigError(f"{path}: no time,g_per_kwh rows")
    points.sort()
    return tuple(points)


def region(code: str) -> Intensity:
    key = code.strip().upper()
    if key not in REGIONS:
        raise CarbonConfigError(
            f"unknown carbon region {code!r}; known: {', '.join(sorted(REGIONS))} "
            "(or unset H3D_CARBON_REGION and set H3D_CARBON_INTENSITY_G_PER_KWH, "
            "H3D_CARBON_TIMESERIES_CSV or H3D_CARBON_ZONE)"
        )
    g, name, dataset = REGIONS[key]
    return Intensity(
        "region_average", f"{name} ({key}) {YEAR} annual average, {dataset}", ((0.0, g),)
    )


class LiveProvider:
    """Electricity Maps v3, cached on disk in the data directory."""

    def __init__(
        self,
        *,
        token: str,
        zone: str,
        base_url: str,
        cache_dir: Path,
        ttl_s: float = 900.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token, self.zone, self.base_url = token, zone, base_url.rstrip("/")
        self.cache = cache_dir / f"carbon-live-{zone}.json"
        self.ttl_s, self.timeout_s, self.clock = ttl_s, timeout_s, clock

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.cache.read_text())
            return data
        except (OSError, ValueError):
            return {"points": [], "fetched_at": None, "failed_at": None, "error": None}

    def _save(self, data: dict[str, Any]) -> None:
        tmp = self.cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.cache)

    def _fetch(self) -> list[tuple[float, float]]:
        import httpx  # here, not at module level: the daemon's start-up never needs it

        headers = {"auth-token": self.token}
        out: list[tuple[float, float]] = []
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as c:
            for path in ("/v3/carbon-intensity/history", "/v3/carbon-intensity/latest"):
                r = c.get(path, params={"zone": self.zone}, headers=headers)
                r.raise_for_status()
                body = r.json()
                for item in body.get("history", [body]):
                    g = item.get("carbonIntensity")
                    if isinstance(g, int | float) and item.get("datetime"):
                        out.append((_parse_time(item["datetime"]), float(g)))
        if not out:
            raise ValueError("the provider returned no carbonIntensity")
        return out

    def intensity(self) -> tuple[Intensity | None, str]:
        """The cached series, refreshed when stale; (None, why) when there is nothing."""
        data = self._load()
        now = self.clock()
        stale = data.get("fetched_at") is None or now - data["fetched_at"] > self.ttl_s
        recently_failed = data.get("failed_at") is not None and (
            now - data["failed_at"] < LIVE_RETRY_S
        )
        error = data.get("error") if recently_failed else None
        if stale and not recently_failed:
            import httpx

            try:
                fresh = self._fetch()
            except httpx.HTTPStatusError as exc:  # its text adds the URL and a help link
                error = f"HTTP {exc.response.status_code} {exc.response.reason_phrase}"
                logger.warning("live carbon intensity (%s) failed: %s", self.zone, exc)
                data.update(failed_at=now, error=error)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("live carbon intensity (%s) failed: %s", self.zone, error)
                data.update(failed_at=now, error=error)
            else:
                merged = dict((t, g) for t, g in data.get("points", []))
                merged.update(dict(fresh))
                data.update(points=sorted(merged.items()), fetched_at=now, failed_at=None)
                data["error"] = error = None
            try:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                self._save(data)
            except OSError as exc:  # a read-only data dir: no cache, still an answer
                logger.warning("carbon cache %s not written: %s", self.cache, exc)
        points = tuple((float(t), float(g)) for t, g in data.get("points", []))
        if not points:
            return None, f"live Electricity Maps ({self.zone}) failed: {error or 'no data'}"
        detail = f"Electricity Maps, zone {self.zone}"
        if error:
            detail += f" (cached; the last refresh failed: {error})"
        return Intensity("live", detail, points), error or ""


def configured(settings: Settings) -> bool:
    """Whether any intensity source is set (without one, co2e_g is null)."""
    return any(
        v is not None
        for v in (
            settings.carbon_intensity_g_per_kwh,
            settings.carbon_region,
            settings.carbon_timeseries_csv,
            settings.electricitymaps_token,
        )
    )


def resolve(settings: Settings, t0: float, t1: float) -> tuple[Intensity | None, str]:
    """The intensity for ``[t0, t1]`` under ``settings``, and a note on anything it could not
    use (a failed live provider, an unreadable CSV). (None, note) when nothing is configured."""
    notes: list[str] = []
    token = settings.electricitymaps_token
    zone = settings.carbon_zone or settings.carbon_region
    if token and zone:
        live, live_err = LiveProvider(
            token=token,
            zone=zone,
            base_url=settings.carbon_live_url,
            cache_dir=settings.data_dir,
            ttl_s=settings.carbon_live_ttl_s,
        ).intensity()
        if live is not None and live.covers(t0, t1, last_holds_s=LIVE_STEP_S):
            return live, ""
        if live is None:
            notes.append(live_err)
        else:
            notes.append(f"live Electricity Maps ({zone}) does not cover the run's window")
    elif token:
        notes.append("H3D_ELECTRICITYMAPS_TOKEN is set but no zone (H3D_CARBON_ZONE)")
    fallbacks: list[Callable[[], Intensity | None]] = [
        lambda: (
            Intensity(
                "timeseries",
                f"{settings.carbon_timeseries_csv}",
                read_timeseries(settings.carbon_timeseries_csv),
            )
            if settings.carbon_timeseries_csv is not None
            else None
        ),
        lambda: (
            Intensity(
                "constant",
                "H3D_CARBON_INTENSITY_G_PER_KWH",
                ((0.0, settings.carbon_intensity_g_per_kwh),),
            )
            if settings.carbon_intensity_g_per_kwh is not None
            else None
        ),
        lambda: region(settings.carbon_region) if settings.carbon_region else None,
    ]
    for make in fallbacks:
        try:
            found = make()
        except CarbonConfigError as exc:
            notes.append(str(exc))
            continue
        if found is not None:
            if found.source == "timeseries" and not found.covers(t0, t1):
                notes.append("the time series does not cover the whole run: edge values held")
            return found, "; ".join(notes)
    return None, "; ".join(notes)


def run_carbon(
    settings: Settings,
    energy_j: Callable[[float, float], float | None],
    t0: float,
    t1: float,
) -> dict[str, Any]:
    """``co2e_g``, ``carbon_source``, ``carbon_detail`` for a window (null when unknown)."""
    intensity, note = resolve(settings, t0, t1)
    grams = co2e_g(energy_j, intensity, t0, t1)
    if intensity is not None:
        detail = intensity.detail
    elif configured(settings):  # set, but unusable: the note says why
        detail = "carbon intensity unavailable"
    else:
        detail = "no carbon intensity configured"
    if note:
        detail = f"{detail}; {note}"
    return {
        "co2e_g": grams,
        "carbon_source": intensity.source if intensity is not None else "none",
        "carbon_detail": detail,
    }
