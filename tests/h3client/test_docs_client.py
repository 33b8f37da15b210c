"""What docs/client.md promises, against a real daemon: a run the daemon would refuse is
refused at construction, and one unreadable batch costs that batch only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from h3client import Client, H3HTTPStatusError, H3Profiler
from tests.conftest import Daemon

#: The daemon's bound on every integer it stores (h3d.api.schemas.INT_MAX).
INT_MAX = 2**53 - 1


def stored_config(daemon: Daemon, config: dict[str, Any]) -> Any:
    """The config the daemon stored for a profiled run of one batch given ``config`` (which
    the profiler leaves as given)."""
    given = copy.deepcopy(config)
    prof = H3Profiler("config", url=daemon.url, data_dir=daemon.data_dir, config=config)
    prof.log_batch(1.0)
    res = prof.stop()
    assert res["batches_posted"] == 1 and res["batches_rejected"] == 0, res
    assert prof.config == given
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        return c.get_run(str(prof.run_id))["config"]


def offline(tmp_path: Path, **kw: Any) -> H3Profiler:
    return H3Profiler(data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False, **kw)


@pytest.mark.parametrize(
    ("config", "stored"),
    [
        ({"seed": 2**63 - 1}, {"seed": str(2**63 - 1)}),  # a 64-bit seed (torch.seed())
        ({"seed": INT_MAX + 1, "lr": 0.1}, {"seed": str(INT_MAX + 1), "lr": 0.1}),
        ({"a": [{"b": -(INT_MAX + 1)}, 3]}, {"a": [{"b": str(-(INT_MAX + 1))}, 3]}),
        ({"huge": 10**300}, {"huge": str(10**300)}),
    ],
)
def test_a_config_integer_the_daemon_would_refuse_is_stored_exact_as_a_string(
    daemon: Daemon, config: dict[str, Any], stored: dict[str, Any]
) -> None:
    """The daemon refuses an integer beyond ±(2**53 - 1) (JSON readers round it): the run's
    create was refused, then every batch of it. The profiler stores it as its string."""
    with pytest.warns(UserWarning, match=r"beyond ±\(2\*\*53 - 1\).*stored as strings"):
        assert stored_config(daemon, config) == stored


def test_the_daemon_refuses_what_the_profiler_refuses_and_takes_the_rest(
    daemon: Daemon,
) -> None:
    # the bound is the daemon's: 2**53 is a 422 there (the run's create refused, then every
    # batch of it), 2**53 - 1 is stored exactly
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        with pytest.raises(H3HTTPStatusError) as refused:
            c.create_run(id="ab" * 16, name="too-big", config={"seed": INT_MAX + 1})
        assert refused.value.status_code == 422
    config = {"seed": INT_MAX, "low": -INT_MAX, "flag": True}
    assert stored_config(daemon, config) == config


def test_an_n_train_the_daemon_refuses_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train: a positive int"):
        offline(tmp_path, name="big", n_train=INT_MAX + 1)
    offline(tmp_path, name="ok", n_train=INT_MAX).stop()


def test_the_device_tag_counts_among_the_tags_the_daemon_checks(tmp_path: Path) -> None:
    # device="..." is sent as the tag device:<value>: 100 tags and a device are 101, and a
    # tag of 1-100 characters holds a device name of at most 93
    with pytest.raises(ValueError, match="tags: at most 100, not 101"):
        offline(tmp_path, name="t", tags=[f"t{i}" for i in range(100)], device="cuda:0")
    with pytest.raises(ValueError, match="tags: strings of 1 to 100 characters"):
        offline(tmp_path, name="t", device="x" * 94)
    offline(tmp_path, name="t", tags=[f"t{i}" for i in range(99)], device="x" * 93).stop()
    offline(tmp_path, name="t", tags=[f"t{i}" for i in range(100)]).stop()  # "auto": no tag


def test_a_phase_the_daemon_cannot_store_costs_that_batch_only(daemon: Daemon) -> None:
    # a phase holding a NUL or a lone surrogate: the daemon refuses the request that carries
    # it (422), and every batch in it was counted rejected
    prof = H3Profiler("bad-phase", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=5)
    for _ in range(50):
        prof.log_batch(1.0, phase="warmup")
    prof.log_batch(1.0, phase="warm\x00up")
    prof.log_batch(1.0, phase="warm\ud800")
    for _ in range(50):
        prof.log_batch(1.0, phase="thermo \U0001f525")  # not ASCII, but text: stored
    res = prof.stop()
    assert res["batches_posted"] == 100 and res["batches_rejected"] == 2, res
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert c.get_run(str(prof.run_id))["n_batches"] == 100
