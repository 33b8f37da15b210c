"""Update math of H3Optimizer: a per-tensor reference, a multi-tensor and a fused path.

``_single_tensor_h3`` is the reference. ``_multi_tensor_h3`` does the same update with
``torch._foreach_*`` over a list of tensors that share one device and dtype, and ``_fused_h3``
hands it to PyTorch's fused AdamW kernel. ``group_by_device_and_dtype`` buckets tensors the way
the two fast paths need them, and ``mark_nonfinite`` decides the non-finite skip for a whole
list in one kernel without a host-device synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Device types whose PyTorch build has the fused AdamW kernel and on which it was tested.
FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda"})
FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def fused_supported(p: Tensor) -> bool:
    """Whether the fused AdamW kernel can update ``p``."""
    return p.device.type in FUSED_DEVICE_TYPES and p.dtype in FUSED_DTYPES


def group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> dict[tuple[str, torch.dtype], list[int]]:
    """Indices of ``tensors`` bucketed by (device, dtype), in first-seen order.

    Multi-tensor kernels need every list they take on one device with one dtype.
    """
    buckets: dict[tuple[str, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((str(t.device), t.dtype), []).append(i)
    return buckets


def mark_nonfinite(grads: list[Tensor], found_inf: Tensor) -> None:
    """Set ``found_inf`` (a one-element float32 tensor on the grads' device) to 1.0 if any
    gradient holds a NaN or an infinity; leave it untouched otherwise.

    One multi-tensor kernel (the one ``torch.amp.GradScaler`` uses, with a unit scale, so the
    gradients are rewritten with their own values) and no host-device synchronisation.
    Unlike a norm, it cannot overflow: a finite gradient is never taken for an infinite one.
    """
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, _ONE[found_inf.device])


class _Ones(dict[torch.device, Tensor]):
    """A unit scale per device, created once (a fresh one per step would be a host copy)."""

    def __missing__(self, device: torch.device) -> Tensor:
        one = torch.ones((), dtype=torch.float32, device=device)
        self[device] = one
        return one


_ONE = _Ones()


def _single_tensor_h3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    steps: Sequence[Tensor | float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    finite: Tensor,
) -> None:
    """The reference: one Adam-family step of size ``lr``, applied only where ``finite`` (a
    0-dim bool tensor) is true: a non-finite gradient leaves parameters and moments untouched
    without a host-device synchronisation. ``steps`` holds each parameter's own count (this
    step included; CPU tensors or numbers): its bias correction, as in ``torch.optim.Adam``."""
    for p, g, m, v, count in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step = float(count)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
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


def _multi_tensor_h3(
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
    found_inf: Tensor,
    host_skip: bool | None = None,
) -> None:
    """The reference update with ``torch._foreach_*`` over tensors of one device and dtype
    whose step counts are all ``step`` (this step included).

    ``found_inf`` (one float32 element, 1.0 = skip) decides the skip. On the CPU the flag is
    read from memory (there is no device to wait for) and a skipped step does no work. On an
    accelerator (``host_skip=False``) the step is masked arithmetically, without a sync: the
    gradients are made finite as ``g ** keep`` (exactly ``g`` when ``keep = 1``, exactly 1
    when ``keep = 0``, NaN included), and the moment and parameter updates are scaled by
    ``keep``, so a skipped step adds exact zeros.
    """
    if host_skip is None:
        host_skip = found_inf.device.type == "cpu"
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    if host_skip:
        if found_inf.item():  # a CPU tensor: a memory read, not a synchronisation
            return
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bc1)
        return
    keep = 1 - found_inf
    safe = torch._foreach_pow(grads, [keep] * len(grads))
    delta = torch._foreach_sub(safe, exp_avgs)
    torch._foreach_mul_(delta, keep * (1 - beta1))
    torch._foreach_add_(exp_avgs, delta)
    torch._foreach_mul_(safe, safe)
    torch._foreach_sub_(safe, exp_avg_sqs)
    torch._foreach_mul_(safe, keep * (1 - beta2))
    torch._foreach_add_(exp_avg_sqs, safe)
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, 1 / bc1)
    if weight_decay != 0:
        torch._foreach_add_(update, params, alpha=weight_decay)
    torch._foreach_mul_(update, keep * lr)
    torch._foreach_sub_(params, update)


def _fused_h3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: Tensor,
) -> None:
    """The reference update in PyTorch's fused AdamW kernel (one pass over each tensor).

    The update is the same function: p ← p·(1 − lr·wd) − (lr/bc₁)·m/(√v/√bc₂ + ε) equals
    p − lr·(m̂/(√v̂ + ε) + wd·p); only the order of the float operations differs. ``steps``
    holds, per parameter, a float32 tensor on the kernel's device with that parameter's
    bias-correction step (its own count, as in the reference; one tensor may serve several
    parameters with the same count); the kernel does not advance them. With ``found_inf`` =
    1.0 the kernel returns before touching any tensor, with no host-device synchronisation.

    Traced by ``torch.compile`` (``torch.compile(opt.step)``) the kernel fails Inductor's
    functionalization in torch 2.13 (an internal assert), so there the reference takes its
    place. The check sits here, in the frame that would trace the kernel: dynamo may run a
    caller eagerly (after a graph break) and still compile this function on its own.
    """
    if torch.compiler.is_compiling():
        _single_tensor_h3(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps=steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            finite=found_inf == 0,
        )
        return
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=found_inf,
    )


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
    dg2, dx2 = _single_tensor_curvature(grads_now, grads_then, params_now, params_then, metric)
    return lipschitz_from_sums(dg2, dx2)


def lipschitz_from_sums(dg2: Tensor, dx2: Tensor) -> Tensor:
    """L̂ from Σ‖Δg‖²_{D⁻¹} and Σ‖Δθ‖²_D (0-dim tensors, no sync)."""
    return dg2.sqrt() / dx2.sqrt().clamp_min(1e-30)


def _single_tensor_curvature(
    grads_now: list[Tensor],
    grads_then: list[Tensor],
    params_now: list[Tensor],
    params_then: list[Tensor],
    metric: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """The reference: Σ‖Δg‖²_{D⁻¹} and Σ‖Δθ‖²_D, one tensor at a time."""
    dg2 = torch.stack(
        [((a - b) ** 2 / d).sum() for a, b, d in zip(grads_now, grads_then, metric, strict=True)]
    ).sum()
    dx2 = torch.stack(
        [((a - b) ** 2 * d).sum() for a, b, d in zip(params_now, params_then, metric, strict=True)]
    ).sum()
    return dg2, dx2


def _multi_tensor_curvature(
    grads_now: list[Tensor],
    grads_then: list[Tensor],
    params_now: list[Tensor],
    params_then: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    beta2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Σ‖Δg‖²_{D⁻¹} and Σ‖Δθ‖²_D over one device/dtype bucket, as 0-dim tensors.

    Destroys ``grads_then`` and ``params_then`` (the probe's own gradients and the old
    snapshot, both dead afterwards): they hold Δg² and Δθ² in place, so the only allocation
    is the metric D.
    """
    bc2 = 1 - beta2 ** max(step, 1)
    metric = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(metric)
    torch._foreach_add_(metric, eps)
    torch._foreach_sub_(grads_then, grads_now)
    torch._foreach_mul_(grads_then, grads_then)
    torch._foreach_div_(grads_then, metric)
    torch._foreach_sub_(params_then, params_now)
    torch._foreach_mul_(params_then, params_then)
    torch._foreach_mul_(params_then, metric)
    # the terms are non-negative, so each tensor's 1-norm is its sum (at least in float32)
    acc = torch.promote_types(exp_avg_sqs[0].dtype, torch.float32)
    dg2 = torch.stack(torch._foreach_norm(grads_then, 1, dtype=acc)).sum()
    dx2 = torch.stack(torch._foreach_norm(params_then, 1, dtype=acc)).sum()
    return dg2, dx2
