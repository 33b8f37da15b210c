"""A model in eval mode for a while, each of its modules left in the mode it was in after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside; after, each of its modules in the mode it was in (a
    model fine-tuned with some modules in eval mode, or all, is left so), its flag restored
    as Lightning's ``_ModuleMode`` does. ``model.train(was_training)`` would put a frozen
    batch-norm back in train mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
