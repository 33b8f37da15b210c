"""State that outlives a process: h3-optimizer 0.2.0's tracker checkpoints and methods,
numpy numbers in state dicts, a resumed AutoH3's daemon run, and runs past their plan."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import h3optim
from h3client import Client
from h3optim import AutoH3, EtaController, InformationWeightedSampler, LossTracker


def _weights_only(state: Any) -> Any:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _data(n: int = 256) -> tuple[TensorDataset, DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].argmax(1)).long()
    return TensorDataset(x, y), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _epoch(auto: AutoH3, model: nn.Module, test: DataLoader[Any]) -> None:
    crit = nn.CrossEntropyLoss()
    for data, target, idx in auto.get_loader(batch_size=64):
        auto.training_step(model, data, target, crit, idx)
    auto.evaluate_epoch(model, test)


# --- h3-optimizer 0.2.0's LossTracker checkpoints ------------------------------------------


def _state_020(losses: list[float], initialized: list[bool], smoothing: float = 0.2) -> Any:
    """A state as h3-optimizer 0.2.0's ``LossTracker.state_dict()`` makes it (``h3/sampler.py``:
    never-seen samples hold ``initial_loss``), through a weights-only load."""
    return _weights_only(
        {
            "losses": torch.tensor(losses, dtype=torch.float32),
            "initialized": torch.tensor(initialized),
            "num_samples": len(losses),
            "smoothing": smoothing,
            "initial_loss": 1.5,
        }
    )


def test_a_020_tracker_state_loads_each_initialized_loss_as_one_sighting() -> None:
    """Before: ``KeyError: 'ema'``."""
    state = _state_020([0.5, 1.5, 2.0, float("nan")], [True, False, True, True])
    t = LossTracker(4)
    t.load_state_dict(state)
    assert t.ema.tolist() == [0.5, 0.0, 2.0, 0.0]
    assert t.first.tolist() == t.last.tolist() == [0.5, 0.0, 2.0, 0.0]
    assert t.seen.tolist() == [True, False, True, False]
    assert t.counts.tolist() == [1, 0, 1, 0]
    # a NaN 0.2.0 stored counts as a non-finite loss: sighted, never with a finite loss
    assert t.nonfinite_counts.tolist() == [0, 0, 0, 1] and t.nonfinite_count == 1
    assert t.smoothing == 0.2 and t.initial_loss == 1.5
    t.update(torch.tensor([0, 1]), torch.tensor([1.5, 3.0]))
    assert t.ema.tolist() == pytest.approx([0.7, 3.0, 2.0, 0.0])
    assert t.first.tolist() == [0.5, 3.0, 2.0, 0.0]
    again = LossTracker(4)
    again.load_state_dict(_weights_only(t.state_dict()))  # and on in h3optim's own format
    assert torch.equal(again.ema, t.ema) and torch.equal(again.counts, t.counts)


def test_a_020_tracker_state_h3optim_cannot_hold_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="4 samples, tracker has 3"):
        LossTracker(3).load_state_dict(_state_020([1.0] * 4, [True] * 4))
    with pytest.raises(ValueError, match="smoothing 0.0"):  # 0.2.0 allowed an EMA that never moves
        LossTracker(2).load_state_dict(_state_020([1.0, 2.0], [True, True], smoothing=0.0))


# --- numpy numbers in state dicts -------------------------------------------------------------


@pytest.mark.parametrize("np_float", [np.float64, np.float32])
def test_numpy_numbers_leave_state_dicts_loadable_weights_only(np_float: Any) -> None:
    """Before: ``UnpicklingError: Weights only load failed`` at torch.load, in the process that
    tries to resume (numpy scalars pass every float check and were stored as they were)."""
    c = EtaController("balanced", np_float(1.0), 4, min_pairs=np.int64(2), z=np_float(2.0))
    c.control_step(unlearned=np_float(0.1), train_loss=np_float(0.9))
    c.observe(
        eta=np_float(0.3),
        accuracy=np_float(0.5),
        loss=np_float(0.7),
        energy=np_float(2.0),
        info=np_float(1.0),
    )
    c.control_step()
    c.observe_window(np_float(0.4))
    c.observe(accuracy=np_float(0.625), loss=np_float(0.5))
    loaded = _weights_only(c.state_dict())
    assert loaded["history"][0]["accuracy"] == 0.5 and loaded["best_accuracy"] == 62.5
    assert type(loaded["history"][1]["loss"]) is float
    again = EtaController("balanced", 1.0, 4)
    again.load_state_dict(loaded)
    assert again.get_report() == c.get_report()

    tracker = LossTracker(np.int64(6), smoothing=np_float(0.25))
    tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    sampler = InformationWeightedSampler(6, tracker, 0.5, 0.5, seed=np.int64(3))
    sampler.set_epoch(np.int64(2))
    state = _weights_only({"tracker": tracker.state_dict(), "sampler": sampler.state_dict()})
    assert state["tracker"]["smoothing"] == 0.25 and state["sampler"] == {
        "epoch": 2,
        "seed": 3,
        "keep_frac": 0.5,
        "uniform_mix": 0.5,
    }


# --- h3-optimizer 0.2.0's methods ---------------------------------------------------------


def test_020_loss_tracker_methods_to_reset_and_get_weights() -> None:
    """Before: AttributeError for each."""
    with pytest.warns(UserWarning, match="initial_loss=2.0 has no effect"):
        t = LossTracker(5, 0.1, 2.0)
    assert t.to("cpu") is t and t.ema.device == torch.device("cpu")
    t.update(torch.tensor([0, 1, 2]), torch.tensor([0.5, 9.0, 0.01]))
    # 0.2.0's formula: losses (initial_loss where never seen), capped at 3x their mean,
    # at least min_weight, scaled to sum to N
    losses = torch.tensor([0.5, 9.0, 0.01, 2.0, 2.0])
    expected = losses.clamp(max=3.0 * losses.mean()).clamp(min=0.1)
    expected = expected / expected.sum() * 5
    assert torch.allclose(t.get_weights(), expected)
    capped = losses.clamp(max=1.0 * losses.mean()).clamp(min=0.0)
    assert torch.allclose(t.get_weights(1.0, 0.0), capped / capped.sum() * 5)
    with pytest.raises(ValueError, match="cap_factor"):
        t.get_weights(cap_factor=0.0)
    t.update(torch.tensor([3]), torch.tensor([float("nan")]))
    t.reset()
    assert not t.seen.any() and t.nonfinite_count == 0 and not t.nonfinite_counts.any()
    assert torch.equal(t.get_weights(), torch.ones(5))
    t.update(torch.tensor([4]), torch.tensor([1.0]))
    assert t.seen.tolist() == [False, False, False, False, True]


def test_020_controller_get_status_and_evaluate_epoch_with_a_device() -> None:
    """Before: ``EtaController.get_status()`` an AttributeError and ``evaluate_epoch(model,
    loader, device)`` a TypeError."""
    c = EtaController("green", 1.0, 10)
    status = c.get_status()
    assert status["epoch"] == 0 and status["recent_eta"] is None
    assert (status["keep_frac"], status["uniform_mix"]) == (0.5, 0.2)
    for acc, eta in [(0.5, 1.0), (0.6, 2.0), (0.7, 3.0), (0.8, 5.0)]:
        c.control_step()
        c.observe(eta=eta, accuracy=acc)
    status = c.get_status()
    assert status["epoch"] == 4 and status["phase"] == "thermodynamic"
    assert status["recent_eta"] == pytest.approx(10 / 3)
    assert status["recent_accuracy"] == pytest.approx(0.7) and status["best_accuracy"] == 80.0

    train_set, test = _data()
    model = _model()
    auto = AutoH3(model.parameters(), train_set, total_epochs=3, profile=False)
    _epoch(auto, model, test)
    acc = auto.evaluate_epoch(model, test, "cpu")  # 0.2.0's third positional
    assert acc == auto.evaluate_epoch(model, test, criterion=nn.CrossEntropyLoss())


# --- runs past total_epochs ---------------------------------------------------------------


def test_an_epoch_past_total_epochs_warns_once() -> None:
    """Before: AutoH3 (whose total_epochs defaults to 10) and EtaController trained every
    epoch past it as "consolidation", without sampling and without a word."""
    train_set, test = _data()
    model = _model()
    auto = AutoH3(model.parameters(), train_set, total_epochs=2, profile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _epoch(auto, model, test)
        assert not caught
        for _ in range(2):
            _epoch(auto, model, test)
    assert [str(w.message).split(":")[0] for w in caught] == ["AutoH3"]
    assert "epoch 2 is at or past total_epochs=2" in str(caught[0].message)
    assert caught[0].filename == __file__  # where the caller asked for the loader

    c = EtaController("balanced", total_epochs=1)
    c.control_step()
    c.observe()
    with pytest.warns(UserWarning, match="EtaController: epoch 1 is at or past total_epochs=1"):
        assert c.control_step()[2] == "consolidation"
    c.observe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.control_step()  # once
        resumed = EtaController("balanced", total_epochs=1)
        resumed.load_state_dict(c.state_dict())
        resumed.control_step()  # and not again after a resume


# --- a resumed AutoH3 continues its daemon run ------------------------------------------------

_FIRST_PROCESS = """
import os, sys, torch
sys.path[:0] = [sys.argv[1]]
import test_state_compat as t
from h3optim import AutoH3
url, data_dir, out, end = sys.argv[2:6]
train_set, test = t._data()
model = t._model()
auto = AutoH3(model.parameters(), train_set, name="resumed", total_epochs=4,
              profiler_kwargs={"url": url, "data_dir": data_dir, "autostart": False})
for _ in range(2):
    t._epoch(auto, model, test)
torch.save({"model": model.state_dict(), "auto": auto.state_dict()}, out)
assert auto.profiler.flush()
if end == "killed":
    os._exit(0)  # as a job killed at its time limit: no finish(), no exit handlers
raise RuntimeError("died of an exception")  # its profiler ends the run as failed at exit
"""


def _first_process(daemon: Any, ck: Path, end: str) -> dict[str, Any]:
    """Two epochs of a profiled AutoH3 in a process that saves its state and ends as
    ``end`` says; the saved state."""
    env = {**os.environ, "PYTHONPATH": str(Path(h3optim.__file__).parents[1])}
    subprocess.run(
        [sys.executable, "-c", _FIRST_PROCESS, str(Path(__file__).parent), daemon.url]
        + [str(daemon.data_dir), str(ck), end],
        env=env,
        check=end == "killed",
        capture_output=True,
        timeout=300,
    )
    return dict(torch.load(ck, weights_only=True))


def _resumed(daemon: Any, saved: dict[str, Any]) -> tuple[AutoH3, nn.Module]:
    train_set, _ = _data()
    model = _model()
    model.load_state_dict(saved["model"])
    auto = AutoH3(
        model.parameters(),
        train_set,
        name="resumed",
        total_epochs=4,
        profiler_kwargs={"url": daemon.url, "data_dir": daemon.data_dir, "autostart": False},
    )
    auto.load_state_dict(saved["auto"], model=model, criterion=nn.CrossEntropyLoss())
    return auto, model


def test_a_resumed_autoh3_continues_its_daemon_run(daemon: Any, tmp_path: Path) -> None:
    """Before: the resumed AutoH3 opened a second daemon run, and finish() reported the
    whole run's samples against the energy of the part after the break."""
    saved = _first_process(daemon, tmp_path / "ck.pt", "killed")
    run_id = saved["auto"]["run_id"]
    assert isinstance(run_id, str)

    auto, model = _resumed(daemon, saved)
    _, test = _data()
    while auto.epoch < 4:
        _epoch(auto, model, test)
    res = auto.finish()
    assert res["run_id"] == run_id and res["batches_lost"] == res["batches_rejected"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(run_id)
        runs = c.list_runs()
    assert run["status"] == "finished" and run["n_epochs"] == 4
    assert [r["id"] for r in runs["data"] if r["name"] == "resumed"] == [run_id]


def test_a_run_its_client_ended_is_not_resumed_but_said_so(daemon: Any, tmp_path: Path) -> None:
    """A first process that died of an exception ended its run as failed, and a run its
    client ended takes no more data: the resumed part goes to a new run, with a warning,
    instead of having every batch refused."""
    saved = _first_process(daemon, tmp_path / "ck.pt", "exception")
    run_id = saved["auto"]["run_id"]
    auto, model = _resumed(daemon, saved)
    _, test = _data()
    with pytest.warns(UserWarning, match=f"saved daemon run {run_id} cannot be resumed"):
        _epoch(auto, model, test)
    _epoch(auto, model, test)
    res = auto.finish()
    assert res["run_id"] != run_id
    assert res["batches_rejected"] == res["batches_lost"] == 0 and res["batches_posted"] > 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert c.get_run(run_id)["status"] == "failed"
        assert c.get_run(res["run_id"])["status"] == "finished"
