"""``LosslessIntegrationLayer``: self-attention mixed with its input by a preservation gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LosslessIntegrationLayer(nn.Module):
    """``x·P + attend(x)·(1 − P)``, P = sigmoid(W x + b) per feature.

    Works on batched sequences ``(B, T, dim)`` and on flat features ``(B, dim)`` (treated as
    a sequence of one token, where attention reduces to its value/output projections). At
    initialisation P ≈ 0.73 (bias 1): the layer starts close to the identity, so nothing is
    lost before it has learned what to integrate.

    Args:
        dim: Feature width.
        num_heads: Attention heads (must divide ``dim``).
    """

    def __init__(self, dim: int, num_heads: int = 2) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.preserve = nn.Linear(dim, dim)
        nn.init.constant_(self.preserve.bias, 1.0)
        self.last_preservation: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        flat = x.dim() == 2
        seq = x.unsqueeze(1) if flat else x
        attended, _ = self.attn(seq, seq, seq, need_weights=False)
        p = torch.sigmoid(self.preserve(seq))
        with torch.no_grad():
            self.last_preservation = float(p.mean())
        out: Tensor = seq * p + attended * (1 - p)
        return out.squeeze(1) if flat else out
