"""Measuring activation memory: the bytes autograd keeps for the backward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, *inputs: Any) -> int:
    """Bytes of tensors autograd saves for backward during one forward of ``model``.

    This is the activation memory a training step holds between forward and backward,
    counted exactly through ``torch.autograd.graph.saved_tensors_hooks`` (parameters that are
    saved count too; the same tensor saved twice counts twice).
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total
