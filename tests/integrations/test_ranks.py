"""torchrun ranks, each with an H3Profiler, make one run: every batch once, every device once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from h3client import Client
from h3client._distributed import RankInfo, derived_run_id, detect, shared_run_id
from h3client.errors import H3ClientError
from h3d.storage import repository as repo
from h3d.storage.engine import make_engine, make_sessionmaker, session_scope
from tests.conftest import Daemon, free_port, torchrun

SCRIPT = Path(__file__).with_name("ddp_ranks.py")


def launch(n: int, daemon: Daemon, out: Path, *extra: str) -> list[dict[str, object]]:
    out.mkdir()
    return torchrun(
        n, SCRIPT, daemon.url, str(daemon.data_dir), out=out, env=daemon.env, launcher=extra
    )


@pytest.mark.parametrize(
    ("n", "extra"),
    [
        # single-node torchrun: a fresh rendezvous id, from which every rank derives the run id
        (2, ()),
        # static rendezvous (no job id): the ranks agree on the id over the process group
        (4, ("--master-addr=127.0.0.1", "--master-port={port}")),
    ],
)
def test_torchrun_ranks_make_one_run(
    n: int, extra: tuple[str, ...], daemon: Daemon, tmp_path: Path
) -> None:
    ranks = launch(n, daemon, tmp_path / "out", *(e.format(port=free_port()) for e in extra))
    run_ids = {r["run_id"] for r in ranks}
    assert len(run_ids) == 1, run_ids
    run_id = str(run_ids.pop())
    steps = len(ranks[0]["losses"])  # type: ignore[arg-type]
    assert steps == 2 * math.ceil(800 / n / 40)
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(run_id)
        rep = c.report(run_id)
        series = c.series(run_id, "loss", points=10_000)
    assert run["status"] == "finished" and run["world_size"] == n
    assert run["n_batches"] == n * steps and run["n_epochs"] == 2

    # every rank's batches exactly once, each with its rank and its own loss
    engine = make_engine(f"sqlite:///{daemon.data_dir / 'h3d.db'}")
    with session_scope(make_sessionmaker(engine)) as s:
        rows = repo.batch_points(s, run_id=run_id)
    engine.dispose()
    by_rank: dict[int, list[float]] = {}
    for _seq, _t, loss, _n, _epoch, _phase, rank in rows:
        assert rank is not None and loss is not None
        by_rank.setdefault(rank, []).append(loss)
    assert sorted(by_rank) == list(range(n))
    for r in ranks:
        assert by_rank[int(r["rank"])] == pytest.approx(r["losses"], rel=1e-6)  # type: ignore[call-overload]

    # the loss curve is over the global step: the mean of the ranks' k-th losses
    mean = [sum(by_rank[r][k] for r in range(n)) / n for k in range(steps)]
    assert [v for _t, v in series] == pytest.approx(mean, rel=1e-6)
    assert rep["n_steps"] == steps and rep["world_size"] == n

    # each device once: the run's energy is within the machine's, split over the ranks
    # (The ranks train for well under a second: on a loaded machine their measured CPU share,
    # sampled once a second, can round to 0 J, so only the bound and the split are asserted.)
    e = rep["energy"]
    assert 0 <= e["energy_j"] <= e["device_energy_j"] * (1 + 1e-9)
    assert e["device_energy_j"] > 0
    assert [b["rank"] for b in e["by_rank"]] == list(range(n))
    assert all(b["energy_j"] >= 0 and b["n_batches"] == steps for b in e["by_rank"])
    assert sum(b["energy_j"] for b in e["by_rank"]) == pytest.approx(e["energy_j"], rel=1e-6)
    assert [nd["ranks"] for nd in e["by_node"]] == [list(range(n))]
    assert e["by_node"][0]["energy_j"] == pytest.approx(e["energy_j"], rel=1e-6)


def test_rank_detection_from_launchers() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "j7"}
    info = detect(torchrun)
    assert info == RankInfo(3, 4, 1, "torchrun", "torchrun:j7:0")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42"}
    info = detect({**slurm, "SLURM_STEP_ID": "0"})
    assert info is not None and (info.rank, info.world_size, info.launcher) == (5, 8, "slurm")
    # the same job gives the same id on every rank; another step or name, another run
    step0 = {**slurm, "SLURM_STEP_ID": "0"}
    ids = {shared_run_id(detect({**step0, "SLURM_PROCID": str(r)}), "x") for r in range(8)}  # type: ignore[arg-type]
    assert len(ids) == 1 and len(ids.pop()) == 32
    assert derived_run_id("slurm:42:", "x") != derived_run_id("slurm:42:1", "x")
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: no ranks
    assert detect({}) is None
    assert detect({}, rank=1, world_size=2) == RankInfo(1, 2, None, "explicit", None)
    with pytest.raises(H3ClientError, match="not in a world"):
        detect({}, rank=2, world_size=2)
    with pytest.raises(H3ClientError, match="both"):
        detect({}, rank=1)
    with pytest.raises(H3ClientError, match="init_process_group"):
        shared_run_id(RankInfo(1, 2, None, "explicit", None), "x")


def test_torchrun_static_rendezvous_in_slurm_restart_is_a_new_run() -> None:
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "SLURM_JOB_ID": "777",
        "SLURM_STEP_ID": "0",
        "TORCHELASTIC_RUN_ID": "none",  # static rendezvous: no --rdzv-id
    }
    first = detect({**env, "TORCHELASTIC_RESTART_COUNT": "0"})
    again = detect({**env, "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "0"})
    restart = detect({**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert first is not None and again is not None and restart is not None
    assert shared_run_id(first, "x") == shared_run_id(again, "x")  # one attempt, one run
    assert shared_run_id(first, "x") != shared_run_id(restart, "x")  # a restart, a new run
    # plain srun (no torchrun): the key is as before
    slurm = detect(
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0"}
    )
    assert slurm is not None and slurm.job_key == "slurm:777:0"
