"""H3Optimizer conformance, parametrised like PyTorch's own optimizer tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from h3optim import H3Optimizer

CONFIGS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 1e-2},
    {"lr": 1e-2, "lipschitz_update_interval": 3, "lipschitz_safety": 0.5},
]


def quadratic(seed: int = 0) -> tuple[nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(20, generator=g)), torch.linspace(0.5, 4.0, 20)


@pytest.mark.parametrize("kw", CONFIGS)
def test_converges_on_a_quadratic(kw: dict) -> None:
    x, a = quadratic()
    opt = H3Optimizer([x], **kw)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (a * x * x).sum()
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(400):
        opt.step(closure)
    assert float(closure().detach()) < 1e-3 * first


@pytest.mark.parametrize("kw", CONFIGS)
def test_state_dict_round_trip_gives_an_identical_next_step(kw: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = H3Optimizer(model.parameters(), **kw)

    def closure_for(m: nn.Module, o: torch.optim.Optimizer):
        def closure() -> torch.Tensor:
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss

        return closure

    for _ in range(7):
        opt.step(closure_for(model, opt))
    clone = copy.deepcopy(model)
    opt2 = H3Optimizer(clone.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch's own test does
    for _ in range(5):  # crosses a curvature update
        opt.step(closure_for(model, opt))
        opt2.step(closure_for(clone, opt2))
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_works_without_closure_and_with_two_param_groups() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    opt = H3Optimizer(
        [{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-3, "lr_max": 1e-3}],
        lr=1e-2,
    )
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    start = ((b(a(x)) - y) ** 2).mean().item()
    for _ in range(50):
        opt.zero_grad()
        loss = ((b(a(x)) - y) ** 2).mean()
        loss.backward()
        assert opt.step() is None
    assert loss.item() < start
    assert opt.param_groups[1]["lr"] == 1e-3  # no closure: the step stays as set


def test_old_state_dict_passes_setstate() -> None:
    x, _ = quadratic()
    opt = H3Optimizer([x])
    state = opt.state_dict()
    for g in state["param_groups"]:
        for key in ("lr_min", "max_growth", "lipschitz_smoothing"):
            g.pop(key)
    opt2 = H3Optimizer([x])
    opt2.load_state_dict(state)
    opt2.__setstate__(opt2.__getstate__())
    assert opt2.param_groups[0]["max_growth"] == 1.5 and "lr_min" in opt2.param_groups[0]


def test_curvature_estimate_is_exact_on_a_quadratic_in_adams_metric() -> None:
    # f = ½ L ‖x‖²: Δg = L Δx, so in a metric D = d·I the estimate must be exactly L / d
    from h3optim._functional import lipschitz_estimate

    curvature, d = 4.0, 0.25
    x0, x1 = torch.randn(10), torch.randn(10)
    lhat = lipschitz_estimate(
        [curvature * x1], [curvature * x0], [x1], [x0], [torch.full((10,), d)]
    )
    assert float(lhat) == pytest.approx(curvature / d, rel=1e-6)


def test_adaptive_step_settles_at_gamma_over_lhat() -> None:
    curvature, gamma = 4.0, 0.5
    x = nn.Parameter(torch.linspace(1.0, 3.0, 10))
    opt = H3Optimizer(
        [x],
        lr=1e-3,
        lr_max=100.0,
        lipschitz_safety=gamma,
        lipschitz_update_interval=2,
        max_growth=1e9,
        lipschitz_smoothing=1.0,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * curvature * (x * x).sum()
        loss.backward()
        return loss

    for _ in range(40):
        opt.step(closure)
    assert len(opt.lipschitz_history) >= 10
    for lr, lhat in zip(opt.lr_history, opt.lipschitz_history, strict=True):
        assert lr == pytest.approx(max(1e-5, min(100.0, gamma / lhat)), rel=1e-9)
    assert float(closure().detach()) < 0.5 * curvature * float(
        (torch.linspace(1.0, 3.0, 10) ** 2).sum()
    )


def test_nonfinite_gradients_skip_the_step_without_poisoning_state() -> None:
    x = nn.Parameter(torch.ones(3))
    opt = H3Optimizer([x], lr=0.1)
    (x * 2).sum().backward()
    opt.step()
    snapshot = (
        x.detach().clone(),
        opt.state[x]["exp_avg"].clone(),
        opt.state[x]["exp_avg_sq"].clone(),
    )
    opt.zero_grad()
    x.grad = torch.tensor([1.0, float("nan"), 2.0])
    opt.step()
    assert torch.equal(x.detach(), snapshot[0])
    assert torch.equal(opt.state[x]["exp_avg"], snapshot[1]) and torch.equal(
        opt.state[x]["exp_avg_sq"], snapshot[2]
    )
    assert opt.skipped_steps == 1
    opt.zero_grad()
    (x * 2).sum().backward()
    opt.step()
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), snapshot[0])


def test_step_neither_collapses_nor_explodes_on_real_data() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    xs, ys = load_digits(return_X_y=True)
    xs, ys = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = H3Optimizer(model.parameters(), lr=1e-3)
    for _epoch in range(15):
        perm = torch.randperm(len(ys))
        for i in range(0, len(perm), 32):
            b = perm[i : i + 32]

            def closure(b: torch.Tensor = b) -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xs[b]), ys[b])
                loss.backward()
                return loss

            opt.step(closure)
    lrs = opt.lr_history
    assert len(lrs) > 50
    assert min(lrs[len(lrs) // 2 :]) >= 1e-3  # no collapse (the published package's failure)
    assert max(lrs) <= 1e-2  # bounded by lr_max
    acc = (model(xs).argmax(1) == ys).float().mean().item()
    assert acc > 0.95


def test_validation_messages() -> None:
    x, _ = quadratic()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        H3Optimizer([x], lr=-1)
    with pytest.raises(ValueError, match="lr_min <= lr <= lr_max"):
        H3Optimizer([x], lr=1.0, lr_max=0.1)
