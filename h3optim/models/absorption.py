"""How much a model has absorbed about the labels, in bits, and per joule.

The estimate is the variational lower bound on mutual information

    I(X; Y) ≥ H(Y) − CE,

with H(Y) the entropy of the label distribution of the data and CE the model's cross-entropy
on it, both in bits. It holds for any model q(y|x) because CE = H(Y|X) + E[KL(p‖q)] ≥ H(Y|X).
A perfect classifier reaches H(Y); a model no better than the label prior gets ≈ 0 (and a
worse one goes negative: the bound is reported as is, not clamped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from h3optim._modes import evaluating

LN2 = math.log(2.0)


@torch.no_grad()
def compute_absorption_efficiency(
    model: nn.Module,
    dataloader: Iterable[Any],
    energy_j: float | None = None,
    profiler: Any = None,
    *,
    energy_source: str | None = None,
) -> dict[str, Any]:
    """Bits absorbed about the labels (per sample and in total), and bits per joule.

    Args:
        model: Maps inputs to logits.
        dataloader: Batches ``(x, y)`` or ``(x, y, index)``.
        energy_j: Energy spent training (J), if known.
        profiler: Anything with ``energy_j() -> float | None`` (an ``h3client.H3Profiler``),
            used when ``energy_j`` is not given.
        energy_source: Provenance of the energy figure, reported as is.

    Returns:
        ``h_y_bits``, ``ce_bits``, ``bits_per_sample`` (= H(Y) − CE), ``total_bits``,
        ``samples``, ``energy_j``, ``energy_source``, ``bits_per_joule``.
    """
    ce_nats = 0.0
    counts: dict[int, int] = {}
    n = 0
    with evaluating(model):  # after, a module the caller froze in eval mode stays so
        for batch in dataloader:
            x, y = batch[0], batch[1]
            logits = model(x)
            ce_nats += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            for label, c in zip(*torch.unique(y, return_counts=True), strict=True):
                counts[int(label)] = counts.get(int(label), 0) + int(c)
            n += len(y)
    if n == 0:
        raise ValueError("the dataloader yielded no samples")
    h_y = -sum((c / n) * math.log2(c / n) for c in counts.values())
    ce_bits = ce_nats / n / LN2
    per_sample = h_y - ce_bits
    if energy_j is None and profiler is not None:
        energy_j = profiler.energy_j()
    total = per_sample * n
    return {
        "h_y_bits": h_y,
        "ce_bits": ce_bits,
        "bits_per_sample": per_sample,
        "total_bits": total,
        "samples": n,
        "energy_j": energy_j,
        "energy_source": energy_source,
        "bits_per_joule": (total / energy_j) if energy_j else None,
    }
