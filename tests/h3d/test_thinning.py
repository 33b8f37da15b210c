"""Retention thins old power samples without changing any run's energy (docs/power.md)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import delete, select

from h3d import analysis
from h3d.energy import thinned_step
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import Store, session_scope
from h3d.storage.models import Device, Epoch, PowerSample

Row = tuple[float, float | None, float | None]


def _power(t: float) -> float:
    return 100.0 + 50.0 * math.sin(t / 3.0) + (40.0 if int(t) % 7 == 0 else 0.0)


def _trace(counter: bool) -> list[Row]:
    """0.1 s samples over [0, 200): a sampler stall over (130, 133) and, on the counter, a
    reset at 150 (a restarted daemon)."""
    rows: list[Row] = []
    e = 0.0
    for k in range(2000):
        t = k * 0.1
        if 130.0 < t < 133.0:
            continue
        if rows:
            e += 0.5 * (_power(t) + _power(rows[-1][0])) * (t - rows[-1][0])
        if counter and abs(t - 150.0) < 1e-9:
            e = 0.0
        rows.append((t, _power(t), e if counter else None))
    return rows


def _figures(st: Store, run_id: str) -> dict[str, Any]:
    with st.read() as s:
        run = repo.get_run(s, run_id=run_id)
        model = analysis.run_model(s, run=run, interval_s=0.1)
        wide = analysis.EnergyModel(s, t0=120.0, t1=160.0, interval_s=0.1)
        return {
            "run": model.energy(*analysis.window(run)),
            "epochs": [model.energy(a, b) for a, b in ((50.05, 70.04), (70.04, 95.02))],
            "wide": wide.energy(120.0, 160.0),
        }


@pytest.fixture
def st(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    migrate.upgrade(s.engine)
    yield s
    s.engine.dispose()


def test_thinning_keeps_energy_gaps_and_resets(st: Store) -> None:
    with session_scope(st.sessions) as s:
        ids = []
        for name, counter in (("counter", True), ("power", False)):
            dev = repo.upsert_device(
                s, name=name, kind="cpu", source="estimated", model="", uuid_=None, now=0.0
            )
            ids.append(dev.id)
            rows = [
                {"device_id": dev.id, "t": t, "power_w": p, "energy_j": e}
                for t, p, e in _trace(counter)
            ]
            repo.add_power_samples(s, rows=rows)
        run = repo.create_run(
            s, name="old", config={}, tags=[], pid=None, host=None, n_train=None, now=50.05
        )
        run.finished_at = 120.03
        run_id = run.id
        for k, t in enumerate((70.04, 95.02)):
            s.add(Epoch(run_id=run_id, epoch=k, t=t, metrics={}))
    before = _figures(st, run_id)
    with session_scope(st.sessions) as s:
        assert repo.prune_power_samples(s, cutoff=180.0, bucket_s=10.0) > 3000
    once = _figures(st, run_id)
    with session_scope(st.sessions) as s:  # a later pass over an overlapping stretch
        repo.prune_power_samples(s, cutoff=195.0, bucket_s=10.0, since=170.0)
    with session_scope(st.sessions) as s:  # and a daemon start's pass over everything
        repo.prune_power_samples(s, cutoff=195.0, bucket_s=10.0)
        left = s.scalars(select(PowerSample.t).where(PowerSample.t < 180.0)).all()
    assert len(left) < 2 * 90  # about one per 10 s per device, plus edges
    for after in (once, _figures(st, run_id)):
        for key in ("run", "wide"):
            for b, a in zip(before[key]["by_device"], after[key]["by_device"], strict=True):
                # power only: the edges, inside one sampler period, interpolate linearly
                tol = 1e-9 if b["device"] == "counter" else 1e-6
                assert a["device_energy_j"] == pytest.approx(b["device_energy_j"], rel=tol)
                assert a["gaps_s"] == pytest.approx(b["gaps_s"], abs=1e-9)
                assert a["covered_s"] == pytest.approx(b["covered_s"], abs=1e-9)
                assert a["method"] == "thinned"
        for eb, ea in zip(before["epochs"], after["epochs"], strict=True):
            for b, a in zip(eb["by_device"], ea["by_device"], strict=True):
                exact = b["device"] == "counter"
                tol = 1e-9 if exact else 1e-4  # a power-only epoch edge: linear, not quadratic
                assert a["device_energy_j"] == pytest.approx(b["device_energy_j"], rel=tol)
    assert before["wide"]["by_device"][0]["gaps_s"] > 3.0  # the stall and the reset


def test_the_newest_sample_stays_when_nothing_follows_it(st: Store) -> None:
    """A store whose newest samples are all older than the cutoff (a daemon stopped for
    longer than the full-resolution window) and no run ends after them: the last sample is
    kept, so the thinned step before it still holds its energy. It was thinned away, and
    the device's energy over that time lost up to one bucket."""

    def device_energy() -> float:
        with st.read() as s:
            return float(
                analysis.EnergyModel(s, t0=0.0, t1=50.0, interval_s=0.1).energy(0.0, 50.0)[
                    "device_energy_j"
                ]
            )

    with session_scope(st.sessions) as s:
        dev = repo.upsert_device(
            s, name="d", kind="cpu", source="estimated", model="", uuid_=None, now=0.0
        )
        rows = [(t, p) for t, p, _e in _trace(False) if t < 39.95]
        repo.add_power_samples(
            s, rows=[{"device_id": dev.id, "t": t, "power_w": p, "energy_j": None} for t, p in rows]
        )
    before = device_energy()
    with session_scope(st.sessions) as s:
        repo.prune_power_samples(s, cutoff=1000.0, bucket_s=10.0)
    with st.read() as s:
        newest = s.scalar(select(PowerSample.t).order_by(PowerSample.t.desc()).limit(1))
    assert newest == pytest.approx(rows[-1][0])
    assert device_energy() == pytest.approx(before, rel=1e-9)


def test_a_store_thinned_by_an_older_version_reads_the_thinned_rows(st: Store) -> None:
    """An older version kept the first sample of each bucket and nothing else: its runs read
    no energy. The next retention pass marks those steps: the trapezoid over the kept rows."""
    with session_scope(st.sessions) as s:
        dev = repo.upsert_device(
            s, name="d", kind="cpu", source="estimated", model="", uuid_=None, now=0.0
        )
        kept = [(t, p) for t, p, _e in _trace(False) if t < 120.0 and round(t, 6) % 10.0 == 0.0]
        kept += [(t, p) for t, p, _e in _trace(False) if t >= 120.0]
        repo.add_power_samples(
            s, rows=[{"device_id": dev.id, "t": t, "power_w": p, "energy_j": None} for t, p in kept]
        )
        run = repo.create_run(
            s, name="old", config={}, tags=[], pid=None, host=None, n_train=None, now=20.0
        )
        run.finished_at = 100.0
        run_id = run.id
    # the bug: every step between the kept rows reads as a gap (before the unknown-energy
    # rule, 0 J; now null, since no device read any of the window)
    assert _figures(st, run_id)["run"]["energy_j"] is None
    with session_scope(st.sessions) as s:
        repo.prune_power_samples(s, cutoff=180.0, bucket_s=10.0)
    got = _figures(st, run_id)["run"]
    pts = [(t, p) for t, p in kept if 20.0 <= t <= 100.0]
    trapezoid = sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(pts))
    assert got["device_energy_j"] == pytest.approx(trapezoid, rel=1e-9)
    assert got["by_device"][0]["method"] == "thinned" and got["by_device"][0]["gaps_s"] == 0.0


def test_a_daemon_keeps_a_finished_runs_energy_after_thinning(
    daemon_factory: Callable[..., Any],
) -> None:
    env = {"H3D_POWER_FULL_RESOLUTION_S": "3", "H3D_POWER_DOWNSAMPLE_S": "2"}
    d = daemon_factory("thin", **env)
    with d.client() as c:
        rid = c.post("/v1/runs", json={"name": "old"}).json()["id"]
        time.sleep(6)
        c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
        time.sleep(0.5)
        before = c.get(f"/v1/runs/{rid}/energy").json()
        eta_before = c.get(f"/v1/runs/{rid}/eta").json()
    d.stop()
    d.start()  # the first retention pass runs ~5 s after start
    time.sleep(8)
    with d.client() as c:
        after = c.get(f"/v1/runs/{rid}/energy").json()
        eta_after = c.get(f"/v1/runs/{rid}/eta").json()
    st = Store(f"sqlite:///{d.data_dir / 'h3d.db'}")
    with st.read() as s:
        rows = s.execute(
            select(PowerSample.t, PowerSample.power_w, PowerSample.energy_j)
            .where(PowerSample.t.between(before["t_start"], before["t_end"]))
            .order_by(PowerSample.t)
        ).all()
    st.engine.dispose()
    assert before["by_device"][0]["n_samples"] > 100 and len(rows) < 12  # thinned
    # every step longer than a sampling step holds the energy of the samples it replaced
    long = [(a, b) for a, b in itertools.pairwise(rows) if b[0] - a[0] > 0.5]
    assert long and all(thinned_step(a, b) for a, b in long)
    assert before["energy_j"] > 250.0 and before["by_device"][0]["gaps_s"] == 0.0
    assert after["energy_j"] == pytest.approx(before["energy_j"], rel=1e-9)
    assert after["by_device"][0]["gaps_s"] == 0.0
    assert after["by_device"][0]["method"] == "thinned"
    assert eta_after.get("eta_bits_per_j") == eta_before.get("eta_bits_per_j")


def _seed(st: Store) -> list[int]:
    """The two devices' traces shifted by half a sampling period, so that bucket (and slice)
    boundaries fall between samples."""
    with session_scope(st.sessions) as s:
        ids = []
        for name, counter in (("counter", True), ("power", False)):
            dev = s.scalar(select(Device).where(Device.name == name)) or repo.upsert_device(
                s, name=name, kind="cpu", source="estimated", model="", uuid_=None, now=0.0
            )
            s.flush()
            ids.append(dev.id)
            rows = [
                {"device_id": dev.id, "t": t + 0.05, "power_w": p, "energy_j": e}
                for t, p, e in _trace(counter)
            ]
            repo.add_power_samples(s, rows=rows)
    return ids


def _kept(st: Store) -> list[Row]:
    with st.read() as s:
        return [
            (t, p, e)
            for t, p, e in s.execute(
                select(PowerSample.t, PowerSample.power_w, PowerSample.energy_j).order_by(
                    PowerSample.device_id, PowerSample.t
                )
            )
        ]


def _sliced_figures(st: Store, run_id: str) -> list[float]:
    with st.read() as s:
        run = repo.get_run(s, run_id=run_id)
        model = analysis.run_model(s, run=run, interval_s=0.1)
        wide = analysis.EnergyModel(s, t0=0.0, t1=180.0, interval_s=0.1)
        figs = [model.energy(*analysis.window(run))]
        figs += [model.energy(a, b) for a, b in ((50.0, 70.0), (70.0, 95.02), (95.02, 120.0))]
        figs += [wide.energy(a, b) for a, b in ((0.0, 180.0), (125.0, 135.0), (129.0, 131.0))]
    return [d["device_energy_j"] for f in figs for d in f["by_device"]]


@pytest.mark.parametrize("max_rows", [50, 250])
def test_thinning_in_slices_is_thinning_in_one_go(st: Store, max_rows: int) -> None:
    """The daemon thins one device's slice of samples per transaction, so that the writer is
    never held for long. Slices in turn keep exactly the rows one pass keeps, with the same
    energy on them: the row before a slice (kept by the previous one) carries the energy up
    to the slice's first sample, and a run or epoch edge between a slice's last sample and
    the next slice's first (here at 130.0 and 50.0, on a slice boundary) keeps both."""
    ids = _seed(st)
    with session_scope(st.sessions) as s:
        run = repo.create_run(
            s, name="old", config={}, tags=[], pid=None, host=None, n_train=None, now=50.0
        )
        run.finished_at = 120.0
        run_id = run.id
        for k, t in enumerate((70.0, 95.02, 130.0)):
            s.add(Epoch(run_id=run_id, epoch=k, t=t, metrics={}))
    before = _sliced_figures(st, run_id)
    with session_scope(st.sessions) as s:
        repo.prune_power_samples(s, cutoff=180.0, bucket_s=10.0)
    one_go, one_go_figures = _kept(st), _sliced_figures(st, run_id)
    with session_scope(st.sessions) as s:
        s.execute(delete(PowerSample))
    _seed(st)
    slices = 0
    for dev in ids:
        a = float("-inf")
        while a < 180.0:
            with session_scope(st.sessions) as s:
                _n, a = repo.prune_power_slice(
                    s, device_id=dev, since=a, cutoff=180.0, bucket_s=10.0, max_rows=max_rows
                )
            slices += 1
    assert slices >= 2 * 9  # a bucket or two each, to 180 s
    sliced = _kept(st)
    assert [r[0] for r in sliced] == [r[0] for r in one_go]
    for (_t, p1, e1), (_t, p2, e2) in zip(sliced, one_go, strict=True):
        assert (p1, e1) == pytest.approx((p2, e2), rel=1e-9, abs=1e-9)
    assert len(sliced) < 4000 / 4
    figures = _sliced_figures(st, run_id)
    assert figures == pytest.approx(one_go_figures, rel=1e-9)
    # the counter's energy over the run and its epochs, exactly as before thinning
    assert figures[0:8:2] == pytest.approx(before[0:8:2], rel=1e-9)
