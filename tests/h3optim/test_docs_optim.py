"""What docs/optim.md and docs/tune.md promise, where the code did otherwise.

docs/optim.md's "Moving over from h3-optimizer": 0.2.0's ``EtaController`` docstring passes
``observe`` its figures by keyword (``train_loss=``, ``energy_j=``, ``info_bits=``), and its
``AutoH3`` docstring trains over the caller's own loader of ``(data, target)``, never calling
``get_loader``; the doc says such code moves over by changing its imports.

docs/tune.md: every trial is a run of the daemon, so one must take the runs before the first
trial; one that refuses them stops ``h3-tune`` as no daemon does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from h3client import Client
from h3optim import AutoH3, EtaController
from h3optim.tune import tune
from tests.h3optim.test_tune_cli import tiny_task


def test_observe_takes_the_0_2_0_keyword_names_of_its_figures() -> None:
    controller = EtaController("balanced", 1.0, 10)
    controller.observe(eta=0.5, accuracy=80.0, train_loss=1.25, energy_j=10.0, info_bits=0.3)
    last = controller.history[-1]
    assert (last["loss"], last["energy"], last["info"]) == (1.25, 10.0, 0.3)
    assert controller.last_loss == 1.25 and controller.epoch == 1
    # the same figures by h3optim's names, or positionally, are recorded alike
    other = EtaController("balanced", 1.0, 10)
    other.observe(0.5, 80.0, 1.25, 10.0, 0.3)
    assert other.history[-1] == last
    with pytest.raises(TypeError, match="twice"):
        controller.observe(loss=1.0, train_loss=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'val_loss'"):
        controller.observe(val_loss=1.0)


def test_autoh3_over_the_callers_own_loader_streams_to_the_daemon(daemon: Any) -> None:
    """0.2.0's loop: ``training_step(model, data, target, criterion)`` over a plain loader,
    no ``get_loader``. The run was never opened: nothing streamed, and ``finish()`` had no
    daemon figures (no ``run_id``)."""
    torch.manual_seed(0)
    x = torch.randn(96, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    auto = AutoH3(
        model.parameters(),
        TensorDataset(x, y),
        "balanced",
        "docs-0.2.0-loop",
        total_epochs=2,
        profiler_kwargs={"url": daemon.url, "data_dir": daemon.data_dir},
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for _epoch in range(2):
        for data, target in loader:
            auto.training_step(model, data, target, criterion)
            steps += 1
        auto.evaluate_epoch(model, loader)
    res = auto.finish()
    assert res.get("run_id") is not None, "the run was never opened"
    assert res["batches_logged"] == steps and res["batches_lost"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(res["run_id"])
    assert run["status"] == "finished" and run["n_batches"] == steps and run["n_epochs"] == 2


def test_tune_stops_before_the_first_trial_when_the_daemon_refuses_the_token(
    daemon_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--url`` names a daemon of another data dir (or no token is at hand): every trial
    trained, its run refused (spooled, energy unknown), and the session ended with exit 0."""
    d = daemon_factory()
    other = tmp_path / "other-data"
    other.mkdir(mode=0o700)
    monkeypatch.setenv("H3D_DATA_DIR", str(other))
    for var in ("H3D_URL", "H3D_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    task = tiny_task()
    events: list[str] = []
    out = tmp_path / "out"
    with pytest.raises(ConnectionError, match=f"the h3d daemon at {d.url} refuses the runs"):
        tune(
            task,
            budget=4,
            techniques=["grad_accum"],
            segments=2,
            url=d.url,
            out=out,
            progress=lambda e, _i: events.append(e),
            count_flops=False,
        )
    assert events == [] and not out.exists()  # nothing trained, nothing written
    assert not (other / "spool").exists()  # no run spooled
    with d.client() as c:
        assert c.get("/v1/runs").json()["count"] == 0
    # the daemon's own data dir: the same call runs
    monkeypatch.setenv("H3D_DATA_DIR", str(d.data_dir))
    result = tune(
        task, budget=4, techniques=[], segments=2, url=d.url, progress=None, count_flops=False
    )
    assert [t.technique for t in result.trials] == ["baseline"]
    assert result.trials[0].outcome is not None and result.trials[0].outcome.energy_j
