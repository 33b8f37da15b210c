"""Dashboard fixes, each shown against a real daemon and Debian's Chromium (driven by
Playwright, as in test_dashboard.py): flat losses, η noise about 0, the loss-against-energy
chart's made-up energy, the mean line, an unknown run id, time ticks, a stop that a final
epoch without η withdrew, and legends. The η noise is also tested on h3d.efficiency itself.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from h3client._report import diminishing_returns
from h3d import efficiency as eff
from tests.conftest import Daemon
from tests.h3d import test_dashboard as _dash

browser = _dash.browser  # the same Chromium fixture
needs_browser = _dash.needs_browser
_get = _dash._get

# --- h3d.efficiency ------------------------------------------------------------------------


def test_equal_losses_give_exactly_zero_information_gain() -> None:
    """Σ lᵢwᵢ / Σ wᵢ of 100 losses of 0.1 is not 0.1: ΔI came out ±2e-17 bits, η −7.5e-17."""
    for loss in (0.1, 0.7, 1.1, math.log(10)):
        for weights in ([1.0] * 100, [float(i % 7 + 1) for i in range(300)], [32.0, 64.0] * 10):
            pts = [(float(i), loss, w) for i, w in enumerate(weights)]
            k = eff.smoothing_k(len(pts))
            assert eff.smoothed(pts[-k:]) == loss
            bits = eff.info_gain_bits(eff.loss_at_start(pts), eff.smoothed(pts[-k:]))
            assert bits == 0.0
            assert eff.eta(bits, 12.5) == 0.0
            # the marginal η's loss a window back too
            assert eff.info_gain_bits(eff.loss_before(pts, 50.0, k), eff.smoothed(pts[-k:])) == 0


def test_smoothed_is_still_the_weighted_mean() -> None:
    pts = [(0.0, 1.0, 1.0), (1.0, 2.0, 3.0), (2.0, 4.0, 4.0)]
    assert eff.smoothed(pts) == pytest.approx((1.0 + 6.0 + 16.0) / 8.0, rel=1e-15)
    assert eff.smoothed([]) is None
    assert eff.smoothed([(0.0, 1.0, 0.0)]) is None


# --- a daemon and a browser ----------------------------------------------------------------


@dataclass
class Store:
    daemon: Daemon
    started_at: float  # before the daemon started: no power sample is older


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("dashfix")
    started_at = time.time()
    d = _dash._daemon(root)
    time.sleep(1.5)  # the sampler has readings for runs that start a second ago
    try:
        yield Store(d, started_at)
    finally:
        d.stop()


@contextlib.contextmanager
def opened(browser: Any, d: Daemon, route: str, *, expect_404: bool = False) -> Iterator[_dash.Tab]:
    """test_dashboard's tab on the page of run ``route``; every request to this daemon."""
    with _dash.opened(browser, d.url) as tab:
        tab.page.set_default_timeout(15_000)
        tab.page.goto(f"{d.url}/#token={d.token}&run={route}")
        yield tab
        if expect_404:  # the console's line for the answer the test asked for
            _dash._dismiss(tab, "404")
        assert all(u.startswith(d.url) for u in tab.requests), tab.requests


def _run(
    d: Daemon,
    name: str,
    losses: list[float],
    *,
    created_at: float,
    end: float,
    epochs: list[dict[str, Any]] | None = None,
    batch_epochs: list[int] | None = None,
    finished_at: float | None = None,
) -> str:
    """A run finished at ``finished_at`` (default ``end``) whose batches are spread evenly
    over (created_at, end]."""
    n = len(losses)
    batches = [
        {
            "seq": i,
            "t": created_at + (end - created_at) * (i + 1) / n,
            "loss": loss,
            **({"epoch": batch_epochs[i]} if batch_epochs is not None else {}),
        }
        for i, loss in enumerate(losses)
    ]
    with d.client() as c:
        body = {"name": name, "created_at": created_at, "n_train": 1000}
        rid = str(c.post("/v1/runs", json=body).json()["id"])
        c.post(f"/v1/runs/{rid}/batches", json={"batches": batches}).raise_for_status()
        if epochs:
            c.post(f"/v1/runs/{rid}/epochs", json={"epochs": epochs}).raise_for_status()
        finish = {"status": "finished", "finished_at": end if finished_at is None else finished_at}
        c.patch(f"/v1/runs/{rid}", json=finish).raise_for_status()
    return rid


@pytest.fixture(scope="module")
def flat_run(store: Store) -> str:
    """100 batches, every one of loss 0.1, within the sampler's readings."""
    now = time.time()
    return _run(store.daemon, "flat", [0.1] * 100, created_at=now - 1.0, end=now)


# --- the tests -----------------------------------------------------------------------------


@needs_browser
def test_flat_loss_draws_charts_with_a_padded_axis(
    browser: Any, store: Store, flat_run: str
) -> None:
    """The mean of equal losses differs from them by 1e-17: ticks a step that small apart
    never advanced (v + step === v) and the page hung; a flat series needs a padded axis."""
    with opened(browser, store.daemon, flat_run) as t:
        t.page.wait_for_selector("#chart-loss-time path.series", state="attached")
        t.page.wait_for_selector("#chart-loss-energy path.series", state="attached")
        for chart in ("#chart-loss-time", "#chart-loss-energy"):
            svg = t.page.inner_html(f"{chart} svg.plot")
            assert "NaN" not in svg and "Infinity" not in svg
            ys = t.texts(f"{chart} text.tick[text-anchor=end]")  # the y axis's
            values = [float(v) for v in ys]
            assert len(values) >= 3 and len(set(values)) == len(values), ys
            assert min(values) < 0.1 < max(values), ys
        # a flat or one-point range ticks around its value, never with a zero step
        got = t.page.evaluate(
            "() => [H3Charts.ticks(0.1, 0.1 + 1.4e-17), H3Charts.ticks(2, 2), H3Charts.ticks(0, 0)]"
        )
        for tk in got:
            assert tk["step"] > 0 and len(tk["ticks"]) >= 3, got


@needs_browser
def test_equal_losses_show_eta_zero(browser: Any, store: Store, flat_run: str) -> None:
    report = _get(store.daemon, f"/v1/runs/{flat_run}/report")
    assert report["eta"]["info_gain_bits"] == 0.0 and report["eta"]["eta_bits_per_j"] == 0.0
    with opened(browser, store.daemon, flat_run) as t:
        t.page.wait_for_selector("#run-cards .card")
        card = t.page.locator("#run-cards .card", has_text="since the start").inner_text()
        assert card.split("\n")[1] == "0 bits/J", card
        gain = t.page.locator("#run-cards .card", has_text="information gained").inner_text()
        assert gain.split("\n")[1] == "0 bits/sample", gain
        # gains that cancel, summed in the page, are 0 too, not 5.6e-17
        got = t.page.evaluate(
            "() => [H3Charts.nearZero(0.1 + 0.2 - 0.3, 0.6), H3Charts.nearZero(1e-6, 0.6)]"
        )
        assert got == [0, 1e-6]


@needs_browser
def test_loss_against_energy_leaves_out_batches_without_energy(browser: Any, store: Store) -> None:
    """A run that began before any power reading: its first batches have no energy. The chart
    placed them on a line from (start, 0 J) to the first measured point, energy made up."""
    d, now = store.daemon, time.time()
    created = store.started_at - 3.0  # 3 s and more before the sampler's first reading
    rid = _run(d, "early-start", [2.0 - 0.01 * i for i in range(80)], created_at=created, end=now)
    loss = _get(d, f"/v1/runs/{rid}/series?metric=loss&points=1000")["points"]
    energy = _get(d, f"/v1/runs/{rid}/series?metric=energy&points=500")["points"]
    assert energy and len(loss) == 80
    measured = [p for p in loss if energy[0][0] <= p[0] <= energy[-1][0]]
    assert 0 < len(measured) < len(loss)  # the run's first batches have no energy
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("#chart-loss-energy path.series", state="attached")
        assert t.points("#chart-loss-energy")[0] == len(measured)
        note = t.page.inner_text("#chart-loss-energy .chart-note")
        assert f"{len(loss) - len(measured)} of {len(loss)} loss points left out" in note
        # the x axis starts where the energy series does, not at 0 J
        first_x = float(t.paths("#chart-loss-energy")[0][1:].split(",")[0])
        left = float(t.page.get_attribute("#chart-loss-energy rect.hover", "x"))
        assert first_x > left + 1


@needs_browser
def test_mean_line_is_the_daemons_bucket_means(browser: Any, store: Store) -> None:
    """LTTB keeps each bucket's extreme: the rolling mean of its points was biased toward
    the spikes. The line is the daemon's agg=mean answer, point for point."""
    d, now = store.daemon, time.time()
    losses = [1.0 + (3.0 if i % 7 == 0 else 0.0) + 0.001 * (i % 5) for i in range(400)]
    rid = _run(d, "spiky", losses, created_at=now - 1.0, end=now)
    mean = _get(d, f"/v1/runs/{rid}/series?metric=loss&agg=mean&points=40")
    k, pts = mean["bucket_batches"], mean["points"]
    assert k == 10 and len(pts) == 40
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("#chart-loss-time path.series", state="attached")
        assert any("agg=mean" in u for u in t.requests)
        names = t.page.eval_on_selector_all(
            "#chart-loss-time path.series", "ps => ps.map(p => p.dataset.name)"
        )
        assert names == ["batch loss", f"mean of {k} batches"]
        assert t.texts("#chart-loss-time .legend li") == names
        d_mean = t.paths("#chart-loss-time")[1]
        ys = [float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", d_mean)]
        assert len(ys) == len(pts)
        # pixels are linear in the value: the drawn y's are the daemon's means
        pairs = list(zip([p[1] for p in pts], ys, strict=True))
        (v0, y0), (v1, y1) = max(pairs), min(pairs)
        for (_x, v), y in zip(pts, ys, strict=True):
            assert y == pytest.approx(y0 + (y1 - y0) * (v - v0) / (v1 - v0), abs=0.2)


@needs_browser
def test_unknown_run_id_says_run_not_found(browser: Any, store: Store) -> None:
    with opened(browser, store.daemon, "no-such-run", expect_404=True) as t:
        t.page.wait_for_selector("#run-missing")
        assert "no-such-run" in t.page.inner_text("#run-missing")
        assert "loading" not in t.page.inner_text("#main")
        assert t.page.inner_text("#main h2") == "Run not found"


ALLOWED_STEPS_S = {
    **{m * 10.0**k: "s" for k in range(-3, 2) for m in (1, 2, 5)},
    30.0: "s",
    **{60.0 * m: "min" for m in (1, 2, 5, 10, 15, 30)},
    **{3600.0 * h: "h" for h in (1, 2, 3, 6, 12)},
}
PER_S = {"s": 1.0, "min": 60.0, "h": 3600.0}


@needs_browser
def test_time_axis_ticks_at_clock_steps(browser: Any, store: Store) -> None:
    """A 2.7 h run read "2k 4k 6k 8k" (seconds); ticks are now whole clock steps."""
    d, now = store.daemon, time.time()
    rid = _run(d, "long", [2.0 - 0.005 * i for i in range(200)], created_at=now - 9720, end=now)
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("#chart-loss-time path.series", state="attached")
        label = t.texts("#chart-loss-time text.label")[0]
        m = re.fullmatch(r"time since start \((s|min|h)\)", label)
        assert m, label
        ticks = t.texts("#chart-loss-time text.tick[text-anchor=middle]")
        assert all(re.fullmatch(r"\d+(\.\d+)?", v) for v in ticks), ticks
        secs = [float(v) * PER_S[m.group(1)] for v in ticks]
        steps = {round(b - a, 6) for a, b in zip(secs, secs[1:], strict=False)}
        assert len(ticks) >= 3 and len(steps) == 1, ticks
        (step,) = steps
        assert ALLOWED_STEPS_S.get(step) == m.group(1), (step, ticks)
        assert all(abs(s / step - round(s / step)) < 1e-9 for s in secs)
        got = t.page.evaluate(
            "() => [0.003, 160, 9720].map(h => { const k = H3Charts.timeTicks(0, h, 6);"
            " return [k.unit, k.ticks.map(k.fmt)]; })"
        )
        assert got == [
            ["s", ["0", "0.001", "0.002", "0.003"]],
            ["s", ["0", "30", "60", "90", "120", "150"]],
            ["min", ["0", "30", "60", "90", "120", "150"]],
        ]


def _epoch_run(d: Daemon, name: str, *, last_without_eta: bool) -> str:
    """Epoch 0 drops the loss by 2 nats (after its first batch), epochs 1 and 2 by 0.001: η falls below 10 % of
    its peak after epoch 0. With ``last_without_eta`` an epoch 3 follows with no batches."""
    now = time.time()
    t0 = now - 1.2
    losses = [3.0] + [1.0] * 9
    losses += [1.0 - 0.001 * i / 9 for i in range(10)]
    losses += [0.999 - 0.001 * i / 9 for i in range(10)]
    end = now - 0.3
    ends = [t0 + (end - t0) * (10 * (e + 1)) / 30 for e in range(3)]
    epochs = [{"epoch": e, "t": ends[e], "accuracy": 0.5} for e in range(3)]
    if last_without_eta:
        epochs.append({"epoch": 3, "t": now, "accuracy": 0.5})
    rid = _run(
        d,
        name,
        losses,
        created_at=t0,
        end=end,
        epochs=epochs,
        batch_epochs=[i // 10 for i in range(30)],
        finished_at=now,
    )
    return rid


@needs_browser
def test_a_final_epoch_without_eta_keeps_the_suggested_stop(browser: Any, store: Store) -> None:
    d = store.daemon
    rid = _epoch_run(d, "stop-then-no-eta", last_without_eta=True)
    epochs = _get(d, f"/v1/runs/{rid}/report")["epochs"]
    etas = [e["eta_bits_per_j"] for e in epochs]
    assert etas[3] is None and all(v is not None for v in etas[:3]), etas
    assert etas[1] < 0.1 * etas[0] and etas[2] < 0.1 * etas[0]
    # the known epochs call for a stop after epoch 0; the fourth, without η, says nothing
    assert diminishing_returns(epochs[:3])["epoch"] == 0  # type: ignore[index]
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("table.epochs tbody tr")
        card = t.page.locator("#run-cards .card", has_text="suggested stop").inner_text()
        assert "after epoch 0" in card, card
        assert t.texts("table.epochs tr.stop td:first-child") == ["0 suggested stop"]
        assert t.page.locator("#chart-eta line.mark").count() == 1
        # its loss against energy spans 0.998 to 1 nats: no two ticks may read alike
        for chart in ("#chart-loss-energy", "#chart-loss-time", "#chart-eta"):
            for anchor in ("end", "middle"):
                # (the epoch axis leaves its half-epoch ticks blank)
                labels = [v for v in t.texts(f"{chart} text.tick[text-anchor={anchor}]") if v]
                assert len(set(labels)) == len(labels), (chart, labels)


@needs_browser
def test_missing_eta_makes_no_stop_either(browser: Any, store: Store) -> None:
    """η that never fell below 10 % of its peak among the known epochs: no stop, whatever an
    epoch without η after them (it used to be read as "η stayed high" or "fell")."""
    d, now = store.daemon, time.time()
    t0, end = now - 1.2, now - 0.3
    losses = [3.0 - 0.05 * i for i in range(30)]  # the same drop every epoch
    ends = [t0 + (end - t0) * (10 * (e + 1)) / 30 for e in range(3)]
    epochs = [{"epoch": e, "t": ends[e]} for e in range(3)] + [{"epoch": 3, "t": now}]
    rid = _run(
        d, "steady", losses, created_at=t0, end=end, epochs=epochs,
        batch_epochs=[i // 10 for i in range(30)], finished_at=now,
    )  # fmt: skip
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("table.epochs tbody tr")
        card = t.page.locator("#run-cards .card", has_text="suggested stop").inner_text()
        assert card.split("\n")[1] == "–", card


@needs_browser
def test_axes_carry_units_and_legends_name_the_drawn_series(browser: Any, store: Store) -> None:
    """Epoch 0 has no batches, so no ΔI: η since the start is unknown at every epoch and only
    the epochs' own η is drawn. The legend named both."""
    d, now = store.daemon, time.time()
    t0, end = now - 1.2, now - 0.2
    losses = [3.0 - 0.05 * i for i in range(20)]
    epochs = [{"epoch": 0, "t": t0 + 0.1}] + [
        {"epoch": e, "t": t0 + 0.1 + (end - t0 - 0.1) * e / 2} for e in (1, 2)
    ]
    # the batches fall after epoch 0's end: epoch 0 holds none
    rid = _run(
        d, "no-start-eta", losses, created_at=t0 + 0.1, end=end, epochs=epochs,
        batch_epochs=[1 + i // 10 for i in range(20)],
    )  # fmt: skip
    epochs_out = _get(d, f"/v1/runs/{rid}/report")["epochs"]
    assert epochs_out[0]["info_gain_bits"] is None
    assert sum(e["eta_bits_per_j"] is not None for e in epochs_out) >= 1
    with opened(browser, d, rid) as t:
        t.page.wait_for_selector("#chart-eta path.series", state="attached")
        t.page.wait_for_selector("#chart-power-0 path.series", state="attached")
        drawn = t.page.eval_on_selector_all(
            "#chart-eta path.series", "ps => ps.map(p => p.dataset.name)"
        )
        assert drawn == ["marginal η (the epoch's own)"]
        assert t.texts("#chart-eta .legend li") == drawn
        units = {
            "#chart-loss-time": [r"time since start \((s|min|h)\)", r"loss \(nats\)"],
            "#chart-loss-energy": [r"energy used by the run \(J\)", r"loss \(nats\)"],
            "#chart-power-0": [r"time since start \((s|min|h)\)", r"power \(W\)"],
            "#chart-eta": [r"epoch", r"η \(bits/J\)"],
        }
        for chart, want in units.items():
            labels = t.texts(f"{chart} svg.plot text.label")
            assert len(labels) == 2 and all(
                re.fullmatch(w, got) for w, got in zip(want, labels, strict=True)
            ), (chart, labels)


def test_offline_bundle_holds_the_mean_line(store: Store, flat_run: str) -> None:
    """`h3d show --html` draws from the same data the page fetches: the bucket means too."""
    from h3d.dashboard import run_bundle

    bundle = run_bundle(lambda path: _get(store.daemon, path), flat_run)
    mean = _get(store.daemon, f"/v1/runs/{flat_run}/series?metric=loss&agg=mean&points=40")
    assert bundle["loss_mean"] == {"points": mean["points"], "bucket_batches": 3}
