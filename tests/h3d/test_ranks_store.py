"""A distributed run in the store: ranks join and finish, shares split by node and rank."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.orm import Session

from h3d import analysis
from h3d.errors import InvalidInput, RunFinished
from h3d.storage import migrate
from h3d.storage import repository as repo
from h3d.storage.engine import make_engine, make_sessionmaker, session_scope

RUN = "ab" * 16


def join(s: Session, rank: int, node: str, world_size: int = 3, now: float = 100.0) -> None:
    repo.create_run(
        s,
        name="ddp",
        config={},
        tags=["t"],
        pid=1000 + rank,
        host=node,
        n_train=None,
        now=now + rank,
        run_id=RUN,
        node=node,
        rank=rank,
        world_size=world_size,
    )


def test_ranks_join_once_and_the_run_ends_with_its_last_rank(session: Session) -> None:
    join(session, 1, "b", now=100.0)  # any rank may arrive first
    join(session, 0, "a", now=99.0)
    join(session, 0, "a", now=99.0)  # a replayed join changes nothing
    join(session, 2, "b", now=100.0)
    run = repo.get_run(session, run_id=RUN)
    assert run.world_size == 3 and run.created_at == 99.0  # the first rank's start
    assert [(r.rank, r.node) for r in repo.run_ranks(session, run_id=RUN)] == [
        (0, "a"),
        (1, "b"),
        (2, "b"),
    ]
    assert repo.run_tags(session, run_ids=[RUN]) == {RUN: ["t"]}
    with pytest.raises(InvalidInput, match="world_size 3"):
        join(session, 3, "c", world_size=4)
    for rank, status, t in ((0, "finished", 110.0), (2, "failed", 111.0)):
        repo.update_run(session, run_id=RUN, status=status, name=None, tags=None, now=t, rank=rank)
        assert repo.get_run(session, run_id=RUN).status == "running"
    repo.update_run(session, run_id=RUN, status="finished", name=None, tags=None, now=112.0, rank=1)
    run = repo.get_run(session, run_id=RUN)
    assert (run.status, run.finished_at) == ("failed", 112.0)  # one rank failed
    with pytest.raises(RunFinished):
        repo.update_run(
            session, run_id=RUN, status="finished", name=None, tags=None, now=113.0, rank=1
        )


def test_a_run_failed_as_a_whole_fails_its_running_ranks(session: Session) -> None:
    """The reaper (or a PATCH) ends the whole run: a rank still marked running ends with it.
    Before, `h3d show` listed a dead rank as running under a failed run."""
    join(session, 0, "a", world_size=2)
    join(session, 1, "a", world_size=2)
    repo.update_run(session, run_id=RUN, status="finished", name=None, tags=None, now=110.0, rank=0)
    repo.update_run(session, run_id=RUN, status="failed", name=None, tags=None, now=115.0)
    ranks = {r.rank: (r.status, r.finished_at) for r in repo.run_ranks(session, run_id=RUN)}
    assert ranks == {0: ("finished", 110.0), 1: ("failed", 115.0)}


def test_energy_splits_by_node_and_by_rank_and_counts_each_device_once(
    session: Session,
) -> None:
    join(session, 0, "a", now=0.0)
    join(session, 1, "b", now=0.0)
    join(session, 2, "b", now=0.0)
    for node in ("a", "b", "c"):  # node c holds a device the run never used
        dev = repo.upsert_device(
            session, name="cpu", kind="cpu", source="rapl", model="", uuid_=None, now=0.0, node=node
        )
        repo.add_power_samples(
            session,
            rows=[
                {"device_id": dev.id, "t": float(t), "power_w": 100.0, "energy_j": None}
                for t in range(11)
            ],
        )
    # node b: rank 1 holds 0.3 of the CPU, rank 2 0.1 in [0, 5); rank 2 left at 5
    shares = [
        ("a", -1, 0.0, 0.5),
        ("a", 0, 0.0, 0.5),
        ("b", -1, 0.0, 0.4),
        ("b", 1, 0.0, 0.3),
        ("b", 2, 0.0, 0.1),
        ("b", -1, 5.0, 0.3),
        ("b", 1, 5.0, 0.3),
    ]
    repo.add_run_shares(
        session,
        rows=[
            {"run_id": RUN, "node": n, "rank": r, "kind": "cpu", "t0": t0, "t1": t0 + 5, "share": v}
            for n, r, t0, v in shares
        ],
    )
    run = repo.get_run(session, run_id=RUN)
    run.finished_at = 10.0
    e = analysis.run_energy(session, run=run, interval_s=0.1)
    assert {d["node"] for d in e["by_device"]} == {"a", "b"}  # not node c
    assert e["device_energy_j"] == pytest.approx(2 * 1000.0)
    nodes = {n["node"]: n for n in e["by_node"]}
    assert nodes["a"]["energy_j"] == pytest.approx(500.0)
    assert nodes["b"]["energy_j"] == pytest.approx(0.4 * 500 + 0.3 * 500)
    ranks = {r["rank"]: r["energy_j"] for r in e["by_rank"]}
    assert ranks == pytest.approx({0: 500.0, 1: 0.3 * 500 + 0.3 * 500, 2: 0.1 * 500})
    assert sum(ranks.values()) == pytest.approx(e["energy_j"])


def test_legacy_rows_get_this_host_as_their_node(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    engine = make_engine(url)
    command.upgrade(migrate.alembic_config(url), "0003")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (name, kind, source, model, first_seen, last_seen) "
                "VALUES ('rapl:package-0', 'cpu', 'rapl', '', 0, 0)"
            )
        )
    migrate.upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as s:
        (dev,) = repo.devices(s)
        assert dev.node == socket.gethostname()
        # the daemon, on its default node, finds its old device again
        again = repo.upsert_device(
            s,
            name="rapl:package-0",
            kind="cpu",
            source="rapl",
            model="",
            uuid_=None,
            now=1.0,
            node=socket.gethostname(),
        )
        assert again.id == dev.id
    engine.dispose()
