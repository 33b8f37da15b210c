"""H3Optimizer's state against the parameters it is loaded into or kept for: shapes, memory
layouts, skip counters and older formats (``torch.optim.Adam``'s, h3-optimizer 0.2.0's)."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from h3optim import H3Optimizer

#: every implementation, the default (the fused kernel on the CPU) included
IMPLS: dict[str, dict[str, Any]] = {
    "default": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "single": {"foreach": False},
}
CHANNELS_LAST = torch.channels_last


def _through_disk(state: dict[str, Any]) -> dict[str, Any]:
    """``torch.save`` then ``torch.load`` (weights only, PyTorch's default)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


def _load(opt: H3Optimizer, state: dict[str, Any], impl: str) -> None:
    """``opt.load_state_dict(state)``, then ``impl``'s implementation: the loaded groups
    carry the saved ``foreach``/``fused`` (as torch's do), which would override it."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["foreach"] = IMPLS[impl].get("foreach")
        group["fused"] = IMPLS[impl].get("fused")


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))


def _one_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("saved_width", "own_width"), [(4, 64), (64, 4)])
def test_a_state_for_other_shapes_is_refused_at_load_naming_the_parameter(
    impl: str, saved_width: int, own_width: int
) -> None:
    """The fused kernel does not check sizes: a narrower state would be written out of
    bounds (a segfault), a wider one would train on another model's moments."""
    torch.manual_seed(0)
    saved_model, own_model = _mlp(saved_width), _mlp(own_width)
    saved_opt = H3Optimizer(saved_model.parameters(), lr=1e-2, **IMPLS[impl])
    _one_step(saved_model, saved_opt)
    opt = H3Optimizer(own_model.parameters(), lr=1e-2, **IMPLS[impl])
    expected = (
        f"param group 0, parameter 0: saved state 'exp_avg' has shape \\({saved_width}, 8\\), "
        f"parameter has shape \\({own_width}, 8\\)"
    )
    with pytest.raises(ValueError, match=expected):
        opt.load_state_dict(_through_disk(saved_opt.state_dict()))
    assert len(opt.state) == 0  # nothing was loaded
    _one_step(own_model, opt)  # and the optimizer still works
    assert opt.state[own_model[0].weight]["exp_avg"].shape == (own_width, 8)


def test_a_snapshot_of_another_shape_is_refused_too() -> None:
    """The probe copies the snapshot into the parameter, and ``copy_`` broadcasts."""
    torch.manual_seed(0)
    model = _mlp(4)
    opt = H3Optimizer(model.parameters(), lr=1e-2, lipschitz_update_interval=1)
    x, y = torch.randn(16, 8), torch.randn(16, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    state = _through_disk(opt.state_dict())
    assert state["state"][2]["snapshot"].shape == (1, 4)
    state["state"][2]["snapshot"] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="parameter 2: saved state 'snapshot' has shape"):
        H3Optimizer(model.parameters(), lr=1e-2).load_state_dict(state)


@pytest.mark.parametrize("impl", IMPLS)
def test_after_loading_adams_state_skipped_steps_are_counted(impl: str) -> None:
    torch.manual_seed(0)
    model = _mlp(4)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    _one_step(model, adam)
    opt = H3Optimizer(model.parameters(), lr=1e-2)
    _load(opt, _through_disk(adam.state_dict()), impl)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        model[0].weight.grad[0, 0] = float("nan")  # type: ignore[index]
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.skipped_steps == 3
    saved = opt.state_dict()["state"]
    assert [int(s["skipped"]) for s in saved.values()] == [3] * 4
    assert all(s["skipped"].dtype == torch.int64 for s in saved.values())


def _state_of_h3_optimizer_0_2_0(model: nn.Module) -> dict[str, Any]:
    """What the published h3-optimizer 0.2.0's ``H3Optimizer.state_dict()`` holds after five
    steps (its keys and types, read from the 0.2.0 wheel): an int ``step``, the moments, and
    two parameter-sized buffers of its own, ``prev_grad`` and ``prev_params``."""
    gen = torch.Generator().manual_seed(3)
    state = {
        i: {
            "step": 5,
            "exp_avg": torch.randn(p.shape, generator=gen) * 1e-2,
            "exp_avg_sq": torch.rand(p.shape, generator=gen) * 1e-4,
            "prev_grad": torch.randn(p.shape, generator=gen),
            "prev_params": p.detach().clone(),
        }
        for i, p in enumerate(model.parameters())
    }
    group = {
        "lr": 0.01,
        "initial_lr": 0.01,
        "betas": (0.9, 0.999),
        "eps": 1e-08,
        "weight_decay": 0,
        "lipschitz_safety": 0.9,
        "lipschitz_update_interval": 10,
        "global_step": 5,
        "params": list(state),
    }
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("impl", IMPLS)
def test_a_0_2_0_state_loses_its_own_buffers_and_counts_skips(impl: str) -> None:
    torch.manual_seed(0)
    model = _mlp(4)
    opt = H3Optimizer(model.parameters(), lr=1e-2)
    _load(opt, _through_disk(_state_of_h3_optimizer_0_2_0(model)), impl)
    for p in model.parameters():
        assert sorted(opt.state[p]) == ["exp_avg", "exp_avg_sq", "skipped", "step"]
    _one_step(model, opt)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    saved = opt.state_dict()["state"]
    assert all(sorted(s) == ["exp_avg", "exp_avg_sq", "skipped", "step"] for s in saved.values())
    assert [float(s["step"]) for s in saved.values()] == [7.0] * 4
    assert opt.skipped_steps == 1


def _conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3))


_X = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(2))


def _steps(model: nn.Module, opt: H3Optimizer, n: int, *, set_to_none: bool = True) -> None:
    """``n`` steps on a fixed batch, with a closure (the probe every other step)."""

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=set_to_none)
        loss = (model(_X) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _assert_laid_out_like_the_parameters(opt: H3Optimizer) -> None:
    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "snapshot"):
            if key in state:
                assert state[key].stride() == p.stride(), key


KW = {"lr": 1e-2, "lipschitz_update_interval": 2}


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize(("first", "then"), [(None, CHANNELS_LAST), (CHANNELS_LAST, None)])
@pytest.mark.parametrize("impl", ["default", "fused", "foreach"])
def test_a_layout_change_mid_run_gives_the_reference_update(
    impl: str,
    first: torch.memory_format | None,
    then: torch.memory_format | None,
    set_to_none: bool,
) -> None:
    """``module.to(memory_format=...)`` mid-run swaps the parameters' data under the
    optimizer; the fused kernel pairs a parameter with its moments by memory position."""
    model, reference = _conv(), _conv()
    for m in (model, reference):
        if first is not None:
            m.to(memory_format=first)
    opt = H3Optimizer(model.parameters(), **KW, **IMPLS[impl])
    ref = H3Optimizer(reference.parameters(), **KW, **IMPLS["single"])
    _steps(model, opt, 3, set_to_none=set_to_none)
    _steps(reference, ref, 3, set_to_none=set_to_none)
    _assert_same(model, reference)
    for m in (model, reference):
        m.to(memory_format=then or torch.contiguous_format)
    assert model[0].weight.is_contiguous() == (then is None)
    _steps(model, opt, 4, set_to_none=set_to_none)
    _steps(reference, ref, 4, set_to_none=set_to_none)
    _assert_same(model, reference)
    if impl != "foreach":
        _assert_laid_out_like_the_parameters(opt)


@pytest.mark.parametrize(("saved", "own"), [(CHANNELS_LAST, None), (None, CHANNELS_LAST)])
@pytest.mark.parametrize("impl", ["default", "fused", "foreach"])
def test_a_state_from_the_other_layout_is_laid_out_like_the_parameters_at_load(
    impl: str, saved: torch.memory_format | None, own: torch.memory_format | None
) -> None:
    trained = _conv()
    if saved is not None:
        trained.to(memory_format=saved)
    trained_opt = H3Optimizer(trained.parameters(), **KW)
    _steps(trained, trained_opt, 3)
    checkpoint = _through_disk({"model": trained.state_dict(), "opt": trained_opt.state_dict()})
    assert checkpoint["opt"]["state"][0]["exp_avg"].is_contiguous() == (saved is None)

    model, reference = _conv(), _conv()
    opts = []
    for m, name in ((model, impl), (reference, "single")):
        if own is not None:
            m.to(memory_format=own)
        m.load_state_dict(checkpoint["model"])
        o = H3Optimizer(m.parameters(), **KW)
        _load(o, copy.deepcopy(checkpoint["opt"]), name)
        opts.append(o)
    _assert_laid_out_like_the_parameters(opts[0])
    _steps(model, opts[0], 4)
    _steps(reference, opts[1], 4)
    _assert_same(model, reference)
