"""The digits (scikit-learn's 1 797 images of 8×8) as tensors, and one training step's
closure over them: what the optimizer tests train their small MLPs on."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    return torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)


def digits_closure(
    opt: torch.optim.Optimizer, model: nn.Module, t: int
) -> Callable[[], torch.Tensor]:
    """Step ``t``'s closure: the next 64 digits (cycling), cross-entropy, backward."""
    xs, ys = digits()
    b = slice(t * 64 % 1728, t * 64 % 1728 + 64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xs[b]), ys[b])
        loss.backward()
        return loss

    return closure
