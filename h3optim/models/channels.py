"""``ThrottledInformationChannel``: a bottleneck whose units open by a learned flow rate."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ThrottledInformationChannel(nn.Module):
    """A bottleneck of ``k = max(1, round(bottleneck_ratio · in_dim))`` units, each passed
    through a learned, input-dependent gate in (0, 1).

    ``flow`` (the mean gate activity of the last forward, a differentiable tensor) is what a
    loss can put a price on: a closed gate carries no information.

    Args:
        in_dim: Input features.
        out_dim: Output features.
        bottleneck_ratio: Bottleneck width relative to ``in_dim``, in (0, 1].
    """

    def __init__(self, in_dim: int, out_dim: int, bottleneck_ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < bottleneck_ratio <= 1.0:
            raise ValueError(f"Invalid bottleneck_ratio: {bottleneck_ratio}")
        k = max(1, round(bottleneck_ratio * in_dim))
        self.encode = nn.Linear(in_dim, k)
        self.gate = nn.Linear(in_dim, k)
        self.decode = nn.Linear(k, out_dim)
        self.flow: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gate(x))
        self.flow = gate.mean()
        out: Tensor = self.decode(torch.tanh(self.encode(x)) * gate)
        return out
