"""``H3Optimizer``: an Adam-family update whose step size follows the local smoothness."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from h3optim._functional import _single_tensor_h3, lipschitz_estimate, preconditioner


class H3Optimizer(Optimizer):
    """Adam with a Lipschitz-adaptive step: η ← min(η_max, growth·η, γ / (L̂ + ε_L)).

    Every ``lipschitz_update_interval`` steps the optimizer re-evaluates the closure at the
    point it was at ``lipschitz_update_interval`` steps ago, **on the current minibatch**, so
    the gradient difference measures curvature rather than the noise between two different
    minibatches (which, measured, drives the naive estimate's step to zero). The estimate
    L̂ = ‖Δg‖_{D⁻¹}/‖Δθ‖_D is taken in Adam's own metric D = √v̂ + ε, smoothed by an EMA in log
    space, and the step may grow by at most ``max_growth`` per update (as AdGD does). The
    extra forward/backward costs 1/``lipschitz_update_interval`` of the training compute;
    there is one host-device synchronisation per interval and none otherwise.

    ``lr`` is the starting step; ``lr_max`` (default ``10·lr``) caps it. Without a closure the
    step stays at its current value (plain Adam). Non-finite gradients skip the step for all
    parameters (counted in ``skipped_steps``) and leave the moments untouched.

    Args:
        params: Parameters or parameter groups.
        lr: Initial step size.
        betas: Adam's moment coefficients.
        eps: Adam's denominator term.
        weight_decay: Decoupled (AdamW-style) weight decay.
        lipschitz_safety: γ: the fraction of 1/L̂ taken as the step.
        lipschitz_update_interval: Steps between curvature estimates.
        lr_max: Upper bound on the step (default ``10·lr``).
        lr_min: Lower bound on the step (default ``lr/100``): the step cannot collapse.
        max_growth: Largest factor the step may grow by per update.
        lipschitz_smoothing: EMA weight of the newest log L̂.

    Example:
        >>> opt = H3Optimizer(model.parameters(), lr=1e-3)  # doctest: +SKIP
        >>> def closure():
        ...     opt.zero_grad(); loss = criterion(model(x), y); loss.backward(); return loss
        >>> opt.step(closure)  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lipschitz_safety: float = 0.9,
        lipschitz_update_interval: int = 10,
        lr_max: float | None = None,
        lr_min: float | None = None,
        max_growth: float = 1.5,
        lipschitz_smoothing: float = 0.3,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if not eps > 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 < lipschitz_safety <= 2.0:
            raise ValueError(f"Invalid lipschitz_safety: {lipschitz_safety}")
        if lipschitz_update_interval < 1:
            raise ValueError(f"Invalid lipschitz_update_interval: {lipschitz_update_interval}")
        if max_growth < 1.0:
            raise ValueError(f"Invalid max_growth: {max_growth}")
        if not 0.0 < lipschitz_smoothing <= 1.0:
            raise ValueError(f"Invalid lipschitz_smoothing: {lipschitz_smoothing}")
        lr_max = 10.0 * lr if lr_max is None else lr_max
        lr_min = lr / 100.0 if lr_min is None else lr_min
        if not lr_min <= lr <= lr_max:
            raise ValueError(f"need lr_min <= lr <= lr_max, got {lr_min}, {lr}, {lr_max}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "lipschitz_safety": lipschitz_safety,
            "lipschitz_update_interval": lipschitz_update_interval,
            "lr_max": lr_max,
            "lr_min": lr_min,
            "max_growth": max_growth,
            "lipschitz_smoothing": lipschitz_smoothing,
        }
        super().__init__(params, defaults)
        self.lr_history: list[float] = []  # the step after each curvature update
        self.lipschitz_history: list[float] = []

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lr_min", group["lr"] / 100.0)
            group.setdefault("lr_max", 10.0 * group["lr"])
            group.setdefault("max_growth", 1.5)
            group.setdefault("lipschitz_smoothing", 0.3)
            group.setdefault("lipschitz_safety", 0.9)
            group.setdefault("lipschitz_update_interval", 10)

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        params, grads, ms, vs = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("H3Optimizer does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)  # kept on CPU, as AdamW
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["skipped"] = torch.zeros((), dtype=torch.int64, device=p.device)
            params.append(p)
            grads.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        return params, grads, ms, vs

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/inf (reads a device counter)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "skipped" in self.state[p]:
                    return int(self.state[p]["skipped"].item())
        return 0

    def _curvature_update(
        self, group: dict[str, Any], params: list[torch.Tensor], closure: Callable[[], Any]
    ) -> None:
        """Re-evaluate the closure at the snapshot point and adapt the step (one sync)."""
        snaps = [self.state[p].get("snapshot") for p in params]
        if any(s is None for s in snaps):
            for p in params:
                self.state[p]["snapshot"] = p.detach().clone()
            return
        grads_now = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        params_now = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, snaps, strict=True):
                p.copy_(s)
        with torch.enable_grad():
            closure()
        grads_then = [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]
        with torch.no_grad():
            for p, now, g in zip(params, params_now, grads_now, strict=True):
                p.copy_(now)
                p.grad.copy_(g)  # type: ignore[union-attr]
        state0 = self.state[params[0]]
        beta2 = group["betas"][1]
        metric = preconditioner(
            [self.state[p]["exp_avg_sq"] for p in params],
            step=int(state0["step"].item()),
            beta2=beta2,
            eps=group["eps"],
        )
        lhat = float(
            lipschitz_estimate(grads_now, grads_then, params_now, snaps, metric).item()
        )  # the sync
        for p, now in zip(params, params_now, strict=True):
            self.state[p]["snapshot"] = now
        if not math.isfinite(lhat) or lhat <= 0:
            return
        prev = group.get("lipschitz_log")
        alpha = group["lipschitz_smoothing"]
        log_l = math.log(lhat) if prev is None else (1 - alpha) * prev + alpha * math.log(lhat)
        group["lipschitz_log"] = log_l
        target = group["lipschitz_safety"] / (math.exp(log_l) + 1e-12)
        new_lr = min(group["lr_max"], group["lr"] * group["max_growth"], target)
        group["lr"] = max(group["lr_min"], new_lr)
        self.lr_history.append(group["lr"])
        self.lipschitz_history.append(math.exp(log_l))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step. With a closure, every ``lipschitz_update_interval`` steps the step
        size adapts (the closure is then called twice); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs = self._init_group(group)
            if not params:
                continue
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            step_no = int(self.state[params[0]]["step"].item()) + 1  # a CPU tensor: no sync
            if closure is not None and step_no % group["lipschitz_update_interval"] == 0:
                self._curvature_update(group, params, closure)
                grads = [p.grad for p in params]  # type: ignore[misc]
            state0 = self.state[params[0]]
            for p in params:
                st = self.state[p]
                st["step"] += 1
                st["skipped"] += (~finite).long()
            beta1, beta2 = group["betas"]
            _single_tensor_h3(
                params,
                grads,
                ms,
                vs,
                step=int(state0["step"].item()),
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                finite=finite,
            )
            if closure is not None and "snapshot" not in state0:
                for p in params:
                    self.state[p]["snapshot"] = p.detach().clone()
        return loss
