"""DELETE /v1/runs/{id} and ``h3d delete``: an ended run and everything stored of it go, on
SQLite and PostgreSQL (real daemons, real HTTP); a running run, an unknown one and the
sampler's share rows of a run deleted meanwhile."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from h3client import Client, H3HTTPStatusError, H3RunNotFound
from h3d.storage import repository as repo
from h3d.storage.models import Batch, Epoch, Run, RunShare, RunTag, SampleLosses
from tests.conftest import REPO, Daemon
from tests.h3d import test_dashboard as _dash
from tests.test_run_refs import _cmd

browser = _dash.browser  # the same Chromium fixture

PER_RUN = (Batch, Epoch, RunTag, SampleLosses, RunShare)


def _finished_run(c: httpx.Client, name: str) -> str:
    """A run with batches, per-sample losses, an epoch and a tag, finished."""
    rid = c.post("/v1/runs", json={"name": name, "tags": ["keep-or-not"]}).json()["id"]
    now = time.time()
    batches = [
        {
            "seq": i,
            "t": now + i * 1e-3,
            "loss": 1.0 - 0.01 * i,
            "losses": [0.5, 1.5],
            "indices": [2 * i, 2 * i + 1],
        }
        for i in range(20)
    ]
    c.post(f"/v1/runs/{rid}/batches", json={"batches": batches}).raise_for_status()
    c.post(
        f"/v1/runs/{rid}/epochs", json={"epochs": [{"epoch": 0, "t": now + 0.05, "accuracy": 0.5}]}
    ).raise_for_status()
    time.sleep(0.3)  # a share row or two from the sampler while it runs
    c.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()
    return str(rid)


def _rows(url: str, run_id: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            out = {"runs": s.scalar(select(func.count()).where(Run.id == run_id)) or 0}
            for table in PER_RUN:
                q = select(func.count()).select_from(table).where(table.run_id == run_id)
                out[table.__tablename__] = s.scalar(q) or 0
            return out
    finally:
        engine.dispose()


def test_delete_takes_an_ended_run_and_all_of_it_and_nothing_else(
    daemon_factory: Callable[..., Daemon], store_url: str
) -> None:
    d = daemon_factory("del", H3D_DB_URL=store_url)
    with d.client() as c:
        gone, kept = _finished_run(c, "gone"), _finished_run(c, "kept")
        before = _rows(store_url, gone)
        assert before["runs"] == 1 and before["batches"] == 20 and before["sample_losses"] == 20
        assert before["epochs"] == 1 and before["run_tags"] == 1
        r = c.delete(f"/v1/runs/{gone}")
        assert r.status_code == 204 and r.content == b""
        assert c.get(f"/v1/runs/{gone}").json()["error"]["code"] == "run_not_found"
        assert c.delete(f"/v1/runs/{gone}").status_code == 404  # once
        assert [x["id"] for x in c.get("/v1/runs").json()["data"]] == [kept]
        assert c.get(f"/v1/runs/{kept}/report").status_code == 200
    assert set(_rows(store_url, gone).values()) == {0}
    assert _rows(store_url, kept)["batches"] == 20


def test_a_running_run_is_not_deleted(daemon: Daemon) -> None:
    with daemon.client() as c:
        rid = c.post("/v1/runs", json={"name": "live"}).json()["id"]
        r = c.delete(f"/v1/runs/{rid}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "run_running"
        assert c.get(f"/v1/runs/{rid}").json()["status"] == "running"
        assert c.delete("/v1/runs/" + "ab" * 16).json()["error"]["code"] == "run_not_found"


def test_the_sdk_client_deletes_as_the_api_does(daemon: Daemon) -> None:
    with daemon.client() as c:
        rid = _finished_run(c, "sdk")
        live = c.post("/v1/runs", json={"name": "live"}).json()["id"]
    with Client(daemon.url, data_dir=daemon.data_dir) as sdk:
        with pytest.raises(H3HTTPStatusError) as running:
            sdk.delete_run(live)
        assert running.value.status_code == 409
        sdk.delete_run(rid)
        with pytest.raises(H3RunNotFound):
            sdk.get_run(rid)
        with pytest.raises(H3RunNotFound):
            sdk.delete_run(rid)


def test_share_rows_of_a_run_deleted_meanwhile_do_not_fail_the_write(session: Session) -> None:
    """The sampler's pending share rows of a run deleted before they were written: their
    foreign key failed the whole write (power readings too), again on every retry."""
    run = repo.create_run(
        session, name="r", config={}, tags=[], pid=None, host=None, n_train=None, now=1.0
    )
    repo.update_run(session, run_id=run.id, status="finished", name=None, tags=None, now=2.0)
    row = {"node": "n", "rank": -1, "kind": "cpu", "t0": 1.0, "t1": 2.0, "share": 0.5}
    repo.delete_run(session, run_id=run.id)
    repo.add_run_shares(session, rows=[{**row, "run_id": run.id}])
    session.flush()  # no IntegrityError
    assert session.scalar(select(func.count()).select_from(RunShare)) == 0


def _h3d(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return _cmd(daemon, "-m", "h3d", *args)


def test_h3d_delete_asks_unless_yes_and_resolves_names(daemon: Daemon) -> None:
    with daemon.client() as c:
        a, b = _finished_run(c, "exp-a"), _finished_run(c, "exp-b")
    refused = _h3d(daemon, "delete", "exp-a")  # no terminal to confirm on: nothing deleted
    assert refused.returncode == 2, refused.stderr
    assert "--yes" in refused.stderr
    done = _h3d(daemon, "delete", "exp-a", b[:8], "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"deleted {a} (exp-a)", f"deleted {b} (exp-b)"]
    with daemon.client() as c:
        assert c.get("/v1/runs").json()["count"] == 0
    missing = _h3d(daemon, "delete", "exp-a", "--yes")
    assert missing.returncode == 1 and "no run" in missing.stderr, missing.stderr
    with daemon.client() as c:
        ended = _finished_run(c, "ended")
        live = c.post("/v1/runs", json={"name": "live"}).json()["id"]
    mixed = _h3d(daemon, "delete", "ended", "live", "--yes")  # none deleted, not the first
    assert mixed.returncode == 1, mixed.stderr
    assert f"still running, so nothing was deleted: {live} (live)" in mixed.stderr
    with daemon.client() as c:
        assert c.get(f"/v1/runs/{ended}").status_code == 200


@pytest.mark.parametrize("answer", ["y\n", "n\n"])
def test_h3d_delete_on_a_terminal_asks_first(daemon: Daemon, answer: str) -> None:
    with daemon.client() as c:
        rid = _finished_run(c, "asked")
    leader, follower = pty.openpty()  # a terminal on stdin, as a person has
    proc = subprocess.Popen(
        [sys.executable, "-m", "h3d", "delete", rid, "--data-dir", str(daemon.data_dir)],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    os.close(follower)
    os.write(leader, answer.encode())
    out, err = proc.communicate(timeout=60)
    os.close(leader)
    with daemon.client() as c:
        left = c.get("/v1/runs").json()["count"]
    if answer.startswith("y"):
        assert proc.returncode == 0 and left == 0, (out, err)
    else:
        assert proc.returncode == 1 and left == 1 and "nothing deleted" in err, (out, err)


@_dash.needs_browser
def test_the_run_page_deletes_an_ended_run_once_confirmed(browser: Any, daemon: Daemon) -> None:
    with daemon.client() as c:
        rid = _finished_run(c, "to-delete")
        live = c.post("/v1/runs", json={"name": "live"}).json()["id"]
    with _dash.opened(browser, daemon.url) as t:
        _dash._goto(t, daemon, f"run={live}")
        t.page.wait_for_selector("#dl-batches")
        assert t.page.locator("#del-run").count() == 0  # a running run has no button
        _dash._goto(t, daemon, f"run={rid}")
        t.page.wait_for_selector("#del-run")
        asked: list[str] = []

        def answer(dialog: Any, accept: bool) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        t.page.once("dialog", lambda dg: answer(dg, False))
        t.page.click("#del-run")
        _dash.until(lambda: len(asked) == 1)
        with daemon.client() as c:
            assert c.get(f"/v1/runs/{rid}").status_code == 200  # dismissed: kept
        t.page.once("dialog", lambda dg: answer(dg, True))
        t.page.click("#del-run")
        t.page.wait_for_selector("table.runs-table tbody tr")
        assert t.page.url.endswith("#/runs")
        assert t.names() == ["live"]
        assert "to-delete" in asked[0] and "cannot be undone" in asked[0]
    with daemon.client() as c:
        assert c.get(f"/v1/runs/{rid}").status_code == 404
