"""H3Optimizer with parameter groups of their own step and parameters of their own count:
each group's step bounds follow its own ``lr``; each parameter's bias correction follows its
own step count, as in ``torch.optim.Adam`` (a parameter that starts late or sits out steps)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from h3optim import H3Optimizer
from tests.h3optim._digits import digits_closure

IMPLS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _bounds(opt: H3Optimizer) -> list[tuple[float, float]]:
    return [(g["lr_min"], g["lr_max"]) for g in opt.param_groups]


# --- each group's step bounds --------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_each_group_keeps_its_own_step_bounds_through_the_probes(impl: str) -> None:
    torch.manual_seed(0)
    xs = [nn.Parameter(torch.randn(6)) for _ in range(5)]
    opt = H3Optimizer(
        [
            {"params": [xs[0]], "lr": 1e-2},  # above the constructor's lr
            {"params": [xs[1]], "lr": 1e-6},  # below the constructor's lr/100
            {"params": [xs[2]], "lr": 1e-2, "lipschitz_safety": 1e-9},  # γ/L̂ far below
            {"params": [xs[3]], "lr_max": 5e-3, "lr_min": 5e-4, "max_growth": 10.0},
            {"params": [xs[4]]},  # the constructor's lr
        ],
        lr=1e-3,
        lipschitz_update_interval=2,
        lipschitz_max_interval=2,
        **IMPLS[impl],
    )
    assert _bounds(opt) == [(1e-4, 1e-2), (1e-8, 1e-6), (1e-4, 1e-2), (5e-4, 5e-3), (1e-5, 1e-3)]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(0.5 * (x * x).sum() for x in xs)
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    for _ in range(12):
        opt.step(closure)
        for g, (low, high) in zip(opt.param_groups, _bounds(opt), strict=True):
            assert low <= g["lr"] <= high
    assert len(opt.lr_history) == 5 * 5  # probes at steps 4, 6, …, 12 moved every group
    lrs = [g["lr"] for g in opt.param_groups]
    # on ½‖x‖² γ/L̂ is about 1 in Adam's metric: room above every ceiling but group 2's
    assert lrs[0] == 1e-2  # was capped at the constructor's 1e-3
    assert lrs[1] == 1e-6  # was raised to the constructor's 1e-5
    assert lrs[2] == pytest.approx(1e-4)  # its own floor, not the constructor's 1e-5
    assert lrs[3] == 5e-3  # the group's own bounds are kept
    assert lrs[4] == 1e-3
    assert _bounds(opt)[:3] == [(1e-4, 1e-2), (1e-8, 1e-6), (1e-4, 1e-2)]


def test_constructor_bounds_are_every_groups_default() -> None:
    x, y = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = H3Optimizer([{"params": [x]}, {"params": [y], "lr": 1e-4}], lr=1e-3, lr_max=1e-2)
    assert _bounds(opt) == [(1e-5, 1e-2), (1e-6, 1e-2)]
    opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": 0.5, "lr_max": 0.5})
    assert _bounds(opt)[2] == (5e-3, 0.5)
    opt = H3Optimizer([x], lr=1e-3)
    opt.add_param_group({"params": [y], "lr": 0.5})  # bounds from the group's own lr
    assert _bounds(opt) == [(1e-5, 1e-3), (5e-3, 0.5)]


def test_a_group_outside_its_bounds_is_refused() -> None:
    x, y = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"param group 1: need lr_min <= lr <= lr_max"):
        H3Optimizer([{"params": [x]}, {"params": [y], "lr": 1e-2, "lr_max": 1e-3}], lr=1e-3)
    with pytest.raises(ValueError, match=r"param group 0: need lr_min <= lr <= lr_max"):
        H3Optimizer([{"params": [x], "lr": 1e-6}], lr=1e-3, lr_min=1e-5)
    opt = H3Optimizer([x], lr=1e-3)
    with pytest.raises(ValueError, match=r"param group 1: need lr_min <= lr <= lr_max, got 0.1"):
        opt.add_param_group({"params": [y], "lr": 1e-2, "lr_min": 0.1})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    opt.add_param_group({"params": [y], "lr": 1e-2})  # nor are its parameters
    assert _bounds(opt)[1] == (1e-4, 1e-2)


def _quadratic_run(opt: H3Optimizer, x: torch.Tensor, steps: int) -> None:
    a = torch.linspace(0.5, 4.0, x.numel())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (a * x * x).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_old_state_dict_without_bounds_loads_and_behaves_as_before(impl: str) -> None:
    # a state saved before the bounds were kept in the groups: they follow the group's lr
    # (one group: the constructor's, as they always did)
    x = nn.Parameter(torch.linspace(1.0, 3.0, 10))
    opt = H3Optimizer([x], lr=1e-2, lipschitz_update_interval=3, **IMPLS[impl])
    _quadratic_run(opt, x, 7)
    state = copy.deepcopy(opt.state_dict())
    for g in state["param_groups"]:
        del g["lr_max"], g["lr_min"]
    x2 = nn.Parameter(x.detach().clone())
    opt2 = H3Optimizer([x2], lr=1e-2, lipschitz_update_interval=3, **IMPLS[impl])
    opt2.load_state_dict(state)
    assert _bounds(opt2) == _bounds(opt) == [(1e-4, 1e-2)]
    _quadratic_run(opt, x, 20)
    _quadratic_run(opt2, x2, 20)
    assert opt2.lr_history == opt.lr_history[-len(opt2.lr_history) :]
    assert torch.equal(x2, x)


@pytest.mark.parametrize("impl", IMPLS)
def test_each_groups_bounds_follow_its_own_schedule(impl: str) -> None:
    # MultiplicativeLR multiplies each group's lr by its own factor: one decays from the
    # start, one from step 30; a small γ: the probes lower each step below its schedule
    factors: list[Callable[[int], float]] = [lambda t: 0.93, lambda t: 1.0 if t < 30 else 0.9]

    def run(make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> list[list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = make(
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-2}]
        )
        scheduler = torch.optim.lr_scheduler.MultiplicativeLR(opt, factors)
        lrs = []
        for t in range(60):
            opt.step(digits_closure(opt, model, t))
            lrs.append([g["lr"] for g in opt.param_groups])
            scheduler.step()
        if isinstance(opt, H3Optimizer):
            assert len(opt.lr_history) >= 8
            for lr, (low, high) in zip(lrs[-1], _bounds(opt), strict=True):
                assert high == pytest.approx(100 * low) and low <= lr <= high
        return lrs

    adam = run(lambda groups: torch.optim.Adam(groups, lr=1e-2))
    h3 = run(
        lambda groups: H3Optimizer(
            groups, lr=1e-2, lipschitz_safety=0.05, lipschitz_update_interval=5, **IMPLS[impl]
        )
    )
    for i in range(2):
        ratios = [h[i] / a[i] for h, a in zip(h3, adam, strict=True)]
        assert max(ratios) <= 1.0 and min(ratios) < 0.5


# --- each parameter's own step count -------------------------------------------------------

# which parameters have a gradient at step t (0-based), by name: "a" always, "b" from step
# 13 on (it starts late), "c" always but steps 5-8 (it sits out), "d" from step 2 on
SCHEDULE: dict[str, Callable[[int], bool]] = {
    "a": lambda t: True,
    "b": lambda t: t >= 13,
    "c": lambda t: not 5 <= t <= 8,
    "d": lambda t: t >= 2,
}


def _params(order: str, mixed_dtypes: bool) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(11)
    shapes = {"a": (4,), "b": (2, 3), "c": (), "d": (5,)}
    return {
        n: nn.Parameter(
            torch.randn(
                shapes[n],
                generator=gen,
                dtype=torch.float64 if mixed_dtypes and n in "bc" else None,
            )
        )
        for n in order
    }


def _grads(params: dict[str, nn.Parameter], t: int) -> None:
    """Gradients of Σ (p − 0.3)² · (1 + p²) for the parameters active at step t."""
    for n, p in params.items():
        p.grad = None
        if SCHEDULE[n](t):
            with torch.enable_grad():
                q = p.detach().requires_grad_()
                (((q - 0.3) ** 2) * (1 + q * q)).sum().backward()
            p.grad = q.grad


def _closure(params: dict[str, nn.Parameter], t: int) -> Callable[[], None]:
    return lambda: _grads(params, t)


@pytest.mark.parametrize("mixed_dtypes", [False, True])
@pytest.mark.parametrize("order", ["abcd", "bcda"])  # the late parameter last or first
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("impl", IMPLS)
def test_parameters_that_start_late_or_sit_out_are_updated_as_torch_adam_does(
    impl: str, weight_decay: float, order: str, mixed_dtypes: bool
) -> None:
    # without a closure H3Optimizer is Adam with decoupled weight decay: AdamW (Adam when
    # the decay is 0), whose bias correction takes each parameter's own step count
    ours, theirs = _params(order, mixed_dtypes), _params(order, mixed_dtypes)
    opt = H3Optimizer(list(ours.values()), lr=1e-2, weight_decay=weight_decay, **IMPLS[impl])
    ref: torch.optim.Optimizer = (
        torch.optim.AdamW(list(theirs.values()), lr=1e-2, weight_decay=weight_decay)
        if weight_decay
        else torch.optim.Adam(list(theirs.values()), lr=1e-2)
    )
    for t in range(30):
        before_b = ours["b"].detach().clone()
        for params, o in ((ours, opt), (theirs, ref)):
            _grads(params, t)
            o.step()
        if t == 13:  # b's first update, at count 1 where a's count is 14
            torch.testing.assert_close(ours["b"].detach(), theirs["b"].detach())
            first = (before_b - ours["b"]).abs()
            expected = 1e-2 * (1 + weight_decay * before_b.abs())  # |m̂/√v̂| = 1 at count 1
            assert (first <= expected * 1.0001).all() and first.max() > 0.9 * 1e-2
    for n in order:  # float32 over 30 steps, the operations reordered
        mine, adam = opt.state[ours[n]], ref.state[theirs[n]]
        pairs = [(ours[n].detach(), theirs[n].detach())]
        pairs += [(mine[k], adam[k]) for k in ("exp_avg", "exp_avg_sq")]
        for x, y in pairs:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert mine["step"].item() == adam["step"].item()
    assert [opt.state[ours[n]]["step"].item() for n in "abcd"] == [30.0, 17.0, 26.0, 28.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_parameter_unfrozen_after_thousands_of_steps_takes_adams_first_step(impl: str) -> None:
    # the audit's reproduction: 3000 steps of a alone, then one of a and b together
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = H3Optimizer([a, b], lr=0.01, **IMPLS[impl])
    ra, rb = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ref = torch.optim.Adam([ra, rb], lr=0.01)
    for t in range(3001):
        for p, q, o in ((a, b, opt), (ra, rb, ref)):
            o.zero_grad(set_to_none=True)
            p.grad = torch.ones(3)
            if t == 3000:
                q.grad = torch.ones(3)
            o.step()
    assert 1 - b[0].item() == pytest.approx(0.01, rel=1e-5)  # was 0.0308
    torch.testing.assert_close(b.detach(), rb.detach())
    # 3001 float32 steps, the operations reordered (the fused kernel's): 7e-6 apart
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=2e-5, atol=1e-6)
    assert [opt.state[p]["step"].item() for p in (a, b)] == [3001.0, 1.0]


def _staggered_probe_run(
    impl: dict[str, Any], steps: int, *, mixed_dtypes: bool = False, save_at: int | None = None
) -> tuple[dict[str, nn.Parameter], H3Optimizer, dict[str, Any] | None]:
    """Two groups, the late and sitting-out parameters of SCHEDULE, a curvature probe every 3
    steps (a closure), per-group steps; the state dict after ``save_at`` steps."""
    params = _params("abcd", mixed_dtypes)
    opt = H3Optimizer(
        [
            {"params": [params["a"], params["b"]], "lr": 3e-2},
            {"params": [params["c"], params["d"]], "lr": 1e-3, "weight_decay": 0.05},
        ],
        lr=1e-2,
        lipschitz_update_interval=3,
        max_growth=3.0,
        **impl,
    )
    saved = None
    for t in range(steps):
        opt.step(_closure(params, t))
        if t + 1 == save_at:
            saved = copy.deepcopy(opt.state_dict())
    return params, opt, saved


@pytest.mark.parametrize("mixed_dtypes", [False, True])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_fast_paths_give_the_reference_update_with_staggered_counts(
    impl: str, mixed_dtypes: bool
) -> None:
    ref_params, ref, _ = _staggered_probe_run(IMPLS["single"], 30, mixed_dtypes=mixed_dtypes)
    params, opt, _ = _staggered_probe_run(IMPLS[impl], 30, mixed_dtypes=mixed_dtypes)
    assert len(ref.lr_history) == len(opt.lr_history) >= 6
    assert opt.lr_history == pytest.approx(ref.lr_history, rel=1e-4)
    assert opt.lipschitz_history == pytest.approx(ref.lipschitz_history, rel=1e-4)
    for n in "abcd":
        p, q = ref_params[n], params[n]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "snapshot"):
            torch.testing.assert_close(opt.state[q][key], ref.state[p][key], rtol=1e-5, atol=1e-6)
        assert torch.equal(opt.state[q]["step"], ref.state[p]["step"])


@pytest.mark.parametrize("impl", IMPLS)
def test_the_probe_measures_in_each_parameters_own_metric(impl: str) -> None:
    # L̂ = ‖Δg‖_{D⁻¹}/‖Δθ‖_D with D = √(v/(1 − β₂^t)) + ε, t each parameter's own count
    # (before the step): computed here by hand before each step, compared after a probe
    a = torch.linspace(0.5, 4.0, 5)
    x, y = nn.Parameter(torch.linspace(1.0, 2.0, 5)), nn.Parameter(torch.linspace(-1.0, 1.0, 5))
    opt = H3Optimizer(
        [x, y],
        lr=1e-2,
        lipschitz_update_interval=3,
        lipschitz_max_interval=3,
        lipschitz_smoothing=1.0,
        **IMPLS[impl],
    )

    def closure(active: tuple[nn.Parameter, ...]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = sum(0.5 * (a * p * p).sum() for p in active)
            loss.backward()  # type: ignore[union-attr]
            return loss  # type: ignore[return-value]

        return run

    checked = 0
    for t in range(40):
        active = (x, y) if t >= 10 else (x,)  # y starts at step 10: count 1 against 11
        sums = None
        if all("snapshot" in opt.state.get(p, {}) for p in active):
            dg2 = dx2 = 0.0
            for p in active:
                s = opt.state[p]
                d = (s["exp_avg_sq"] / (1 - 0.999 ** s["step"].item())).sqrt() + 1e-8
                dx = p.detach() - s["snapshot"]
                dg2 += float(((a * dx) ** 2 / d).sum())
                dx2 += float((dx**2 * d).sum())
            sums = dg2, dx2
        before = len(opt.lipschitz_history)
        opt.step(closure(active))
        if len(opt.lipschitz_history) > before:
            assert sums is not None
            expected = math.sqrt(sums[0]) / math.sqrt(sums[1])
            assert opt.lipschitz_history[-1] == pytest.approx(expected, rel=1e-4)
            checked += t >= 10
    assert checked >= 5  # probes with y's count far below x's


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip_mid_training_with_staggered_counts(impl: str) -> None:
    # saved at step 11: b has no state yet, c sits out (its count behind a's and d's)
    params, opt, saved = _staggered_probe_run(IMPLS[impl], 30, save_at=11)
    assert saved is not None
    # by parameter index (a, b, c, d): b, which has had no gradient, has no state
    assert {i: s["step"].item() for i, s in saved["state"].items()} == {0: 11, 2: 7, 3: 9}
    assert [(g["lr_min"], g["lr_max"]) for g in saved["param_groups"]] == [
        (3e-4, 3e-2),
        (1e-5, 1e-3),
    ]
    clone = _params("abcd", False)
    fresh = H3Optimizer(
        [{"params": [clone["a"], clone["b"]]}, {"params": [clone["c"], clone["d"]]}],
        lr=1e-2,
        **IMPLS[impl],
    )
    replay, replay_opt, _ = _staggered_probe_run(IMPLS[impl], 11)  # the state at step 11
    for n in "abcd":
        with torch.no_grad():
            clone[n].copy_(replay[n])
    fresh.load_state_dict(saved)
    assert _bounds(fresh) == [(3e-4, 3e-2), (1e-5, 1e-3)]
    for t in range(11, 30):
        fresh.step(_closure(clone, t))
    for n in "abcd":
        assert torch.equal(clone[n], params[n])
        assert torch.equal(fresh.state[clone[n]]["step"], opt.state[params[n]]["step"])
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    assert fresh.lr_history == opt.lr_history[len(replay_opt.lr_history) :]
