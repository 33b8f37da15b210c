"""The information-optimal network: reversibility, memory-saving backward, loss, schedule,
absorption estimate, and training on real data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from h3optim import (
    AdiabaticProcessingUnit,
    InformationOptimalNetwork,
    LosslessIntegrationLayer,
    ReversibleStack,
    TemperatureSchedule,
    ThrottledInformationChannel,
    compute_absorption_efficiency,
    information_optimal_loss,
)
from h3optim.models import saved_activation_bytes


def test_units_are_reversible_to_float_tolerance() -> None:
    torch.manual_seed(0)
    unit = AdiabaticProcessingUnit(16, temperature=0.7).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    assert torch.allclose(unit.inverse(unit(x)), x, atol=1e-12)
    stack = ReversibleStack([AdiabaticProcessingUnit(16) for _ in range(6)])
    xf = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.allclose(stack.inverse(stack(xf)), xf, atol=1e-4)


def test_memory_saving_backward_gives_autograds_gradients() -> None:
    torch.manual_seed(0)
    units = [AdiabaticProcessingUnit(8, temperature=1.3).double() for _ in range(3)]
    saving, plain = (
        ReversibleStack(units, memory_saving=True),
        ReversibleStack(units, memory_saving=False),
    )
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for stack in (saving, plain):
        stack.zero_grad()
        x.grad = None
        (stack(x) ** 3).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in stack.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    # and gradcheck on the custom function itself
    y = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: saving(t), (y,))


def test_activation_memory_does_not_grow_with_depth() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)

    def stack(depth: int, saving: bool) -> ReversibleStack:
        return ReversibleStack(
            [AdiabaticProcessingUnit(32) for _ in range(depth)], memory_saving=saving
        )

    s2, s16 = saved_activation_bytes(stack(2, True), x), saved_activation_bytes(stack(16, True), x)
    p2, p16 = (
        saved_activation_bytes(stack(2, False), x),
        saved_activation_bytes(stack(16, False), x),
    )
    assert s16 == s2  # constant in depth
    assert p16 > 4 * p2  # plain autograd grows with depth (8× the units)
    assert s16 < p2


def test_penalty_is_differentiable_and_no_graph_survives_the_step() -> None:
    torch.manual_seed(0)
    model = InformationOptimalNetwork(10, 16, 3, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        loss = information_optimal_loss(model(x), y, model, beta=0.5)
        loss.backward()
        opt.step()
        assert (
            model.channel.gate.weight.grad is not None
            and model.channel.gate.weight.grad.abs().sum() > 0
        )
        held = [
            v
            for v in vars(model.channel).values()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None
        ]
        held += [
            v
            for v in vars(model.stack).values()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None
        ]
        assert held == []  # the penalty consumed them: no graph kept across steps
    m = model.get_efficiency_metrics()
    assert len(m["unit_energies"]) == 2 and 0 < m["preservation"] < 1
    with pytest.raises(RuntimeError):
        model.penalty()


def test_temperature_schedule_follows_its_formula() -> None:
    model = InformationOptimalNetwork(4, 8, 2, depth=2)
    sched = TemperatureSchedule(model, t0=2.0, alpha=0.5, beta=0.7)
    assert model.temperature == 2.0
    for t in range(1, 6):
        assert sched.step() == pytest.approx(2.0 * (1 + 0.5 * t) ** -0.7)
        assert all(
            u.temperature == pytest.approx(2.0 * (1 + 0.5 * t) ** -0.7)
            for u in model.stack.unit_list()
        )
    other = TemperatureSchedule(InformationOptimalNetwork(4, 8, 2), t0=1.0)
    other.load_state_dict(sched.state_dict())
    assert other.model.temperature == pytest.approx(model.temperature)


def test_integration_and_channel_shapes() -> None:
    layer = LosslessIntegrationLayer(8, num_heads=2)
    assert layer(torch.randn(4, 8)).shape == (4, 8)
    assert layer(torch.randn(4, 5, 8)).shape == (4, 5, 8)
    ch = ThrottledInformationChannel(10, 6, bottleneck_ratio=0.3)
    assert ch(torch.randn(2, 10)).shape == (2, 6) and 0 < float(ch.flow.detach()) < 1


class Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().reshape(-1)]


def test_absorption_is_h_y_for_a_perfect_classifier_and_zero_for_the_prior() -> None:
    y = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    idx = torch.arange(len(y)).float()
    loader = DataLoader(TensorDataset(idx, y), batch_size=3)
    p = torch.bincount(y).float() / len(y)
    h_y = float(-(p * p.log2()).sum())
    perfect = Fixed(nn.functional.one_hot(y, 3).float() * 50.0)
    res = compute_absorption_efficiency(perfect, loader, energy_j=2.0, energy_source="estimated")
    assert res["h_y_bits"] == pytest.approx(h_y) and res["bits_per_sample"] == pytest.approx(
        h_y, abs=1e-6
    )
    assert res["bits_per_joule"] == pytest.approx(h_y * len(y) / 2.0, rel=1e-6)
    prior = Fixed(p.log().expand(len(y), 3))
    assert compute_absorption_efficiency(prior, loader)["bits_per_sample"] == pytest.approx(
        0.0, abs=1e-6
    )

    class Prof:
        def energy_j(self) -> float:
            return 4.0

    assert compute_absorption_efficiency(perfect, loader, profiler=Prof())["energy_j"] == 4.0


def test_the_network_trains_on_real_digits() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    xs, ys = load_digits(return_X_y=True)
    xs, ys = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    model = InformationOptimalNetwork(64, 32, 10, depth=3)
    sched = TemperatureSchedule(model, t0=1.0, alpha=0.05, beta=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            information_optimal_loss(model(xs[b]), ys[b], model, beta=0.01).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        acc = float((model(xs[1500:]).argmax(1) == ys[1500:]).float().mean())
    assert acc > 0.9
    res = compute_absorption_efficiency(
        model, DataLoader(TensorDataset(xs[1500:], ys[1500:]), batch_size=128)
    )
    assert 0 < res["bits_per_sample"] <= res["h_y_bits"] + 1e-9 and math.isfinite(res["total_bits"])


def test_memory_saving_backward_with_frozen_units_gives_autograds_gradients() -> None:
    """Fine-tuning with a unit frozen whole and another in part: the reversible backward
    asked autograd for every parameter's gradient, frozen ones included, and raised
    ("One of the differentiated Tensors does not require grad"). It now gives the trainable
    parameters autograd's gradients and leaves the frozen ones without any."""
    torch.manual_seed(0)
    units = [AdiabaticProcessingUnit(8, temperature=1.3).double() for _ in range(3)]
    units[1].requires_grad_(False)
    units[2].f.requires_grad_(False)
    saving, plain = (
        ReversibleStack(units, memory_saving=True),
        ReversibleStack(units, memory_saving=False),
    )
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for stack in (saving, plain):
        stack.zero_grad(set_to_none=True)
        x.grad = None
        (stack(x) ** 3).sum().backward()
        assert all(p.grad is None for p in stack.parameters() if not p.requires_grad)
        trained = [p.grad for p in stack.parameters() if p.requires_grad]
        assert all(g is not None for g in trained)
        grads.append([x.grad, *trained])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_absorption_leaves_a_frozen_batch_norm_in_eval_mode() -> None:
    """``model.train(was_training)`` after the measurement put every module back in train
    mode: a batch-norm the caller froze in eval mode went on updating its statistics."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # frozen statistics, as when fine-tuning
    x = torch.randn(32, 4)
    loader = [(x, (x[:, 0] > 0).long())]
    compute_absorption_efficiency(model, loader)
    assert model.training and model[0].training and not model[1].training
