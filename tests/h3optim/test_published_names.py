"""The names of the published ``h3-optimizer`` 0.2.0, called as its README calls them.

DESIGN.md §6: its users "keep those names and signatures, so their code moves over by
changing imports"; docs/optim.md lists what is kept and what differs. The lists below are
0.2.0's ``h3/__init__.py`` ``__all__``.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import h3optim
from h3optim import (
    CIFAR10Safe,
    EdgeDevice,
    EtaController,
    H3Optimizer,
    H3Setup,
    IndexedDataset,
    InformationWeightedSampler,
    LossTracker,
    MNISTFast,
    OperatingMode,
    auto_h3,
    create_controlled_h3,
    h3_cifar_safe,
    h3_edge,
    h3_mnist_fast,
)

#: 0.2.0's ``__all__``, by where each name is now.
IN_H3OPTIM = [
    "AutoH3",
    "CIFAR10Safe",
    "EdgeDevice",
    "EtaController",
    "H3Optimizer",
    "IndexedDataset",
    "InformationWeightedSampler",
    "LossTracker",
    "MNISTFast",
    "OperatingMode",
    "auto_h3",
    "create_controlled_h3",
    "h3_cifar_safe",
    "h3_edge",
    "h3_mnist_fast",
]
IN_H3CLIENT = ["EnergyTracker", "H3Profiler", "ThermoAuditLogger", "explain_thermo_log"]
NOT_KEPT = ["CoherenceTarget", "compare_runs", "create_baseline_logger", "green_score"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "optim.md"


def train_epoch(model: nn.Module, loader: Any, loss_tracker: Any, optimizer: Any) -> None:
    """The published README's epoch: per-sample losses into the tracker, their mean stepped."""
    for x, y, idx in loader:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        loss_tracker.update(idx, losses.detach())
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()


def test_every_published_name_is_kept_or_documented_as_not_kept() -> None:
    assert len(IN_H3OPTIM + IN_H3CLIENT + NOT_KEPT) == 23  # 0.2.0's __all__
    for name in IN_H3OPTIM:
        assert name in h3optim.__all__ and hasattr(h3optim, name), name
    h3client = importlib.import_module("h3client")
    for name in IN_H3CLIENT:
        assert hasattr(h3client, name), name
    docs = DOCS.read_text(encoding="utf-8")
    for name in IN_H3CLIENT + NOT_KEPT:
        assert f"`{name}`" in docs, f"docs/optim.md does not say where {name} went"


def data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_presets_take_lr_positionally_and_unpack_as_in_0_2_0() -> None:
    model = nn.Linear(4, 2)
    optimizer, loss_tracker, indexed_dataset = h3_mnist_fast(model.parameters(), data())
    assert isinstance(optimizer, H3Optimizer) and isinstance(loss_tracker, LossTracker)
    assert isinstance(indexed_dataset, IndexedDataset)
    for factory, cls in ((h3_mnist_fast, MNISTFast), (h3_cifar_safe, CIFAR10Safe)):
        setup = factory(model.parameters(), data(), 1e-2)  # 0.2.0: lr third, positional
        assert isinstance(setup, cls) and isinstance(setup, H3Setup)
        assert setup.optimizer.param_groups[0]["lr"] == 1e-2
    assert h3_edge(model.parameters(), data(), lr=3e-3).optimizer.param_groups[0]["lr"] == 3e-3
    assert h3_cifar_safe(model.parameters(), data()).optimizer.param_groups[0]["weight_decay"] > 0


@pytest.mark.parametrize("cls", [MNISTFast, CIFAR10Safe, EdgeDevice])
def test_preset_classes_as_the_0_2_0_readme_uses_them(cls: type[H3Setup]) -> None:
    model = nn.Linear(4, 2)
    preset = cls(model.parameters(), data(), lr=1e-3)
    optimizer, loss_tracker, indexed_dataset = preset.get_components()
    assert preset.name != "custom" and optimizer.param_groups[0]["lr"] == 1e-3
    phases = []
    for epoch in range(10):
        phase, sampler = preset.get_sampler(epoch, 10)
        phases.append(phase)
        train_epoch(model, DataLoader(indexed_dataset, sampler=sampler, batch_size=8),
                    loss_tracker, optimizer)  # fmt: skip
    assert phases[0] == "warmup" and "thermodynamic" in phases and phases[-1] == "consolidation"


def test_create_controlled_h3_takes_the_0_2_0_positional_order() -> None:
    """0.2.0: ``(params, dataset, mode, accuracy_tolerance, lr, total_epochs)``. Before,
    the fifth positional was ``total_epochs``: a 0.2.0 ``lr`` of 1e-2 became 0.01 epochs,
    and the optimizer ran at the default lr."""
    model = nn.Linear(4, 2)
    opt, ctrl, tracker, ds = create_controlled_h3(model.parameters(), data(), "balanced", 1.0, 1e-2)
    assert opt.param_groups[0]["lr"] == 1e-2 and ctrl.schedule.total_epochs == 10
    opt, ctrl, _, _ = create_controlled_h3(model.parameters(), data(), "green", 2.0, 1e-2, 20)
    assert (opt.param_groups[0]["lr"], ctrl.schedule.total_epochs) == (1e-2, 20)
    assert (ctrl.mode, ctrl.accuracy_tolerance) == ("green", 2.0)
    # the README's keyword call, and its loop
    optimizer, controller, loss_tracker, indexed_dataset = create_controlled_h3(
        model.parameters(), data(), mode="balanced", accuracy_tolerance=1.0, total_epochs=20
    )
    assert controller.schedule.total_epochs == 20
    for epoch in range(20):
        keep_frac, uniform_mix, phase = controller.control_step()
        sampler = InformationWeightedSampler(
            indexed_dataset, loss_tracker, keep_frac=keep_frac, uniform_mix=uniform_mix
        )
        train_epoch(model, DataLoader(indexed_dataset, sampler=sampler, batch_size=16),
                    loss_tracker, optimizer)  # fmt: skip
        eta, accuracy, loss, energy, info = 1.0 / (epoch + 1), 50.0 + epoch, 1.0, 10.0, 0.1
        controller.observe(eta, accuracy, loss, energy, info)  # 0.2.0: accuracy in percent
    assert controller.best_accuracy == 69.0 and "EtaController" in controller.get_report()


def test_operating_mode_is_the_mode_string_and_the_0_2_0_readme_calls_work() -> None:
    assert [m.value for m in OperatingMode] == ["safe", "balanced", "green", "extreme"]
    assert OperatingMode("green") is OperatingMode.GREEN and OperatingMode.GREEN == "green"
    c = EtaController(OperatingMode.EXTREME, total_epochs=10)
    assert c.mode == "extreme" and type(c.mode) is str and "mode=extreme" in c.get_report()
    with pytest.raises(ValueError):
        OperatingMode("turbo")
    model = nn.Linear(4, 2)
    dataset = IndexedDataset(data())
    loss_tracker = LossTracker(num_samples=len(dataset))
    optimizer = H3Optimizer(model.parameters(), lr=1e-3)
    assert loss_tracker.num_samples == 40 and optimizer.param_groups[0]["lr"] == 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        LossTracker(40, 0.1, 1.0)  # 0.2.0's third positional, initial_loss


def test_auto_h3_is_autoh3() -> None:
    model = nn.Linear(4, 2)
    auto = auto_h3(model.parameters(), data(), mode="green", total_epochs=5, profile=False)
    assert isinstance(auto, h3optim.AutoH3) and auto.controller.mode == "green"
    assert auto.controller.schedule.total_epochs == 5


def test_autoh3_takes_020s_positional_lr_and_reads_its_accuracies_as_fractions() -> None:
    # 0.2.0: AutoH3(model_params, train_dataset, mode, name, lr, ...)
    model = nn.Linear(4, 2)
    auto = h3optim.AutoH3(model.parameters(), data(), "balanced", "run", 3e-3, profile=False)
    assert auto.optimizer.param_groups[0]["lr"] == 3e-3
    # evaluate_epoch reports fractions: a chance-level 0.01 must never turn into 100 %
    assert auto.controller.accuracy_unit == "fraction"


def test_autoh3_as_0_2_0_calls_it_without_indices_and_with_the_default_batch() -> None:
    """0.2.0: ``get_loader(batch_size=64)`` and ``training_step(..., indices=None)`` (a loader
    of ``(data, target)``: the plain mean loss, nothing tracked). Both raised a TypeError."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ds = data(400)
    auto = h3optim.AutoH3(model.parameters(), ds, "balanced", profile=False, total_epochs=3)
    assert [len(i) for _x, _y, i in auto.get_loader()][0] == 64  # fetched a batch at once
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]
    before = [p.detach().clone() for p in model.parameters()]
    crit = nn.CrossEntropyLoss()
    want = nn.functional.cross_entropy(model(x), y).item()
    loss = auto.training_step(model, x, y, crit)
    assert loss.item() == pytest.approx(want)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not auto.loss_tracker.seen.any()  # nothing tracked: no indices to track it by
    assert auto.samples_backpropagated == 16


def test_loss_tracker_losses_and_initialized_read_as_in_0_2_0() -> None:
    """0.2.0's attributes: the EMA, ``initial_loss`` where never seen; which were seen."""
    with pytest.warns(UserWarning, match="initial_loss"):
        tracker = LossTracker(5, 0.5, 2.0)
    tracker.update(torch.tensor([1, 3]), torch.tensor([0.4, 0.8]))
    tracker.update(torch.tensor([1]), torch.tensor([0.2]))
    assert tracker.losses.tolist() == pytest.approx([2.0, 0.3, 2.0, 0.8, 2.0])
    assert tracker.initialized.tolist() == [False, True, False, True, False]
    tracker.losses[0] = 9.0  # a copy, as documented: the tracker is unchanged
    assert tracker.losses[0].item() == 2.0


@pytest.mark.parametrize("compensate", [True, False])
def test_a_presets_sampled_epochs_take_steps_scaled_to_a_full_epochs_distance(
    compensate: bool,
) -> None:
    """A thermodynamic epoch keeps a share of the data, and so takes that share of the
    steps: each is scaled by all the data over the share (at most 2), as AutoH3's are,
    through the optimizer's ``step_scale``; ``lr`` stays the user's (a scheduler's). With
    ``lr_compensation=False``, every step at ``lr``, as h3-optimizer's presets trained."""
    model = nn.Linear(4, 2)
    preset = h3_edge(model.parameters(), data(), lr=1e-3, lr_compensation=compensate)
    n = len(preset.indexed_dataset)
    seen = []
    for epoch in range(10):
        phase, loader = preset.get_loader(epoch, 10, batch_size=8)
        scales = {g["step_scale"] for g in preset.optimizer.param_groups}
        assert scales == {preset.lr_factor}
        assert preset.optimizer.param_groups[0]["lr"] == 1e-3
        kept = sum(len(i) for _x, _y, i in loader)
        if phase != "thermodynamic" or not compensate:
            assert preset.lr_factor == 1.0
        else:
            assert kept < n and preset.lr_factor == pytest.approx(min(2.0, n / kept))
        seen.append((phase, preset.lr_factor))
    assert any(p == "thermodynamic" for p, _ in seen)
    assert any(f > 1.0 for _, f in seen) is compensate
