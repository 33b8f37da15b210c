"""η of a long run reads only the points it needs, and says exactly what reading them all says."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from h3d import analysis
from h3d.storage import repository as repo


def make_run(s: Session, n: int, seed: int) -> str:
    rng = random.Random(seed)
    run = repo.create_run(
        s, name="long", config={}, tags=[], pid=1, host="h", n_train=1000, now=100.0
    )
    rows, t = [], 100.0
    for seq in range(n):
        t += rng.uniform(0.001, 0.2)
        loss: float | None = 2.3 * math.exp(-seq / 400) + rng.gauss(0, 0.05)
        if rng.random() < 0.03:
            loss = None  # a non-finite loss, stored as null
        rows.append(repo.BatchRow(seq, t, loss, rng.choice([32, 64]), 0, None, None, None, None))
    repo.add_batches(s, run_id=run.id, batches=rows)
    repo.update_run(s, run_id=run.id, status="finished", name=None, tags=None, now=t + 1)
    return run.id


@pytest.mark.parametrize(("n", "window_s"), [(700, 5.0), (3000, 60.0), (3000, 1e6), (200, 5.0)])
def test_long_run_eta_equals_reading_every_point(session: Session, n: int, window_s: float) -> None:
    run = repo.get_run(session, run_id=make_run(session, n, seed=n))
    selects: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "batches" in statement:
            selects.append(statement)

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        fast = analysis.run_eta(session, run=run, window_s=window_s, interval_s=0.1)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    full = analysis.run_eta(
        session, run=run, window_s=window_s, interval_s=0.1, pts=analysis._points(session, run)
    )
    assert fast == pytest.approx(full)
    if n >= analysis._LONG_RUN:  # short queries, no LIMIT-less read of the batches: the
        # first and last points, and those before the window unless it holds the whole run
        assert len(selects) == (2 if full["window_is_whole_run"] else 3)
        assert all("LIMIT" in q.upper() for q in selects)


def test_an_ended_runs_batches_are_read_once_for_its_page(session: Session) -> None:
    """The report and the series of a finished run's page each need every batch: they share
    one read, and give what reading them again gives; a running run is read each time."""
    run = repo.get_run(session, run_id=make_run(session, 500, seed=1))
    selects: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM batches" in statement:
            selects.append(statement)

    engine = session.get_bind()
    analysis._ENDED_ROWS.clear()
    event.listen(engine, "before_cursor_execute", count)
    try:
        first = analysis.run_report(session, run=run, interval_s=0.1)
        read = len(selects)
        series = analysis.loss_series(session, run=run, points=100)
        again = analysis.run_report(session, run=run, interval_s=0.1)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert read >= 1 and len(selects) == read  # the series and the second report: no read
    assert again == first and len(series) > 3
    analysis._ENDED_ROWS.clear()
    assert analysis.run_report(session, run=run, interval_s=0.1) == first  # read afresh

    going = repo.create_run(
        session, name="g", config={}, tags=[], pid=1, host="h", n_train=10, now=100.0
    )
    for seq in range(2):  # a running run is read afresh each time, never served stale
        row = repo.BatchRow(seq, 100.5 + seq, 1.0 - seq / 10, 8, 0, None, None, None, None)
        repo.add_batches(session, run_id=going.id, batches=[row])
        assert len(analysis.step_rows(session, going)) == seq + 1
    assert all(key[1] != going.id for key in analysis._ENDED_ROWS)
