"""NGDT copied and pickled: a copy of the optimizer carries its state and hooks its own
layers; a copy of a hooked model (``torch.save(model)``) holds inert hooks."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from h3optim import NGDT


def _model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # two covered Linear layers and a LayerNorm the fallback (Adam) steps
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.randn(64, 8), torch.randint(0, 4, (64,))


def _ngdt(model: nn.Module) -> NGDT:
    return NGDT(model, lr_max=0.5, q_budget=1e-3, factor_update_steps=2, inv_update_steps=2)


def _train(model: nn.Module, opt: NGDT, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _deepcopy(obj: Any) -> Any:
    return copy.deepcopy(obj)


def _torch_save_load(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("copier", [_deepcopy, _torch_save_load], ids=["deepcopy", "pickle"])
def test_a_copy_of_model_and_optimizer_continues_bitwise(copier: Callable[[Any], Any]) -> None:
    model, x, y = _model_and_batch()
    opt = _ngdt(model)
    _train(model, opt, x, y, 3)
    model2, opt2 = copier((model, opt))
    assert opt2.steps == 3 and opt2.total_predicted_q == opt.total_predicted_q
    assert [layer.module for layer in opt2.layers] == [model2[0], model2[3]]
    _train(model, opt, x, y, 4)
    _train(model2, opt2, x, y, 4)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.steps == opt.steps == 7
    assert opt2.last_stats == opt.last_stats and opt2.last_stats["bound"] != "fallback"
    for a, b in zip(opt.layers, opt2.layers, strict=True):
        assert a.A is not None and b.A is not None and torch.equal(a.A, b.A)


def test_a_deep_copied_optimizer_carries_its_state_and_hooks_its_layers_copies() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    opt = _ngdt(model)
    _train(model, opt, x, y, 3)
    opt2 = copy.deepcopy(opt)
    for o in (opt, opt2):
        o.zero_grad()
        o.step()  # a step without gradients (the copy's raised AttributeError)
    assert (opt2.steps, opt2.eig_failures, opt2.inv_update_steps) == (4, 0, 2)
    # as a torch optimizer's copy, it holds copies of the parameters (here, of the layers)
    first, last = (layer.module for layer in opt2.layers)
    assert first.weight is opt2.param_groups[0]["params"][0]
    assert first.weight is not model[0].weight
    model2 = nn.Sequential(first, nn.Tanh(), last)
    _train(model, opt, x, y, 3)
    _train(model2, opt2, x, y, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.last_stats == opt.last_stats and opt2.last_stats["bound"] != "fallback"


def test_a_hooked_model_saves_whole_and_its_copy_does_not_feed_the_optimizer() -> None:
    model, x, y = _model_and_batch()
    opt = _ngdt(model)
    _train(model, opt, x, y, 2)
    loaded = _torch_save_load(model)
    # the loaded model trains and its forwards record nothing for the original optimizer
    opt.zero_grad()
    nn.functional.cross_entropy(loaded(x), y).backward()
    assert all(layer.a_gram is None for layer in opt.layers)
    # a new NGDT on it trains as on a model never hooked, with the same weights
    fresh, _, _ = _model_and_batch()
    fresh.load_state_dict(loaded.state_dict())
    loaded.zero_grad()
    for m in (loaded, fresh):
        _train(m, _ngdt(m), x, y, 3)
    for p, q in zip(loaded.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    _train(model, opt, x, y, 1)  # the original pair trains on
    assert opt.last_stats["bound"] != "fallback"


def test_pickling_carries_every_attribute_ngdt_adds_to_a_torch_optimizer() -> None:
    model, _, _ = _model_and_batch()
    opt = _ngdt(model)
    torch_attrs = set(vars(torch.optim.SGD([torch.zeros(1, requires_grad=True)])))
    assert set(vars(opt)) - torch_attrs == set(NGDT._OWN_STATE)
