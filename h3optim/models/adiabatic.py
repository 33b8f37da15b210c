"""Reversible ("adiabatic") processing: additive coupling and a backward that recomputes.

``AdiabaticProcessingUnit`` splits features in two halves and applies the RevNet coupling

    y₁ = x₁ + F(x₂)/T,   y₂ = x₂ + G(y₁)/T,

which is exactly invertible: x₂ = y₂ − G(y₁)/T, x₁ = y₁ − F(x₂)/T. ``ReversibleStack`` runs a
stack of units inside one autograd function that keeps only the stack's output: in backward
it reconstructs each unit's input from its output and recomputes that unit, so activation
memory does not grow with depth (one unit's recomputation at a time).

A unit's "energy" is the change in squared activation norm per sample, ‖y‖² − ‖x‖² (mean
over the batch), recorded detached (no graph is kept across steps); the stack's total is
also available differentiably from its input and output.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn


class AdiabaticProcessingUnit(nn.Module):
    """One reversible additive-coupling block on ``dim`` (even) features.

    Args:
        dim: Feature width (split in two halves).
        temperature: T: the coupling functions' outputs are divided by it.
    """

    def __init__(self, dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        if temperature <= 0:
            raise ValueError(f"Invalid temperature: {temperature}")
        h = dim // 2
        self.f = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, h))
        self.g = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, h))
        self.temperature = temperature
        self.last_energy: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        y1 = x1 + self.f(x2) / self.temperature
        y2 = x2 + self.g(y1) / self.temperature
        y = torch.cat([y1, y2], dim=-1)
        with torch.no_grad():
            self.last_energy = float(((y * y).sum(-1) - (x * x).sum(-1)).mean())
        return y

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y.chunk(2, dim=-1)
        x2 = y2 - self.g(y1) / self.temperature
        x1 = y1 - self.f(x2) / self.temperature
        return torch.cat([x1, x2], dim=-1)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, stack: ReversibleStack, *params: Tensor) -> Tensor:
        ctx.stack = stack
        # the parameters to differentiate: the trainable ones, as ReversibleStack hands them
        ctx.param_ids = [id(p) for p in params]
        with torch.no_grad():
            y = x
            for unit in stack.unit_list():
                y = unit(y)
        ctx.save_for_backward(y.detach())  # the only activation kept
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Any:
        (y,) = ctx.saved_tensors
        stack: ReversibleStack = ctx.stack
        # only the parameters forward was handed: autograd.grad refuses a frozen one (it
        # does not require grad), and a frozen unit still passes its input's gradient on
        wanted = set(ctx.param_ids)
        grads = {
            id(p): torch.zeros_like(p)
            for unit in stack.unit_list()
            for p in unit.parameters()
            if id(p) in wanted
        }
        for unit in reversed(stack.unit_list()):
            x = unit.inverse(y)
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(True)
                out = unit(x_)
                unit_params = [p for p in unit.parameters() if id(p) in wanted]
                got = torch.autograd.grad(out, [x_, *unit_params], grad_y)
            grad_y = got[0]
            for p, g in zip(unit_params, got[1:], strict=True):
                grads[id(p)] += g
            y = x
        return (grad_y, None, *[grads[i] for i in ctx.param_ids])


class ReversibleStack(nn.Module):
    """Units applied in sequence; with ``memory_saving`` the backward recomputes from outputs.

    Args:
        units: The reversible units.
        memory_saving: Keep only the output (True) or let autograd store everything (False).
    """

    def __init__(self, units: list[AdiabaticProcessingUnit], memory_saving: bool = True) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.memory_saving = memory_saving
        self.energy: Tensor | None = None

    def unit_list(self) -> list[AdiabaticProcessingUnit]:
        return [cast(AdiabaticProcessingUnit, u) for u in self.units]

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_saving and torch.is_grad_enabled():
            # the trainable parameters only: a frozen unit (fine-tuning) has no gradient to give
            params = [p for unit in self.units for p in unit.parameters() if p.requires_grad]
            y = _ReversibleFunction.apply(x, self, *params)  # type: ignore[no-untyped-call]
        else:
            y = x
            for unit in self.unit_list():
                y = unit(y)
        # differentiable total energy of the stack from its input and output only
        self.energy = ((y * y).sum(-1) - (x * x).sum(-1)).mean()
        return y  # type: ignore[no-any-return]

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        for unit in reversed(self.unit_list()):
            y = unit.inverse(y)
        return y
