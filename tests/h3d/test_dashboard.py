"""The dashboard end to end: Debian's Chromium, driven by Playwright, against a real daemon
holding real profiled training runs (an MLP on scikit-learn's digits through H3Profiler).

The page is served here under a strict Content-Security-Policy (script/style 'self' only), so
an inline script or style would show up as a console error, and every test ends by checking
that the console stayed clean and that the page asked nothing of any other host.
Screenshots go to build/screenshots/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from h3client import H3Profiler
from h3client._report import diminishing_returns
from tests.conftest import REPO, Daemon, burn_cpu, daemon_env, profile_on_two_nodes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = REPO / "build" / "screenshots"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# (name, tags, hidden units, epochs): energies differ through the epoch counts, and the order
# by energy is not the order of creation.
RUNS = [
    ("mlp-16-e3", ["sweep", "narrow"], 16, 3),
    ("mlp-64-e6", ["sweep", "wide"], 64, 6),
    ("mlp-16-e2", ["sweep", "narrow"], 16, 2),
    ("mlp-64-e4", ["sweep", "wide"], 64, 4),
]

needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (make test installs it with apt-get when run as root)",
)


# --- real training -----------------------------------------------------------------------


@dataclass
class Digits:
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any


@pytest.fixture(scope="module")
def digits() -> Digits:
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(yt), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return Digits(xt[tr], yt[tr], xt[te], yt[te])


@dataclass
class Trainer:
    """A small MLP trained with SGD; every batch and epoch goes to the profiler."""

    data: Digits
    hidden: int
    seed: int = 0
    epoch: int = 0
    model: Any = field(init=False)
    opt: Any = field(init=False)

    def __post_init__(self) -> None:
        import torch

        torch.manual_seed(self.seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(64, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 10)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def epochs(self, prof: H3Profiler, n: int, batch: int = 100) -> None:
        import torch

        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        for _ in range(n):
            order = torch.randperm(len(self.data.y_train))
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                losses = loss_fn(self.model(self.data.x_train[idx]), self.data.y_train[idx])
                loss = losses.mean()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                prof.log_batch(loss.detach(), losses=losses.detach(), indices=idx, epoch=self.epoch)
            with torch.no_grad():
                acc = (self.model(self.data.x_test).argmax(1) == self.data.y_test).float().mean()
            prof.log_epoch(self.epoch, accuracy=float(acc))
            self.epoch += 1
            # An epoch of this MLP takes ~10 ms on a quiet machine: the sampler (every 50 ms
            # here) would see a run too short to draw a power curve. A run's energy is its
            # share of the machine's busy CPU time, read in 10 ms ticks, so 0.1 s of CPU per
            # epoch, not a sleep: the runs' energies then follow their epoch counts (2 to 6)
            # wherever another test loads the machine (pytest-xdist's other worker), which
            # halves a share at most.
            burn_cpu(0.1)


def _daemon(root: Path) -> Daemon:
    return Daemon(
        root,
        daemon_env(
            root,
            H3D_POWER_BACKENDS="constant:50",
            H3D_SAMPLE_INTERVAL_S="0.05",
            H3D_FLUSH_INTERVAL_S="0.2",
            H3D_LOG_LEVEL="WARNING",
        ),
    ).start()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Iterator[Daemon]:
    """A daemon holding four finished, profiled training runs."""
    d = _daemon(tmp_path_factory.mktemp("dash"))
    try:
        for i, (name, tags, hidden, n) in enumerate(RUNS):
            trainer = Trainer(digits, hidden, seed=i)
            p = H3Profiler(
                name,
                url=d.url,
                data_dir=d.data_dir,
                tags=tags,
                config={"hidden": hidden, "lr": 0.1, "epochs": n},
                n_train=len(digits.y_train),
            )
            trainer.epochs(p, n)
            p.stop()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon for runs written straight through the API (tests add their own)."""
    d = _daemon(tmp_path_factory.mktemp("scratch"))
    try:
        yield d
    finally:
        d.stop()


def _runs(d: Daemon, **params: Any) -> list[dict[str, Any]]:
    with d.client() as c:
        return list(c.get("/v1/runs", params={"limit": 1000, **params}).json()["data"])


def _eta_points(epochs: list[dict[str, Any]]) -> list[int]:
    """How many points the η chart draws: η since start while every epoch so far has its
    bits and energy, and each epoch's own η where it has one (an epoch with no power reading
    in it, as on a loaded machine, has none). At least one of each, or the chart shows
    nothing to test."""
    cum, ok, joules = 0, True, 0.0
    for e in epochs:  # app.js's cumulativeEta
        ok = ok and e["info_gain_bits"] is not None and e["energy_j"] is not None
        joules += e["energy_j"] or 0.0
        cum += ok and joules > 0
    marginal = sum(e["eta_bits_per_j"] is not None for e in epochs)
    assert cum >= 1 and marginal >= 1
    return [cum, marginal]


def _get(d: Daemon, path: str) -> Any:
    with d.client() as c:
        r = c.get(path)
        r.raise_for_status()
        return r.json()


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@dataclass
class Tab:
    page: Any
    errors: list[str]
    requests: list[str]
    base: str

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def paths(self, selector: str) -> list[str]:
        """The ``d`` of each series path under ``selector``."""
        return list(
            self.page.eval_on_selector_all(
                f"{selector} path.series", "ps => ps.map(p => p.getAttribute('d'))"
            )
        )

    def points(self, selector: str) -> list[int]:
        """Points drawn by each series path under ``selector`` (one M/L command a point)."""
        return [len(re.findall(r"[ML]", d)) for d in self.paths(selector)]

    def texts(self, selector: str) -> list[str]:
        return list(
            self.page.eval_on_selector_all(selector, "es => es.map(e => e.textContent.trim())")
        )

    def names(self) -> list[str]:
        return list(
            self.page.eval_on_selector_all(
                "table.runs-table tbody td[data-col=name]",
                "tds => tds.map(t => t.textContent.trim())",
            )
        )


@contextlib.contextmanager
def opened(browser: Any, base: str) -> Iterator[Tab]:
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    # the page runs under the daemon's own Content-Security-Policy: Chromium logs a
    # violation (an inline style or script) as a console error, which fails the test
    errors: list[str] = []
    requests: list[str] = []
    page.on(
        "console",
        lambda m: (
            errors.append(f"console.{m.type}: {m.text} {m.location['url']}")
            if m.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    tab = Tab(page, errors, requests, base)
    try:
        try:
            yield tab
        except Exception as e:
            # a wait that timed out says only which selector it waited for: add what the page
            # showed, the console's errors and the last requests, so that a failure seen once
            # in CI can be read
            with contextlib.suppress(Exception):
                shown = page.inner_text("body", timeout=2_000)[:1500]
                e.add_note(f"page {page.url!r} showed:\n{shown}")
            e.add_note(f"console errors: {errors}; last requests: {requests[-8:]}")
            raise
        assert errors == [], f"the page logged errors: {errors}"
        foreign = [u for u in requests if not (u.startswith(base) or u.startswith("file:"))]
        assert foreign == [], f"the page fetched from other hosts: {foreign}"
    finally:
        ctx.close()


@pytest.fixture
def tab(browser: Any, trained: Daemon) -> Iterator[Tab]:
    with opened(browser, trained.url) as t:
        yield t


def until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll ``cond`` (page.wait_for_function would need 'unsafe-eval' under our CSP)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s} s")
        time.sleep(0.05)


def _goto(t: Tab, d: Daemon, route: str = "") -> None:
    t.page.goto(f"{d.url}/#token={d.token}" + (f"&{route}" if route else ""))


def _dismiss(t: Tab, *expected: str) -> None:
    """Drop the console's "Failed to load resource" lines a test provokes on purpose (a
    refused token, a stopped daemon, a run that is gone): every other error still fails it."""
    pattern = re.compile(r"console\.error: Failed to load resource: .*(" + "|".join(expected) + ")")
    t.errors[:] = [e for e in t.errors if not pattern.match(e)]


def _post_batches(d: Daemon, run_id: str, start: int, n: int) -> None:
    now = time.time()
    batches = [
        {"seq": start + i, "t": now - 0.001 * (n - i), "loss": 2.0 / (1 + 0.01 * (start + i))}
        for i in range(n)
    ]
    with d.client() as c:
        c.post(f"/v1/runs/{run_id}/batches", json={"batches": batches}).raise_for_status()


# --- the tests -----------------------------------------------------------------------------


@needs_browser
def test_runs_list_sorts_by_energy_and_filters_by_tag(tab: Tab, trained: Daemon) -> None:
    page = tab.page
    _goto(tab, trained)
    page.wait_for_selector("table.runs-table tbody tr")
    assert "token" not in page.url  # the token left the address bar for sessionStorage
    newest_first = [r["name"] for r in _runs(trained)]
    assert tab.names() == newest_first
    # the test daemon's constant backend is a model: every badge must say so
    assert page.locator("td[data-col=energy] .badge.estimated").count() == len(RUNS)

    cmp = _get(trained, "/v1/compare?runs=" + ",".join(r["id"] for r in _runs(trained)))["runs"]
    by_energy = [r["name"] for r in sorted(cmp, key=lambda r: r["energy_j"], reverse=True)]
    assert by_energy != newest_first  # the fixture's runs make the sort visible
    page.click("a[data-sort=energy]")
    until(lambda: "sort=energy" in page.url)
    page.wait_for_selector("a.sort.active.desc[data-sort=energy]")
    assert tab.names() == by_energy
    shown = page.eval_on_selector_all(
        "td[data-col=energy]", "tds => tds.map(t => parseFloat(t.dataset.value))"
    )
    assert shown == sorted(shown, reverse=True)
    tab.shot("runs-by-energy")
    page.click("a[data-sort=energy]")  # again: ascending
    page.wait_for_selector("a.sort.active.asc[data-sort=energy]")
    assert tab.names() == by_energy[::-1]

    page.fill("input[name=tag]", "wide")
    page.click("#filters button:has-text('Filter')")
    until(lambda: "tag=wide" in page.url and len(tab.names()) == 2)
    wide = {r["name"] for r in _runs(trained, tag="wide")}
    assert set(tab.names()) == wide == {"mlp-64-e6", "mlp-64-e4"}
    assert "sort=energy" in page.url  # the sort is kept with the filter in the shared URL
    # the URL names the view: opening it fresh shows the same rows
    page.reload()
    page.wait_for_selector("table.runs-table tbody tr")
    until(lambda: len(tab.names()) == 2)
    assert tab.names() == [n for n in by_energy[::-1] if n in wide]


@needs_browser
def test_numbers_read_on_one_ladder_of_prefixes(tab: Tab, trained: Daemon) -> None:
    """Every figure on the pages goes through H3Charts.num: plain from 0.01 to 1000, then k/M/G
    and m/µ. The m rung was missing, so an epoch table read 9.08e-3 next to 899µ; and a value
    that rounds up to the next rung (999.96) read 1.00e+3."""
    _goto(tab, trained)
    tab.page.wait_for_selector("table.runs-table tbody tr")
    cases = {
        0: "0", 2.31: "2.31", 0.0164: "0.0164", 0.00908: "9.08m", -0.00276: "-2.76m",
        0.000899: "899µ", 4.1e-5: "41µ", 27.7: "27.7", 1234: "1.23k", 999.96: "1k",
        0.0099996: "0.01", 0.00099996: "1m", 2.5e6: "2.5M", 2.5e-8: "2.50e-8",
    }  # fmt: skip
    got = tab.page.evaluate("xs => xs.map(x => H3Charts.num(x))", list(cases))
    assert dict(zip(cases, got, strict=True)) == cases
    assert tab.page.evaluate("[NaN, null, Infinity].map(x => H3Charts.num(x))") == ["–"] * 3
    # with a unit, the prefix goes with the unit: "2.23m J" read as metre-joules
    units = [
        (0.00223, "J", "2.23 mJ"), (0.000224, "s", "224 µs"), (27.7, "W", "27.7 W"),
        (1234, "J", "1.23 kJ"), (0, "J", "0 J"), (2.5e-8, "s", "2.50e-8 s"),
        (None, "J", "–"), (0.00908, "nats", "9.08m nats"),
    ]  # fmt: skip
    got = tab.page.evaluate("cs => cs.map(([v, u]) => H3Charts.qty(v, u))", units)
    assert got == [want for _v, _u, want in units]


def _with_energy(d: Daemon, rid: str, loss: list[list[float]]) -> int:
    """The loss points the loss-against-energy chart draws: those inside the daemon's energy
    series (a batch outside it has no measured energy to be placed at)."""
    energy = _get(d, f"/v1/runs/{rid}/series?metric=energy&points=500")["points"]
    return sum(energy[0][0] <= p[0] <= energy[-1][0] for p in loss)


@needs_browser
def test_run_page_draws_every_stored_point(tab: Tab, trained: Daemon) -> None:
    page = tab.page
    run = next(r for r in _runs(trained) if r["name"] == "mlp-64-e6")
    base = f"/v1/runs/{run['id']}"
    _goto(tab, trained, f"run={run['id']}")  # the demo's link form still works
    page.wait_for_selector("#chart-loss-time path.series", state="attached")
    page.wait_for_selector("#chart-power-0 path.series", state="attached")
    assert page.url.endswith(f"#/run/{run['id']}")
    loss = _get(trained, f"{base}/series?metric=loss&points=1000")["points"]
    assert len(loss) == run["n_batches"] == 6 * 14  # under 1000: the page draws them all
    # every stored batch loss, and the daemon's bucket means (agg=mean) as the mean line
    means = _get(trained, f"{base}/series?metric=loss&agg=mean&points=40")["points"]
    assert tab.points("#chart-loss-time") == [len(loss), len(means)]
    assert tab.points("#chart-loss-energy")[0] == _with_energy(trained, run["id"], loss)
    report = _get(trained, f"{base}/report")
    (dev,) = report["energy"]["by_device"]
    power = _get(trained, f"{base}/series?metric=power&device={dev['device']}&points=600")
    assert tab.points("#chart-power-0")[0] == len(power["points"]) >= 3
    epochs = report["epochs"]
    assert tab.points("#chart-eta") == _eta_points(epochs)
    assert page.locator("table.epochs tbody tr").count() == len(epochs) == 6
    # the suggested stopping point is h3client's rule, ported: both pick the same epoch
    dr = diminishing_returns(epochs)
    marked = page.locator("table.epochs tr.stop td:first-child").all_inner_texts()
    assert [m.split()[0] for m in marked] == ([str(dr["epoch"])] if dr else [])
    assert page.locator("#chart-eta line.mark").count() == (1 if dr else 0)
    # axes carry ticks and units; the provenance panel names the source
    assert page.locator("#chart-loss-energy text.tick").count() >= 6
    assert "energy used by the run (J)" in page.inner_text("#chart-loss-energy")
    assert "constant" in page.inner_text("#provenance")
    assert '"hidden": 64' in page.inner_text("#config")
    assert page.inner_text("#tags").split() == ["sweep", "wide"]
    # hover reads the value under the pointer
    box = page.locator("#chart-loss-time rect.hover").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_selector("#chart-loss-time .tip:not([hidden])")
    assert "nats" in page.inner_text("#chart-loss-time .tip")
    live = page.locator("#live")
    assert live.get_attribute("data-state") == "stopped"
    tab.shot("run")
    # the exports, downloaded from the page (the token goes in a header, never in a link)
    with page.expect_download() as dl:
        page.click("#dl-batches")
    assert dl.value.suggested_filename == f"{run['id']}.csv"
    lines = Path(dl.value.path()).read_text().splitlines()
    assert lines[0] == "seq,t,epoch,step,rank,phase,n,loss" and len(lines) == 1 + run["n_batches"]
    logged = sum(int(line.split(",")[6]) for line in lines[1:])  # per-sample losses, per batch
    with page.expect_download() as dl:
        page.click("#dl-samples")
    assert dl.value.suggested_filename == f"{run['id']}-samples.csv"
    lines = Path(dl.value.path()).read_text().splitlines()
    assert lines[0] == "seq,epoch,index,loss" and len(lines) == 1 + logged


@needs_browser
def test_compare_three_runs(tab: Tab, trained: Daemon) -> None:
    page = tab.page
    _goto(tab, trained)
    page.wait_for_selector("table.runs-table tbody tr")
    picked = [r for r in _runs(trained) if r["name"] != "mlp-16-e2"]
    for r in picked:
        page.check(f"input[type=checkbox][data-id='{r['id']}']")
    page.click("#compare")
    page.wait_for_selector("#cmp-scatter circle.pt")
    page.wait_for_selector("#cmp-loss-time path.series", state="attached")
    assert page.url.endswith("#/compare/" + ",".join(r["id"] for r in picked))
    # each run's line is the daemon's bucket means, not a rolling mean of LTTB points
    means = {
        r["id"]: _get(trained, f"/v1/runs/{r['id']}/series?metric=loss&agg=mean&points=100")
        for r in picked
    }
    series = {rid: m["points"] for rid, m in means.items()}
    assert tab.points("#cmp-loss-time") == [len(p) for p in series.values()]
    note = page.inner_text("#cmp-loss-time .chart-note")
    per_run = note.split("(", 1)[1].removesuffix(" per point)").split(", ")
    assert per_run == [f"{r['name']}: {means[r['id']]['bucket_batches']}" for r in picked]
    in_energy = [_with_energy(trained, rid, p) for rid, p in series.items()]
    assert tab.points("#cmp-loss-energy") == in_energy
    assert page.locator("#cmp-scatter circle.pt").count() == 3
    assert page.locator("#cmp-scatter path.front").count() == 1
    assert page.locator("#cmp-scatter circle.on-front").count() >= 1
    assert page.locator("table.cmp thead th a").count() == 3
    assert "%" in page.inner_text("table.cmp")  # differences against the baseline
    assert page.locator("#cmp-loss-energy .legend li").count() == 3
    tab.shot("compare")


@needs_browser
def test_running_run_updates_without_reload(browser: Any, tmp_path: Path, digits: Digits) -> None:
    d = _daemon(tmp_path / "live")
    p = H3Profiler("live-run", url=d.url, data_dir=d.data_dir, tags=["live"])
    try:
        trainer = Trainer(digits, 16)
        trainer.epochs(p, 1)
        assert p.flush()
        rid = p.run_id
        with opened(browser, d.url) as t:
            page = t.page
            _goto(t, d, f"run={rid}")
            page.wait_for_selector("#live[data-state=live]")
            page.wait_for_selector("#chart-loss-time path.series", state="attached")
            page.evaluate("window.__same_document = true")
            before = t.points("#chart-loss-time")[0]
            trainer.epochs(p, 2)
            assert p.flush()
            until(lambda: t.points("#chart-loss-time")[0] > before)
            assert page.evaluate("window.__same_document === true")  # no reload
            until(lambda: page.locator("table.epochs tbody tr").count() == 3)
            p.stop()
            page.wait_for_selector("#live[data-state=stopped]", timeout=20_000)
            asked = len(t.requests)
            time.sleep(2.5)  # more than a polling period: nothing more is fetched
            assert len(t.requests) == asked
            assert page.evaluate("window.__same_document === true")
    finally:
        p.stop()  # idempotent
        d.stop()


@needs_browser
def test_runs_list_pages(browser: Any, tmp_path: Path) -> None:
    d = _daemon(tmp_path / "many")
    try:
        with d.client() as c:
            for i in range(75):
                r = c.post("/v1/runs", json={"name": f"run-{i:03d}", "created_at": 1.7e9 + i})
                assert r.status_code == 201
        with opened(browser, d.url) as t:
            page = t.page
            _goto(t, d)
            page.wait_for_selector("table.runs-table tbody tr")
            assert t.names() == [f"run-{i:03d}" for i in range(74, 24, -1)]
            assert "page 1 of 2" in page.inner_text("#pager")
            page.click("#pager a.next")
            until(lambda: "page=2" in page.url)
            page.wait_for_selector("td[data-col=name] >> text=run-020")
            assert t.names() == [f"run-{i:03d}" for i in range(24, -1, -1)]
            page.click("a[data-sort=name]")  # a new sort starts at page 1
            page.wait_for_selector("a.sort.active.asc[data-sort=name]")
            assert t.names() == [f"run-{i:03d}" for i in range(50)]
    finally:
        d.stop()


@needs_browser
def test_runs_list_reloads_on_every_visit(browser: Any, scratch: Daemon) -> None:
    with scratch.client() as c:
        rid = c.post("/v1/runs", json={"name": "stale-check"}).json()["id"]
    _post_batches(scratch, rid, 0, 5)
    with opened(browser, scratch.url) as t:
        page = t.page
        _goto(t, scratch)
        page.wait_for_selector(f"tr[data-id='{rid}'] .status.running")
        # the run finishes and another starts while the page shows the list
        with scratch.client() as c:
            c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
            new = c.post("/v1/runs", json={"name": "brand-new-run"}).json()["id"]
        page.click(f"tr[data-id='{rid}'] td[data-col=name] a")
        page.wait_for_selector("#live[data-state=stopped]")
        page.click("header h1 a")
        page.wait_for_selector(f"tr[data-id='{new}']", timeout=10_000)
        page.wait_for_selector(f"tr[data-id='{rid}'] .status.finished", timeout=10_000)
        # on the list already, the header link reloads it as well
        with scratch.client() as c:
            third = c.post("/v1/runs", json={"name": "third-run"}).json()["id"]
        page.click("header h1 a")
        page.wait_for_selector(f"tr[data-id='{third}']", timeout=10_000)


@needs_browser
def test_run_page_of_a_one_batch_run(browser: Any, scratch: Daemon) -> None:
    """One batch has energy but no curve against energy; two epochs, no stopping rule."""
    with scratch.client() as c:
        rid = c.post("/v1/runs", json={"name": "one-batch", "n_train": 100}).json()["id"]
        time.sleep(0.5)  # the sampler's readings cover the run's window
        now = time.time()
        c.post(f"/v1/runs/{rid}/batches", json={"batches": [{"seq": 0, "t": now, "loss": 2.0}]})
        epochs = [{"epoch": e, "t": now - 0.2 + 0.2 * e, "accuracy": 0.3} for e in range(2)]
        c.post(f"/v1/runs/{rid}/epochs", json={"epochs": epochs}).raise_for_status()
        c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
    assert _get(scratch, f"/v1/runs/{rid}/report")["energy"]["energy_j"] is not None
    with opened(browser, scratch.url) as t:
        page = t.page
        _goto(t, scratch, f"run={rid}")
        page.wait_for_selector("#chart-loss-time path.series", state="attached")
        assert page.inner_text("#chart-loss-energy .empty") == (
            "too few batches to place on the energy axis"
        )
        stop = page.locator("#run-cards .card", has_text="suggested stop").inner_text()
        assert "needs η for at least 3 epochs" in stop and "has not fallen" not in stop
        assert "ΔI (bits/sample)" in page.inner_text("table.epochs thead")
        # its epochs have energy: what the η chart lacks is ΔI, which needs 2 batches
        assert page.inner_text("#chart-eta .empty").startswith("no epoch has an η: ΔI needs")
        duration = page.locator("#run-cards .card", has_text="duration").inner_text()
        assert duration.split("\n")[-1] == "1 batch"
        energies = page.eval_on_selector_all(
            "table.epochs tbody tr td:nth-child(6)", "tds => tds.map(t => t.textContent)"
        )
        assert len(energies) == 2
        assert all(re.fullmatch(r"-?[\d.]+ [kmµ]?J", e) for e in energies), energies


@needs_browser
def test_run_page_of_a_finished_run_without_batches(browser: Any, scratch: Daemon) -> None:
    """The loss chart said "no data yet" of a run that had ended: nothing more will come."""
    with scratch.client() as c:
        rid = c.post("/v1/runs", json={"name": "zero-batches"}).json()["id"]
        c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
    with opened(browser, scratch.url) as t:
        _goto(t, scratch, f"run={rid}")
        t.page.wait_for_selector("#chart-loss-time .empty")
        assert t.page.inner_text("#chart-loss-time .empty") == "no batches logged"


@needs_browser
def test_sign_in_refuses_a_wrong_token(tab: Tab, trained: Daemon) -> None:
    page = tab.page
    page.goto(f"{trained.url}/#token=wrong-token")  # a link with a stale token
    page.wait_for_selector("#login-note", timeout=10_000)
    assert "refused" in page.inner_text("#login-note")
    _dismiss(tab, "401")
    page.fill("#tok", "another-wrong-token")
    page.click("#login button")
    until(lambda: "another-wrong-token" not in page.input_value("#tok"), 10)
    page.wait_for_selector("#login-note", timeout=10_000)
    assert "refused" in page.inner_text("#login-note")
    assert page.is_hidden("#error")
    page.fill("#tok", trained.token)
    page.click("#login button")
    page.wait_for_selector("table.runs-table tbody tr", timeout=10_000)


@needs_browser
def test_live_page_polls_through_a_restart(browser: Any, tmp_path: Path) -> None:
    d = _daemon(tmp_path / "restart")
    try:
        with d.client() as c:
            rid = c.post("/v1/runs", json={"name": "live-restart"}).json()["id"]
        _post_batches(d, rid, 0, 20)
        with opened(browser, d.url) as t:
            page = t.page
            live = page.locator("#live")
            _goto(t, d, f"run={rid}")
            page.wait_for_selector("#live[data-state=live]")
            d.stop()
            until(lambda: live.get_attribute("data-state") == "retrying")
            assert "no update since" in live.inner_text()
            assert page.is_hidden("#error")
            d.start()  # same port, same store
            _post_batches(d, rid, 20, 30)
            until(lambda: t.points("#chart-loss-time")[0] == 50, 40)
            until(lambda: live.get_attribute("data-state") == "live", 10)
            # a daemon on another store: the run is gone, and polling ends
            d.stop()
            d.env["H3D_DB_URL"] = f"sqlite:///{tmp_path / 'other.db'}"
            d.start()
            until(lambda: live.get_attribute("data-state") == "gone", 40)
            assert "no longer" in live.inner_text()
            asked = len(t.requests)
            time.sleep(2.5)  # more than a polling period: nothing more is fetched
            assert len(t.requests) == asked
            # a poll cut off by the stop can end in a reset instead of a refusal
            _dismiss(
                t, "ERR_CONNECTION_REFUSED", "ERR_CONNECTION_RESET", "ERR_EMPTY_RESPONSE", "404"
            )
    finally:
        d.stop()


@needs_browser
def test_compare_drops_duplicates_before_the_cap(tab: Tab, trained: Daemon) -> None:
    a, b = (r["id"] for r in _runs(trained)[:2])
    _goto(tab, trained)
    tab.page.wait_for_selector("table.runs-table tbody tr")
    tab.page.goto(f"{trained.url}/#/compare/" + ",".join([a] * 6 + [b]))
    tab.page.wait_for_selector("#cmp-scatter .chart-title", timeout=10_000)
    assert tab.page.inner_text("#main h2") == "Compare 2 runs"
    assert tab.page.locator("p.warn").count() == 0


@needs_browser
def test_compare_names_a_run_that_is_not_in_the_store(tab: Tab, trained: Daemon) -> None:
    """One unknown (or deleted) id left the whole view on "loading…": the others are now
    compared and the missing one named, with the link without it."""
    a, b = (r["id"] for r in _runs(trained)[:2])
    _goto(tab, trained)
    tab.page.wait_for_selector("table.runs-table tbody tr")
    tab.page.goto(f"{trained.url}/#/compare/{a},deadbeef,{b}")
    tab.page.wait_for_selector("#cmp-scatter circle.pt")
    assert tab.page.locator("#cmp-scatter circle.pt").count() == 2
    assert tab.page.inner_text("#main h2") == "Compare 2 runs"
    note = tab.page.inner_text("#cmp-missing")
    assert "No run with id deadbeef" in note and "not compared" in note
    link = tab.page.get_attribute("#cmp-missing a", "href")
    assert link == f"#/compare/{a},{b}"
    assert "loading" not in tab.page.inner_text("#main")
    tab.page.goto(f"{trained.url}/#/compare/{a},deadbeef")  # one left: nothing to compare
    tab.page.wait_for_selector("#cmp-missing >> text=Still here")
    assert "Compare needs 2 to 6 runs" in tab.page.inner_text("#main")
    assert "loading" not in tab.page.inner_text("#main")
    assert tab.page.is_hidden("#error")
    _dismiss(tab, "404")


@needs_browser
def test_a_long_tag_does_not_widen_a_narrow_page(browser: Any, scratch: Daemon) -> None:
    with scratch.client() as c:
        body = {"name": "long-tag", "tags": ["x" * 64]}
        rid = c.post("/v1/runs", json=body).json()["id"]
    _post_batches(scratch, rid, 0, 5)
    with opened(browser, scratch.url) as t:
        t.page.set_viewport_size({"width": 400, "height": 800})
        _goto(t, scratch, f"run={rid}")
        t.page.wait_for_selector("#tags a.tag")
        overflow = t.page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0


@needs_browser
def test_narrow_window_and_wide_tick_labels(tab: Tab, trained: Daemon) -> None:
    page = tab.page
    page.set_viewport_size({"width": 400, "height": 800})
    overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    _goto(tab, trained)
    page.wait_for_selector("table.runs-table tbody tr")
    assert page.evaluate(overflow) <= 0  # the table scrolls in its box, not the page
    run = next(r for r in _runs(trained) if r["name"] == "mlp-64-e6")
    page.click(f"tr[data-id='{run['id']}'] td[data-col=name] a")
    page.wait_for_selector("table.prov")
    assert page.evaluate(overflow) <= 0
    tab.shot("run-narrow")
    # exponent ticks (8 characters) and a marker at the right edge, drawn at this width
    boxes = page.evaluate("""() => {
      const el = document.createElement("div");
      document.querySelector("#run").prepend(el);
      H3Charts.line(el, {title: "huge", x: {label: "time", unit: "s"}, y: {label: "loss", unit: "nats"},
        series: [{name: "a", points: [[0, 1e32], [10, 3e32]]}], marks: [{x: 9.9, label: "stop: epoch 498"}]});
      const svg = el.querySelector("svg.plot");
      const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right}; };
      const ticks = [...svg.querySelectorAll("text.tick[text-anchor=end]")].map(box);
      return {svg: box(svg), title: box(svg.querySelectorAll("text.label")[1]),
              tickLeft: Math.min(...ticks.map(b => b.left)), mark: box(svg.querySelector("text.mark-label"))};
    }""")  # fmt: skip
    assert boxes["svg"]["left"] <= boxes["title"]["left"]
    assert boxes["title"]["right"] < boxes["tickLeft"]
    assert (
        boxes["svg"]["left"]
        <= boxes["mark"]["left"]
        < boxes["mark"]["right"]
        <= boxes["svg"]["right"]
    )


def _write_html(d: Daemon, ref: str, out: Path) -> None:
    env = daemon_env(d.data_dir)
    r = subprocess.run(
        [sys.executable, "-m", "h3d", "show", ref, "--html", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout


def test_show_html_is_self_contained(trained: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    _write_html(trained, "mlp-64-e4", out)
    html = out.read_text()
    assert re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I) is None
    assert re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html, re.I) is None
    assert "H3Charts" in html and "loadRunBundle" in html  # the dashboard's own JS, inlined
    assert '<script type="application/json" id="h3d-data">' in html
    assert len(html.encode()) < 300_000


@needs_browser
def test_show_html_draws_the_run_offline(browser: Any, trained: Daemon, tmp_path: Path) -> None:
    run = next(r for r in _runs(trained) if r["name"] == "mlp-64-e4")
    out = tmp_path / "report.html"
    _write_html(trained, run["id"][:8], out)
    loss = _get(trained, f"/v1/runs/{run['id']}/series?metric=loss&points=1000")["points"]
    power = _get(trained, f"/v1/runs/{run['id']}/series?metric=power&points=600")["points"]
    with opened(browser, "file://") as t:
        t.page.goto(out.as_uri())
        t.page.wait_for_selector("#chart-loss-energy path.series", state="attached")
        assert t.points("#chart-loss-time")[0] == len(loss)
        assert t.points("#chart-loss-energy")[0] == _with_energy(trained, run["id"], loss)
        epochs = _get(trained, f"/v1/runs/{run['id']}/report")["epochs"]
        assert len(epochs) == 4
        assert t.points("#chart-eta") == _eta_points(epochs)
        assert t.points("#power-charts")[0] == len(power) >= 3
        assert "mlp-64-e4" in t.page.inner_text("#run-head")
        assert all(u.startswith("file:") for u in t.requests)
        t.shot("report")


def test_page_and_assets_fit_the_budget(trained: Daemon) -> None:
    sizes = {}
    with httpx.Client(base_url=trained.url) as c:
        page = c.get("/")
        assert page.status_code == 200
        sizes["/"] = len(page.content)
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert sorted(assets) == ["/static/app.css", "/static/app.js", "/static/charts.js"]
        for a in assets:
            r = c.get(a)
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/css" if a.endswith(".css") else "text/javascript"
            )
            sizes[a] = len(r.content)
        assert (
            "<script>" not in page.text and "<style" not in page.text and " style=" not in page.text
        )
        assert c.get("/static/nope.js").status_code == 404
        assert c.get("/static/index.html").status_code == 404
        assert c.get("/static/..%2Fapp.py").status_code == 404
    assert sum(sizes.values()) <= 300_000, sizes


def test_power_series_of_one_device(trained: Daemon) -> None:
    run = _runs(trained)[0]
    base = f"/v1/runs/{run['id']}/series"
    with trained.client() as c:
        total = c.get(base, params={"metric": "power"}).json()["points"]
        one = c.get(base, params={"metric": "power", "device": "constant:0"}).json()["points"]
        assert one == total  # the test daemon has one device
        r = c.get(base, params={"metric": "power", "device": "gpu:9"})
        assert r.status_code == 422 and "gpu:9" in r.json()["error"]["message"]
        r = c.get(base, params={"metric": "loss", "device": "constant:0"})
        assert r.status_code == 422 and "metric=power" in r.json()["error"]["message"]
        cmp = c.get("/v1/compare", params={"runs": run["id"]}).json()["runs"][0]
        assert cmp["measured"] is False and cmp["source"] == "estimated"


@needs_browser
def test_run_over_two_nodes_draws_each_nodes_device(
    browser: Any, daemon_factory: Callable[..., Daemon], pg_url: str
) -> None:
    """Both nodes have a ``constant:0``: the page drew two identical charts titled alike, each
    the two nodes' readings interleaved (20, 200, 200, 20 ... W), and looked the device's
    state up by its name alone."""
    a = daemon_factory("a", H3D_DB_URL=pg_url, H3D_NODE="node-a", H3D_POWER_BACKENDS="constant:20")
    b = daemon_factory("b", H3D_DB_URL=pg_url, H3D_NODE="node-b", H3D_POWER_BACKENDS="constant:200")
    run_id = "c" * 32
    profile_on_two_nodes(a, b, run_id)
    with opened(browser, a.url) as t:
        _goto(t, a, f"run={run_id}")
        t.page.wait_for_selector("#chart-power-1 path.series", state="attached")
        titles = [t.page.inner_text(f"#chart-power-{i} .chart-title") for i in (0, 1)]
        assert titles == [
            "Power per device: constant:0 on node-a (estimated)",
            "Power per device: constant:0 on node-b (estimated)",
        ]
        # each chart a flat line at its own node's draw (y of every point alike)
        ys = [
            {
                y
                for y in re.findall(
                    r"[ML][\d.]+,([\d.]+)",
                    t.page.get_attribute(f"#chart-power-{i} path.series", "d") or "",
                )
            }
            for i in (0, 1)
        ]
        assert all(len(y) == 1 for y in ys), ys
        ticks = t.page.eval_on_selector_all(
            "#chart-power-1 text.tick", "ts => ts.map(t => t.textContent)"
        )
        assert "200" in ticks
        # node a's daemon knows its own device's state only
        rows = t.page.eval_on_selector_all(
            "table.prov tbody tr", "trs => trs.map(r => r.lastElementChild.textContent)"
        )
        assert rows[0].strip() == "ok"
        assert rows[1].startswith("–") and "node-b" in rows[1]
