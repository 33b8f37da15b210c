"""Carbon: exact figures on known traces, every source, the live provider on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from h3client import H3Profiler
from h3d import carbon
from h3d.config import Settings
from h3d.energy import EnergyCurve

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def make_settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path, **kw)


def trace() -> EnergyCurve:
    """100 W for the first hour, 300 W for the second, sampled every 10 s (a power-only
    device: the trapezoid is exact on a piecewise-constant trace with a step at 3600 s)."""
    samples = [(T0 + t, 100.0 if t < 3600 else 300.0, None) for t in range(0, 7201, 10)]
    samples.insert(360, (T0 + 3600.0, 100.0, None))  # the step is vertical
    return EnergyCurve(samples, max_gap_s=60.0)


def test_exact_grams_on_a_known_trace_and_intensity_series() -> None:
    curve = trace()
    series = carbon.Intensity("timeseries", "test", ((T0, 200.0), (T0 + 3600.0, 400.0)))
    # 100 W x 3600 s = 0.1 kWh at 200 g/kWh = 20 g; 300 W x 3600 s = 0.3 kWh at 400 = 120 g
    grams = carbon.co2e_g(curve.between, series, T0, T0 + 7200)
    assert grams == pytest.approx(140.0, rel=1e-12)
    # across the step: 0.05 kWh at 200 g/kWh + 0.15 kWh at 400 g/kWh = 10 + 60 g
    assert carbon.co2e_g(curve.between, series, T0 + 1800, T0 + 5400) == pytest.approx(70.0)
    assert carbon.co2e_g(curve.between, None, T0, T0 + 7200) is None
    assert carbon.co2e_g(lambda a, b: None, series, T0, T0 + 1) is None  # unknown energy


def test_nothing_configured_is_null_never_a_guess(tmp_path: Path) -> None:
    out = carbon.run_carbon(make_settings(tmp_path), trace().between, T0, T0 + 7200)
    assert out["co2e_g"] is None and out["carbon_source"] == "none"
    assert not carbon.configured(make_settings(tmp_path))


def test_constant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H3D_CARBON_INTENSITY_G_PER_KWH", "250")
    s = Settings(data_dir=tmp_path)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "constant"
    assert out["co2e_g"] == pytest.approx(0.4 * 250.0)  # 0.4 kWh


def test_region_average_names_its_data_set_and_year(tmp_path: Path) -> None:
    s = make_settings(tmp_path, carbon_region="fr")
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "region_average"
    assert out["co2e_g"] == pytest.approx(0.4 * 56.0)
    assert (
        "France (FR) 2023" in out["carbon_detail"] and "Our World in Data" in out["carbon_detail"]
    )
    with pytest.raises(ValidationError, match="unknown carbon region 'XX'.*FR"):
        make_settings(tmp_path, carbon_region="XX")


def test_timeseries_csv(tmp_path: Path) -> None:
    csv = tmp_path / "grid.csv"
    csv.write_text(f"time,g_per_kwh\n# hourly\n2023-11-14T22:13:20Z,200\n{T0 + 3600:.0f},400\n")
    s = make_settings(tmp_path, carbon_timeseries_csv=csv, carbon_intensity_g_per_kwh=999)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "timeseries"
    assert out["co2e_g"] == pytest.approx(140.0)
    # a window that starts before the series: the first value holds, and it says so
    out = carbon.run_carbon(s, trace().between, T0 - 60, T0 + 7200)
    assert "edge values held" in out["carbon_detail"]


def test_a_run_after_the_last_row_of_a_timeseries_says_the_value_held(tmp_path: Path) -> None:
    """A window up to an hour past the CSV's last row got its held value with no note (the
    live provider's hour of grace applied to the file too)."""
    csv = tmp_path / "grid.csv"
    csv.write_text(f"{T0:.0f},200\n{T0 + 3600:.0f},400\n")
    s = make_settings(tmp_path, carbon_timeseries_csv=csv)
    out = carbon.run_carbon(s, trace().between, T0 + 3600, T0 + 4200)
    assert out["carbon_source"] == "timeseries"
    assert out["co2e_g"] == pytest.approx(300.0 * 600 / 3.6e6 * 400.0)  # 400 g/kWh held
    assert "edge values held" in out["carbon_detail"]
    assert (
        "edge values" not in carbon.run_carbon(s, trace().between, T0, T0 + 3600)["carbon_detail"]
    )  # a window the rows span: nothing held


def test_a_broken_csv_says_why_and_falls_back(tmp_path: Path) -> None:
    csv = tmp_path / "grid.csv"
    csv.write_text("1700000000,200\n1700003600,lots\n")
    s = make_settings(tmp_path, carbon_timeseries_csv=csv, carbon_intensity_g_per_kwh=100)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "constant" and "grid.csv:2" in out["carbon_detail"]
    s = make_settings(tmp_path, carbon_timeseries_csv=tmp_path / "missing.csv")
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["co2e_g"] is None and "unreadable" in out["carbon_detail"]
    csv.write_text("1700000000,-5\n")
    with pytest.raises(carbon.CarbonConfigError, match=">= 0"):
        carbon.read_timeseries(csv)


# --- live: a fake Electricity Maps on loopback ------------------------------------------


class FakeElectricityMaps:
    def __init__(self) -> None:
        self.requests: list[str] = []
        self.status = 200
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                if self.headers.get("auth-token") != "tok":
                    return self._send(401, {"message": "invalid token"})
                if outer.status != 200:
                    return self._send(outer.status, {"message": "down"})
                if self.path.startswith("/v3/carbon-intensity/history?zone=DE"):
                    return self._send(200, {"zone": "DE", "history": outer.history})
                if self.path.startswith("/v3/carbon-intensity/latest?zone=DE"):
                    return self._send(200, outer.latest)
                return self._send(404, {"message": "no route"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


@pytest.fixture
def emaps() -> Iterator[FakeElectricityMaps]:
    f = FakeElectricityMaps()
    f.history = [
        {"zone": "DE", "carbonIntensity": 200, "datetime": iso(T0), "isEstimated": False},
        {"zone": "DE", "carbonIntensity": 400, "datetime": iso(T0 + 3600), "isEstimated": True},
    ]
    f.latest = {"zone": "DE", "carbonIntensity": 400, "datetime": iso(T0 + 3600)}
    yield f
    f.close()


def live_settings(tmp_path: Path, url: str, **kw: Any) -> Settings:
    return make_settings(
        tmp_path, electricitymaps_token="tok", carbon_zone="DE", carbon_live_url=url, **kw
    )


def test_live_exact_figures_and_the_cache(tmp_path: Path, emaps: FakeElectricityMaps) -> None:
    s = live_settings(tmp_path, emaps.url)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "live" and "zone DE" in out["carbon_detail"]
    assert out["co2e_g"] == pytest.approx(140.0)
    assert len(emaps.requests) == 2  # history + latest
    again = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert again == out and len(emaps.requests) == 2  # served from the cache
    assert (tmp_path / "carbon-live-DE.json").exists()


def test_live_failure_falls_back_with_a_label(tmp_path: Path, emaps: FakeElectricityMaps) -> None:
    emaps.status = 503
    s = live_settings(tmp_path, emaps.url, carbon_region="DE")
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "region_average"
    assert out["co2e_g"] == pytest.approx(0.4 * 381.0)
    assert "live Electricity Maps (DE) failed" in out["carbon_detail"]
    assert "503" in out["carbon_detail"]
    # the failure is remembered: no request storm while the provider is down
    n = len(emaps.requests)
    carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert len(emaps.requests) == n
    # a wrong token, with nothing else configured: null, and why
    s = make_settings(
        tmp_path / "b", electricitymaps_token="bad", carbon_zone="DE", carbon_live_url=emaps.url
    )
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["co2e_g"] is None and "401" in out["carbon_detail"]


def test_live_provider_unreachable_uses_what_it_cached(
    tmp_path: Path, emaps: FakeElectricityMaps
) -> None:
    s = live_settings(tmp_path, emaps.url, carbon_live_ttl_s=1e-3)
    assert carbon.run_carbon(s, trace().between, T0, T0 + 7200)["carbon_source"] == "live"
    emaps.close()  # the provider goes away
    time.sleep(0.01)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 7200)
    assert out["carbon_source"] == "live" and "the last refresh failed" in out["carbon_detail"]
    assert out["co2e_g"] == pytest.approx(140.0)
    # a window the cached points do not reach: not guessed from them
    out = carbon.run_carbon(s, trace().between, T0 - 86400, T0)
    assert out["co2e_g"] is None and "does not cover" in out["carbon_detail"]


def test_api_report_show_and_metrics_carry_co2e(daemon_factory: Any) -> None:
    d = daemon_factory(H3D_CARBON_INTENSITY_G_PER_KWH="300")
    with d.client() as api:
        run = api.post("/v1/runs", json={"name": "c"}).json()
        time.sleep(0.4)
        metrics = api.get("/metrics").text
        assert (
            f'h3d_run_co2e_grams_total{{run="{run["id"]}",name="c",source="constant"}}' in metrics
        )
        api.patch(f"/v1/runs/{run['id']}", json={"status": "finished"})
        e = api.get(f"/v1/runs/{run['id']}/energy").json()
        assert e["carbon_source"] == "constant"
        assert e["co2e_g"] == pytest.approx(e["energy_j"] * 300 / 3.6e6, rel=1e-9)
        assert e["co2e_g"] > 0
        rep = api.get(f"/v1/runs/{run['id']}/report").json()
        assert rep["co2e_g"] == pytest.approx(e["co2e_g"]) and rep["carbon_source"] == "constant"
    # the profiler's results carry the daemon's figure through
    prof = H3Profiler("carbon", url=d.url, data_dir=d.data_dir)
    prof.start()
    for i in range(20):
        prof.log_batch(2.0 / (1 + i))
        time.sleep(0.01)
    results = prof.stop()
    assert results["carbon_source"] == "constant"
    assert results["co2e_g"] == pytest.approx(results["total_energy_j"] * 300 / 3.6e6, rel=1e-9)
    out = subprocess.run(
        [sys.executable, "-m", "h3d", "show", run["id"]],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "gCO2e  source=constant" in out.stdout


# --- CSV edge cases -------------------------------------------------------------------------


def test_a_csv_saved_with_a_byte_order_mark_keeps_its_first_row(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the first row's time read as
    '\\ufeff1700000000', failed, and was skipped as if it were a header, so the next row's
    value held back over the run (+50 % in the audit's case)."""
    csv = tmp_path / "bom.csv"
    csv.write_text(f"{T0:.0f},200\n{T0 + 3600:.0f},400\n", encoding="utf-8-sig")
    assert carbon.read_timeseries(csv) == ((T0, 200.0), (T0 + 3600.0, 400.0))
    s = make_settings(tmp_path, carbon_timeseries_csv=csv)
    # the rows span the window (a window past the last row would say the value held)
    out = carbon.run_carbon(s, trace().between, T0, T0 + 3600)
    assert out["co2e_g"] == pytest.approx(20.0) and "edge values" not in out["carbon_detail"]
    # with a header too
    csv.write_text(f"time,g_per_kwh\n{T0:.0f},200\n", encoding="utf-8-sig")
    assert carbon.read_timeseries(csv) == ((T0, 200.0),)


def test_a_first_row_with_a_number_is_data_never_taken_for_a_header(tmp_path: Path) -> None:
    """A first row whose intensity is a number is a data row: if its time cannot be read it
    is an error (with its line), not a header silently dropped."""
    csv = tmp_path / "grid.csv"
    csv.write_text(f"2023-13-45T00:00:00Z,200\n{T0:.0f},400\n")
    with pytest.raises(carbon.CarbonConfigError, match="grid.csv:1"):
        carbon.read_timeseries(csv)


def test_comment_lines_before_the_header_are_allowed(tmp_path: Path) -> None:
    """docs/power.md: "a header and # lines are allowed"; a # line before the header made
    the header line 2, which was then refused and the whole series unusable."""
    csv = tmp_path / "grid.csv"
    csv.write_text(
        f"# hourly grid intensity, g/kWh\n\ntime,g_per_kwh\n{T0:.0f},200\n{T0 + 3600:.0f},400\n"
    )
    assert carbon.read_timeseries(csv) == ((T0, 200.0), (T0 + 3600.0, 400.0))
    out = carbon.run_carbon(
        make_settings(tmp_path, carbon_timeseries_csv=csv), trace().between, T0, T0 + 7200
    )
    assert out["carbon_source"] == "timeseries" and out["co2e_g"] == pytest.approx(140.0)
    # a second header-like row, after data, is still an error
    csv.write_text(f"time,g_per_kwh\n{T0:.0f},200\ntime,g_per_kwh\n")
    with pytest.raises(carbon.CarbonConfigError, match="grid.csv:3"):
        carbon.read_timeseries(csv)


def test_an_unknown_region_says_to_unset_it(tmp_path: Path) -> None:
    """Setting H3D_CARBON_INTENSITY_G_PER_KWH, which the message suggested, does not help:
    the region must be unset (it is checked at start-up whatever else is set)."""
    with pytest.raises(ValidationError, match="unset H3D_CARBON_REGION") as err:
        make_settings(tmp_path, carbon_region="us", carbon_intensity_g_per_kwh=400)
    assert "or set H3D_CARBON_INTENSITY_G_PER_KWH)" not in str(err.value)


# --- unknown energy, a configured source that fails, /metrics against REST -----------------


def _metric_values(text: str, name: str, run_id: str) -> list[float]:
    """The values of ``name`` for ``run_id`` in a /metrics body."""
    out = []
    for line in text.splitlines():
        if line.startswith(f'{name}{{run="{run_id}"'):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_co2e_is_null_whenever_energy_is_null_even_for_an_empty_window() -> None:
    series = carbon.Intensity("constant", "test", ((0.0, 300.0),))
    assert carbon.co2e_g(lambda a, b: None, series, T0, T0) is None
    assert carbon.co2e_g(lambda a, b: 0.0, series, T0, T0) == 0.0


def test_unknown_energy_is_absent_from_metrics_and_null_over_rest(daemon_factory: Any) -> None:
    """No readable device: REST says energy and co2e are null; /metrics exported a measured
    0 J and 0 g for the run. A zero-length run got co2e 0.0 beside its null energy."""
    d = daemon_factory(H3D_POWER_BACKENDS="none", H3D_CARBON_REGION="fr")
    with d.client() as api:
        rid = api.post("/v1/runs", json={"name": "blind"}).json()["id"]
        api.post(
            f"/v1/runs/{rid}/batches",
            json={
                "batches": [{"seq": i, "t": time.time(), "loss": 2.0 - 0.1 * i} for i in range(5)]
            },
        ).raise_for_status()
        time.sleep(0.5)
        metrics = api.get("/metrics").text
        e = api.get(f"/v1/runs/{rid}/energy").json()
        assert e["energy_j"] is None and e["co2e_g"] is None
        assert e["carbon_source"] == "region_average"
        assert rid not in metrics, metrics
        t = time.time()
        zero = api.post("/v1/runs", json={"name": "zero", "created_at": t}).json()["id"]
        api.patch(f"/v1/runs/{zero}", json={"status": "finished", "finished_at": t})
        e = api.get(f"/v1/runs/{zero}/energy").json()
        assert e["energy_j"] is None and e["co2e_g"] is None


def test_metrics_never_count_a_followed_run_above_rest(daemon_factory: Any) -> None:
    """A run whose process the daemon follows was charged the whole device on /metrics until
    its first CPU-share sample, while REST back-dates that share to the run's start: an idle
    process read 36 J on /metrics against 0 J over REST. The increments are now held until
    the share is measured, then counted at it."""
    d = daemon_factory(H3D_CARBON_INTENSITY_G_PER_KWH="300", H3D_FLUSH_INTERVAL_S="1.0")
    idle = subprocess.Popen(["sleep", "120"])
    try:
        with d.client() as api:
            rid = api.post(
                "/v1/runs", json={"name": "idle", "pid": idle.pid, "host": socket.gethostname()}
            ).json()["id"]
            deadline = time.monotonic() + 30
            while True:  # until REST attributes by the measured share
                e = api.get(f"/v1/runs/{rid}/energy").json()
                if e["by_device"] and e["by_device"][0]["attribution"] == "process":
                    break
                assert time.monotonic() < deadline, e
                time.sleep(0.1)
            time.sleep(1.2)  # a fresh rendering of /metrics, a few shares in
            metrics = api.get("/metrics").text
            after = api.get(f"/v1/runs/{rid}/energy").json()
    finally:
        idle.kill()
        idle.wait()
    (energy,) = _metric_values(metrics, "h3d_run_energy_joules_total", rid)
    (grams,) = _metric_values(metrics, "h3d_run_co2e_grams_total", rid)
    assert after["device_energy_j"] > 50.0  # the device ran for over a second
    # an idle process: a share of about 0, on both
    assert energy <= after["energy_j"] + 0.01 * after["device_energy_j"] + 1e-9
    assert grams <= after["co2e_g"] + 0.01 * after["device_energy_j"] * 300 / 3.6e6 + 1e-12


def test_a_configured_source_that_fails_says_why_everywhere(
    daemon_factory: Any, emaps: FakeElectricityMaps
) -> None:
    """A live source answering 401 read "no carbon intensity configured; live ... failed"
    over REST, "no intensity set" in `h3d show`: configured, but unavailable, and why."""
    d = daemon_factory(
        H3D_ELECTRICITYMAPS_TOKEN="bad", H3D_CARBON_ZONE="DE", H3D_CARBON_LIVE_URL=emaps.url
    )
    with d.client() as api:
        rid = api.post("/v1/runs", json={"name": "c"}).json()["id"]
        time.sleep(0.3)
        api.patch(f"/v1/runs/{rid}", json={"status": "finished"})
        e = api.get(f"/v1/runs/{rid}/energy").json()
    assert e["co2e_g"] is None and e["carbon_source"] == "none"
    assert "not configured" not in e["carbon_detail"] and "no carbon" not in e["carbon_detail"]
    assert e["carbon_detail"].startswith("carbon intensity unavailable")
    assert "401" in e["carbon_detail"]
    out = subprocess.run(
        [sys.executable, "-m", "h3d", "show", rid],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("carbon"))
    assert "no intensity set" not in line and "401" in out.stdout.split("carbon", 1)[1]
    # nothing configured: said so
    nothing = carbon.run_carbon(make_settings(d.data_dir / "n"), trace().between, T0, T0 + 1)
    assert nothing["carbon_detail"] == "no carbon intensity configured"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_dashboard_carbon_card_says_why_co2e_is_unknown(
    daemon_factory: Any, emaps: FakeElectricityMaps
) -> None:
    """The carbon card read "no grid intensity configured" whenever co2e_g was null: with a
    live source failing (401), and with a region set but no readable device."""
    from playwright.sync_api import sync_playwright

    failing = daemon_factory(
        "failing",
        H3D_ELECTRICITYMAPS_TOKEN="bad",
        H3D_CARBON_ZONE="DE",
        H3D_CARBON_LIVE_URL=emaps.url,
    )
    blind = daemon_factory("blind", H3D_POWER_BACKENDS="none", H3D_CARBON_REGION="FR")
    runs = {}
    for d in (failing, blind):
        with d.client() as api:
            rid = api.post("/v1/runs", json={"name": "c"}).json()["id"]
            time.sleep(0.3)
            api.patch(f"/v1/runs/{rid}", json={"status": "finished"})
        runs[d.data_dir.name] = rid
    cards = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            for d in (failing, blind):
                page = browser.new_page()
                page.goto(f"{d.url}/#token={d.token}&run={runs[d.data_dir.name]}")
                card = page.locator("#run-cards .card", has_text="carbon")
                card.wait_for(timeout=20_000)
                cards[d.data_dir.name] = card.inner_text()
                page.close()
        finally:
            browser.close()
    assert "no grid intensity configured" not in cards["failing"]
    assert "unavailable" in cards["failing"] and "401" in cards["failing"]
    assert "no grid intensity configured" not in cards["blind"]
    assert "region_average" in cards["blind"] and "energy unknown" in cards["blind"]
