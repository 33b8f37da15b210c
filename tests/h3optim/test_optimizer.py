"""H3Optimizer conformance, parametrised like PyTorch's own optimizer tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from h3optim import H3Optimizer
from tests.h3optim._digits import digits, digits_closure

CONFIGS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 1e-2},
    {"lr": 1e-2, "lipschitz_update_interval": 3, "lipschitz_safety": 0.5},
]
# every implementation passes the same conformance tests; the default (fused on the CPU) is
# the "fused" entry plus the real-data test below
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def quadratic(seed: int = 0) -> tuple[nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(20, generator=g)), torch.linspace(0.5, 4.0, 20)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", CONFIGS)
def test_converges_on_a_quadratic(kw: dict, impl: str) -> None:
    x, a = quadratic()
    opt = H3Optimizer([x], **kw, **IMPLS[impl])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (a * x * x).sum()
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(400):
        opt.step(closure)
    assert float(closure().detach()) < 1e-3 * first


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", CONFIGS)
def test_state_dict_round_trip_gives_an_identical_next_step(kw: dict, impl: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    kw = {**kw, **IMPLS[impl]}
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


@pytest.mark.parametrize("impl", IMPLS)
def test_works_without_closure_and_with_two_param_groups(impl: str) -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    opt = H3Optimizer(
        [{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-3, "lr_max": 1e-3}],
        lr=1e-2,
        **IMPLS[impl],
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
        for key in ("lr_min", "max_growth", "lipschitz_smoothing", "foreach", "fused"):
            g.pop(key)
        g.pop("lr_seen"), g.pop("lr_nominal")  # before the bounds followed a scheduler
    opt2 = H3Optimizer([x])
    opt2.load_state_dict(state)
    opt2.__setstate__(opt2.__getstate__())
    assert opt2.param_groups[0]["max_growth"] == 1.5 and "lr_min" in opt2.param_groups[0]
    assert opt2.param_groups[0]["lr_seen"] == opt2.param_groups[0]["lr_nominal"] == 1e-3
    assert opt2.param_groups[0]["foreach"] is None and opt2.param_groups[0]["fused"] is None


def test_a_pickled_optimizer_keeps_working() -> None:
    import pickle

    x, a = quadratic()
    opt = H3Optimizer([x], lipschitz_update_interval=2)

    def closure_for(o: H3Optimizer, x: torch.Tensor):
        def closure() -> torch.Tensor:
            o.zero_grad()
            loss = 0.5 * (a * x * x).sum()
            loss.backward()
            return loss

        return closure

    for _ in range(4):  # the probe at step 2 sees no displacement yet; step 4's adapts
        opt.step(closure_for(opt, x))
    x.grad = torch.full_like(x, float("nan"))
    opt.step()  # a skip, counted on the device and not yet folded into the state
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2.lr_history == opt.lr_history and len(opt2.lr_history) == 1
    assert opt2.skipped_steps == 1
    x2 = opt2.param_groups[0]["params"][0]
    for _ in range(12):  # the copy probes when the original does, and moves as it does
        opt.step(closure_for(opt, x))
        opt2.step(closure_for(opt2, x2))
    assert opt2.lr_history == opt.lr_history and len(opt2.lr_history) >= 3
    assert torch.equal(x2, x) and opt2.skipped_steps == 1


def test_curvature_estimate_is_exact_on_a_quadratic_in_adams_metric() -> None:
    # f = ½ L ‖x‖²: Δg = L Δx, so in a metric D = d·I the estimate must be exactly L / d
    from h3optim._functional import lipschitz_estimate

    curvature, d = 4.0, 0.25
    x0, x1 = torch.randn(10), torch.randn(10)
    lhat = lipschitz_estimate(
        [curvature * x1], [curvature * x0], [x1], [x0], [torch.full((10,), d)]
    )
    assert float(lhat) == pytest.approx(curvature / d, rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_step_settles_at_gamma_over_lhat(impl: str, scale: float) -> None:
    """The step taken settles at γ/L̂; with a group's ``step_scale`` s (AutoH3's lr
    compensation) that step is lr × s, so lr settles at γ/(s·L̂)."""
    curvature, gamma = 4.0, 0.5
    x = nn.Parameter(torch.linspace(1.0, 3.0, 10))
    opt = H3Optimizer(
        [x],
        **IMPLS[impl],
        lr=1e-3,
        lr_max=100.0,
        lipschitz_safety=gamma,
        lipschitz_update_interval=2,
        max_growth=1e9,
        lipschitz_smoothing=1.0,
    )
    opt.param_groups[0]["step_scale"] = scale

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * curvature * (x * x).sum()
        loss.backward()
        return loss

    for _ in range(40):
        opt.step(closure)
    assert len(opt.lipschitz_history) >= 10
    for lr, lhat in zip(opt.lr_history, opt.lipschitz_history, strict=True):
        assert lr == pytest.approx(max(1e-5, min(100.0, gamma / (scale * lhat))), rel=1e-9)
    assert float(closure().detach()) < 0.5 * curvature * float(
        (torch.linspace(1.0, 3.0, 10) ** 2).sum()
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_gradients_skip_the_step_without_poisoning_state(impl: str) -> None:
    x = nn.Parameter(torch.ones(3))
    opt = H3Optimizer([x], lr=0.1, **IMPLS[impl])
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
    assert len(lrs) >= 10  # 855 steps: probes every 10 to 80 steps
    assert min(lrs[len(lrs) // 2 :]) >= 1e-3  # no collapse (the published package's failure)
    assert max(lrs) <= 1e-2  # bounded by lr_max
    acc = (model(xs).argmax(1) == ys).float().mean().item()
    assert acc > 0.95


def _probe_steps(lr: float, steps: int, **kw: Any) -> tuple[list[int], list[float]]:
    """The steps (1-based) at which H3Optimizer ran its curvature probe on ½‖x‖², and the
    step size after each probe."""
    x = nn.Parameter(torch.linspace(1.0, 3.0, 10))
    opt = H3Optimizer([x], lr=lr, **kw)
    calls: list[int] = []
    step = 0

    def closure() -> torch.Tensor:
        calls.append(step)
        opt.zero_grad()
        loss = 0.5 * (x * x).sum()
        loss.backward()
        return loss

    for step in range(1, steps + 1):  # noqa: B007 (read by the closure)
        opt.step(closure)
    return sorted({s for s in calls if calls.count(s) == 2}), opt.lr_history


@pytest.mark.parametrize("impl", IMPLS)
def test_the_probe_waits_longer_while_the_step_has_room(impl: str) -> None:
    # at lr 0.01, γ/L̂ (about 1 in Adam's metric here) is far above the ceiling lr_max = lr:
    # every probe finds room, so the interval doubles from 10 up to 80 and stays there
    probes, lrs = _probe_steps(0.01, 400, **IMPLS[impl])
    assert probes == [10, 30, 70, 150, 230, 310, 390] and set(lrs) == {0.01}
    # with the interval fixed, as the published package probed
    probes, _ = _probe_steps(0.01, 60, lipschitz_max_interval=10, **IMPLS[impl])
    assert probes == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_probe_keeps_its_shortest_interval_while_the_step_lacks_room(impl: str) -> None:
    # at lr 1.0, γ/L̂ is 1.26 at the first probe (less than HEADROOM × the ceiling), then
    # below the ceiling: the probes lower the step, every lipschitz_update_interval steps
    probes, lrs = _probe_steps(1.0, 100, **IMPLS[impl])
    assert probes == list(range(10, 101, 10))
    assert lrs[0] == 1.0 and lrs[-1] < 0.6 and lrs == sorted(lrs, reverse=True)


def test_a_state_without_a_probe_schedule_probes_every_interval() -> None:
    # an optimizer state saved before the schedule existed has no "lipschitz_next": it
    # probes every lipschitz_update_interval steps until its first probe sets one
    x = nn.Parameter(torch.ones(3))
    opt = H3Optimizer([x], lipschitz_update_interval=4)
    group = opt.param_groups[0]
    assert not opt._due(group, 3) and opt._due(group, 4)
    opt._schedule(group, 4, roomy=True)
    assert group["lipschitz_next"] == 12 and not opt._due(group, 8) and opt._due(group, 12)


def test_validation_messages() -> None:
    x, _ = quadratic()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        H3Optimizer([x], lr=-1)
    with pytest.raises(ValueError, match="lr_min <= lr <= lr_max"):
        H3Optimizer([x], lr=1.0, lr_max=0.1)
    with pytest.raises(ValueError, match="Invalid lipschitz_max_interval: 5"):
        H3Optimizer([x], lipschitz_update_interval=10, lipschitz_max_interval=5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("has_state", [False, True])
def test_a_sparse_gradient_is_a_runtime_error_before_any_change(impl: str, has_state: bool) -> None:
    """Once the parameter had state (a dense step, or a loaded checkpoint) a sparse gradient
    reached the non-finite check and raised a dispatcher dump (NotImplementedError,
    ``_amp_foreach_non_finite_check_and_unscale_`` on SparseCPU); it is the RuntimeError the
    first step gives, as under Adam."""
    emb = nn.Embedding(10, 3)
    opt = H3Optimizer(emb.parameters(), lr=1e-2, **IMPLS[impl])
    if has_state:
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
        opt.zero_grad()
    before = emb.weight.detach().clone()
    emb.sparse = True
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*SparseAdam"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_foreach_and_fused_need_each_other_out_and_a_kernel() -> None:
    x, _ = quadratic()
    with pytest.raises(ValueError, match="cannot be `True` together"):
        H3Optimizer([x], foreach=True, fused=True)
    with pytest.raises(ValueError, match="`fused=True` requires"):
        H3Optimizer([nn.Parameter(torch.empty(3, device="meta"))], fused=True)
    opt = H3Optimizer([x])
    with pytest.raises(ValueError, match="cannot be `True` together"):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.ones(2))], "foreach": True, "fused": True}
        )
    assert len(opt.param_groups) == 1  # the refused group is not kept


SHAPES = [(), (1,), (7,), (3, 4), (2, 3, 5), (16, 8)]


def _run_random_problem(
    impl: dict, *, steps: int = 14, mixed_dtypes: bool = False
) -> tuple[list[torch.Tensor], H3Optimizer]:
    """Two groups (the second with weight decay), mixed shapes incl. 0-dim and 1-dim, a NaN
    gradient at step 6, a curvature probe every 3 steps (via a closure). With
    ``mixed_dtypes`` every other parameter is float64, so each group has two buckets."""
    gen = torch.Generator().manual_seed(7)
    params = [
        nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64 if i % 2 else None))
        if mixed_dtypes
        else nn.Parameter(torch.randn(s, generator=gen))
        for i, s in enumerate(SHAPES)
    ]
    targets = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = H3Optimizer(
        [
            {"params": params[:3]},
            {"params": params[3:], "lr": 3e-3, "weight_decay": 0.05},
        ],
        lr=1e-2,
        weight_decay=1e-3,
        lipschitz_update_interval=3,
        max_growth=3.0,
        **impl,
    )
    for k in range(steps):

        def closure(k: int = k) -> torch.Tensor:
            opt.zero_grad()
            loss = sum(
                (((p - t) ** 2) * (1 + (p - t) ** 2)).sum().float()
                for p, t in zip(params, targets, strict=True)
            )
            loss.backward()  # type: ignore[union-attr]
            if k == 6:
                params[4].grad[1, 2, 3] = float("nan")  # type: ignore[index]
            return loss  # type: ignore[return-value]

        opt.step(closure)
    return params, opt


@pytest.mark.parametrize("mixed_dtypes", [False, True])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_fast_paths_give_the_reference_update(impl: str, mixed_dtypes: bool) -> None:
    ref_params, ref = _run_random_problem(IMPLS["single"], mixed_dtypes=mixed_dtypes)
    params, opt = _run_random_problem(IMPLS[impl], mixed_dtypes=mixed_dtypes)
    assert ref.skipped_steps == opt.skipped_steps == 1
    assert len(ref.lr_history) == len(opt.lr_history) >= 4  # curvature updates happened
    assert min(ref.lr_history) < 1e-2  # and one lowered the step
    assert opt.lr_history == pytest.approx(ref.lr_history, rel=1e-4)
    for p, q in zip(ref_params, params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "snapshot"):
            torch.testing.assert_close(opt.state[q][key], ref.state[p][key], rtol=1e-5, atol=1e-6)
        assert torch.equal(opt.state[q]["step"], ref.state[p]["step"])


def test_a_skipped_step_moves_nothing_in_any_group() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))
    opt = H3Optimizer([{"params": [a]}, {"params": [b], "weight_decay": 0.1}], lr=0.1)
    (a.sum() + b.sum()).backward()
    opt.step()
    before = [t.clone() for t in (a, b, opt.state[a]["exp_avg"], opt.state[b]["exp_avg_sq"])]
    a.grad = torch.ones(3)
    b.grad = torch.tensor([[1.0, float("inf")], [1.0, 1.0]])  # only the second group is bad
    opt.step()
    after = (a, b, opt.state[a]["exp_avg"], opt.state[b]["exp_avg_sq"])
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert opt.state[a]["step"].item() == 2  # the counters still advance
    state = opt.state_dict()["state"]
    assert [int(s["skipped"]) for s in state.values()] == [1, 1]


def test_masked_multi_tensor_path_matches_the_host_decided_one() -> None:
    # the accelerator branch (no host read of the flag) run on the CPU
    from h3optim._functional import _multi_tensor_h3

    gen = torch.Generator().manual_seed(3)

    def tensors() -> list[list[torch.Tensor]]:  # params, exp_avgs, exp_avg_sqs (≥ 0)
        g = torch.Generator().manual_seed(4)
        p, m, v = ([torch.randn(s, generator=g) for s in SHAPES] for _ in range(3))
        return [p, m, [t.abs() for t in v]]

    hyper = {"step": 5, "lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    for bad in (False, True):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        if bad:
            grads[2][1] = float("nan")
            grads[3][0, 0] = float("-inf")
        flag = torch.tensor(1.0 if bad else 0.0)
        (p1, m1, v1), (p2, m2, v2) = tensors(), tensors()
        orig = [t.clone() for t in p1 + m1 + v1]
        _multi_tensor_h3(p1, grads, m1, v1, weight_decay=0.1, found_inf=flag, **hyper)
        _multi_tensor_h3(
            p2, grads, m2, v2, weight_decay=0.1, found_inf=flag, host_skip=False, **hyper
        )
        for x, y in zip(p1 + m1 + v1, p2 + m2 + v2, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        if bad:
            assert all(torch.equal(x, y) for x, y in zip(orig, p2 + m2 + v2, strict=True))


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_the_probe_leaves_parameters_and_gradients_exactly_as_they_were(
    impl: str, set_to_none: bool
) -> None:
    # with lr_min = lr = lr_max the probe cannot change the step: a run with probes must
    # then be bit-identical to one without, whatever zero_grad does
    def run(probe: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        opt = H3Optimizer(
            [{"params": model[0].parameters()}, {"params": model[2].parameters()}],
            lr=1e-2,
            lr_min=1e-2,
            lr_max=1e-2,
            lipschitz_update_interval=2,
            lipschitz_max_interval=2,
            **IMPLS[impl],
        )
        x, y = torch.randn(16, 5), torch.randn(16, 2)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=set_to_none)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(7):
            if probe:
                opt.step(closure)
            else:
                closure()
                opt.step()
        if probe:
            assert len(opt.lipschitz_history) == 4
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(True), run(False), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", IMPLS)
def test_step_counters_advance_per_parameter_and_survive_a_state_round_trip(impl: str) -> None:
    # the counters are views of one tensor per bucket (one add a step); each parameter's own
    # count is still its own: one without a gradient does not advance, a loaded one resumes
    a, b, c = (nn.Parameter(torch.ones(n)) for n in (3, 4, 5))
    opt = H3Optimizer([a, b, c], lr=0.1, **IMPLS[impl])

    def step(*with_grad: nn.Parameter) -> None:
        opt.zero_grad(set_to_none=True)
        sum(p.sum() for p in with_grad).backward()  # type: ignore[union-attr]
        opt.step()

    def counts(o: H3Optimizer) -> list[float]:
        return [o.state[p]["step"].item() if p in o.state else 0.0 for p in (a, b, c)]

    step(a, b)
    step(a, b)
    step(a, b, c)  # c joins: the bucket's counters are rebuilt, a and b keep theirs
    step(a, c)  # b sits out
    assert counts(opt) == [4.0, 3.0, 2.0]
    for p in (a, b, c):
        s = opt.state[p]["step"]
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.dim() == 0
    saved = copy.deepcopy(opt.state_dict())
    step(a, b, c)
    assert counts(opt) == [5.0, 4.0, 3.0]
    assert [s["step"].item() for s in saved["state"].values()] == [4.0, 3.0, 2.0]
    fresh = H3Optimizer([a, b, c], lr=0.1, **IMPLS[impl])
    fresh.load_state_dict(saved)
    opt, before = fresh, [t.clone() for t in (a, b, c)]
    step(a, b, c)
    assert counts(fresh) == [5.0, 4.0, 3.0]
    assert not any(torch.equal(x, y) for x, y in zip(before, (a, b, c), strict=True))


# --- with an LR scheduler ------------------------------------------------------------------


class _SetByHand:
    """``group["lr"] = x`` between steps, as a user's own schedule does."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.t = opt, 0

    def step(self) -> None:
        self.t += 1
        if self.t in (30, 70):
            for g in self.opt.param_groups:
                g["lr"] = {30: 2e-3, 70: 5e-3}[self.t]


_S = torch.optim.lr_scheduler
SCHEDULERS: dict[str, Any] = {
    "StepLR": lambda o: _S.StepLR(o, 25, 0.3),  # multiplies the group's lr
    "CosineAnnealingLR": lambda o: _S.CosineAnnealingLR(o, 100),  # likewise (chainable form)
    "CosineAnnealingLR past T_max": lambda o: _S.CosineAnnealingLR(o, 30),  # 0, then up again
    "OneCycleLR": lambda o: _S.OneCycleLR(o, 0.05, total_steps=100),  # sets its own values
    "by hand": _SetByHand,
}


def _digits_under(
    make_opt: Callable[[Any], torch.optim.Optimizer], sched: str, *, closure: bool = True
) -> tuple[list[float], list[bool], torch.optim.Optimizer]:
    """100 steps of an MLP on the digits under a scheduler: the lr each step used, and
    whether it ran the curvature probe (the closure called twice)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = make_opt(model.parameters())
    scheduler = SCHEDULERS[sched](opt)
    lrs: list[float] = []
    probed: list[bool] = []
    for t in range(100):
        calls = 0
        step = digits_closure(opt, model, t)

        def loss_fn(step: Callable[[], torch.Tensor] = step) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return step()

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        probed.append(calls == 2)
        scheduler.step()
    return lrs, probed, opt


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_a_scheduler_sets_the_step_as_it_does_for_adam(sched: str) -> None:
    adam, _, _ = _digits_under(lambda p: torch.optim.Adam(p, lr=1e-2), sched)
    plain, _, _ = _digits_under(lambda p: H3Optimizer(p, lr=1e-2), sched, closure=False)
    assert plain == adam  # without probes: the schedule, exactly
    h3, probed, opt = _digits_under(lambda p: H3Optimizer(p, lr=1e-2), sched)
    assert len(opt.lr_history) >= 3  # the probes ran
    assert all(h <= a for h, a in zip(h3, adam, strict=True))  # never above the schedule
    # the probes find room under the schedule here (γ/L̂ above it) but past OneCycleLR's peak
    assert [h for h, p in zip(h3, probed, strict=True) if not p] == [
        a for a, p in zip(adam, probed, strict=True) if not p
    ]
    if sched != "OneCycleLR":
        assert h3 == adam


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_under_a_scheduler_the_probes_lower_the_step_and_never_raise_it_above(sched: str) -> None:
    # a small γ: the probes lower the step well below the schedule's
    adam, _, _ = _digits_under(lambda p: torch.optim.Adam(p, lr=1e-2), sched)
    h3, probed, opt = _digits_under(lambda p: H3Optimizer(p, lr=1e-2, lipschitz_safety=0.05), sched)
    ratios = [h / a for h, a in zip(h3, adam, strict=True) if a > 0]
    assert max(ratios) <= 1.0 and min(ratios) < 0.2
    group = opt.param_groups[0]  # the bounds the last step had
    assert group["lr_min"] <= h3[-1] <= group["lr_max"] <= adam[-1] * (1 + 1e-9)
    if sched == "OneCycleLR":  # it sets its own values: followed exactly between probes
        assert [h for h, p in zip(h3, probed, strict=True) if not p] == [
            a for a, p in zip(adam, probed, strict=True) if not p
        ]


@pytest.mark.parametrize("sched", ["StepLR", "OneCycleLR"])
def test_a_run_under_a_scheduler_resumes_identically_from_its_state(sched: str) -> None:
    xs, ys = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def make(m: nn.Module) -> tuple[H3Optimizer, Any]:
        o = H3Optimizer(m.parameters(), lr=1e-2, lipschitz_safety=0.05)
        return o, SCHEDULERS[sched](o)

    def train(m: nn.Module, o: H3Optimizer, s: Any, steps: range) -> list[float]:
        lrs = []
        for t in steps:
            o.step(digits_closure(o, m, t))
            lrs.append(o.param_groups[0]["lr"])
            s.step()
        return lrs

    opt, scheduler = make(model)
    train(model, opt, scheduler, range(37))  # the bounds have followed, the probes adapted
    assert opt.param_groups[0]["lr_max"] != 1e-2 and len(opt.lr_history) >= 3
    clone = copy.deepcopy(model)
    opt2, scheduler2 = make(clone)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    scheduler2.load_state_dict(scheduler.state_dict())
    assert train(clone, opt2, scheduler2, range(37, 80)) == train(
        model, opt, scheduler, range(37, 80)
    )
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": opt2.param_groups[0]["params"]}


# --- under autocast, and the skip counter's type -------------------------------------------


def _digits_probes(autocast: bool) -> tuple[H3Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = H3Optimizer(model.parameters(), lr=1e-2, lipschitz_max_interval=10)
    for t in range(39):  # probes at steps 10, 20 and 30
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            opt.step(digits_closure(opt, model, t))
    return opt, model


def test_the_probe_measures_the_curvature_under_autocast() -> None:
    # autocast caches its bfloat16 copies of the weights for the whole region: the probe's
    # closure, run at the snapshot inside the step's region, must not compute with them
    full, _ = _digits_probes(autocast=False)
    bf16, model = _digits_probes(autocast=True)
    assert len(full.lipschitz_history) == len(bf16.lipschitz_history) == 3
    assert bf16.lipschitz_history == pytest.approx(full.lipschitz_history, rel=0.05)
    # a forward after a step that probed, in the step's region, sees the updated weights
    xs, _ = digits()
    b = slice(39 * 64 % 1728, 39 * 64 % 1728 + 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16.step(digits_closure(bf16, model, 39))  # step 40: a probe
        after = model(xs[b])
    assert len(bf16.lipschitz_history) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(after, model(xs[b]))


def test_the_skip_counter_stays_an_exact_count_through_a_state_round_trip() -> None:
    # torch casts loaded state tensors (all but "step") to the parameter's dtype: bfloat16
    # holds integers exactly only up to 256
    xs, ys = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).bfloat16()
    opt = H3Optimizer(model.parameters(), lr=1e-2)

    def train(o: H3Optimizer, m: nn.Module, steps: range) -> None:
        for t in steps:
            b = slice(t * 16 % 1728, t * 16 % 1728 + 16)
            o.zero_grad()
            nn.functional.cross_entropy(m(xs[b].bfloat16()), ys[b]).backward()
            if t % 5:  # four steps in five overflow
                next(m.parameters()).grad[0, 0] = float("inf")  # type: ignore[index]
            o.step()

    train(opt, model, range(324))
    assert opt.skipped_steps == 259  # in bfloat16: 260
    clone = copy.deepcopy(model)
    opt2 = H3Optimizer(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.skipped_steps == 259
    assert all(s["skipped"].dtype == torch.int64 for s in opt2.state.values())
    train(opt2, clone, range(324, 327))  # two more skips
    assert opt2.skipped_steps == 261
    assert [int(s["skipped"]) for s in opt2.state_dict()["state"].values()] == [261] * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_step_scale_multiplies_the_step_taken_and_leaves_lr_and_its_bounds(impl: str) -> None:
    """A group's ``step_scale`` (AutoH3's lr compensation) gives the update of ``lr`` ×
    scale, while ``lr``, ``lr_max`` and ``lr_min`` stay as set (a scheduler sees its own)."""
    (a, target), (b, _) = quadratic(), quadratic()
    scaled = H3Optimizer([a], **IMPLS[impl], lr=1e-2)
    plain = H3Optimizer([b], **IMPLS[impl], lr=1.5e-2, lr_max=1.5e-2)
    scaled.param_groups[0]["step_scale"] = 1.5
    for _ in range(5):
        for x, opt in ((a, scaled), (b, plain)):
            opt.zero_grad()
            (0.5 * target * x * x).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b)
    group = scaled.param_groups[0]
    assert (group["lr"], group["lr_max"], group["lr_min"]) == (1e-2, 1e-2, 1e-4)
