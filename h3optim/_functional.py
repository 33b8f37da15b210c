"""Per-tensor update math of H3Optimizer (pure functions over lists of tensors)."""

from __future__ import annotations

import torch
from torch import Tensor


def _single_tensor_h3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    finite: Tensor,
) -> None:
    """One Adam-family step of size ``lr``, applied only where ``finite`` (a 0-dim bool
    tensor) is true: a non-finite gradient leaves parameters and moments untouched without
    a host-device synchronisation."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = torch.where(finite, g, torch.zeros_like(g))
        m_new = m * beta1 + g * (1 - beta1)
        v_new = v * beta2 + g * g * (1 - beta2)
        m.copy_(torch.where(finite, m_new, m))
        v.copy_(torch.where(finite, v_new, v))
        denom = (v / bc2).sqrt_().add_(eps)
        update = (m / bc1) / denom
        if weight_decay != 0:
            update = update + weight_decay * p
        p.sub_(torch.where(finite, lr * update, torch.zeros_like(update)))


def preconditioner(
    exp_avg_sqs: list[Tensor], *, step: int, beta2: float, eps: float
) -> list[Tensor]:
    """D = sqrt(v̂) + eps per tensor: the metric Adam's step is taken in."""
    bc2 = 1 - beta2 ** max(step, 1)
    return [(v / bc2).sqrt() + eps for v in exp_avg_sqs]


def lipschitz_estimate(
    grads_now: list[Tensor],
    grads_then: list[Tensor],
    params_now: list[Tensor],
    params_then: list[Tensor],
    metric: list[Tensor],
) -> Tensor:
    """L̂ = ‖Δg‖_{D⁻¹} / ‖Δθ‖_D as a 0-dim tensor (no sync): the curvature along the last
    displacement, measured in the preconditioner's metric D, so that γ/L̂ is a stable step
    for the preconditioned update actually taken."""
    dg2 = torch.stack(
        [((a - b) ** 2 / d).sum() for a, b, d in zip(grads_now, grads_then, metric, strict=True)]
    ).sum()
    dx2 = torch.stack(
        [((a - b) ** 2 * d).sum() for a, b, d in zip(params_now, params_then, metric, strict=True)]
    ).sum()
    return dg2.sqrt() / dx2.sqrt().clamp_min(1e-30)
