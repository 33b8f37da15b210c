"""``H3Optimizer``: an Adam-family update whose step size follows the local smoothness."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import is_not as _is_not
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from h3optim._functional import (
    _fused_h3,
    _multi_tensor_curvature,
    _multi_tensor_h3,
    _single_tensor_curvature,
    _single_tensor_h3,
    fused_supported,
    lipschitz_from_sums,
    mark_nonfinite,
    preconditioner,
)

#: A probe that finds γ/L̂ at least this many times the ceiling ``lr_max`` (the step at the
#: ceiling) lets the next probe wait twice as long (measured: the MNIST MLP, the small CNN
#: and MNIST-1D keep γ/L̂ at 1.3–1.9× the ceiling at their lowest and 2–4× at their median,
#: and their steps never leave the ceiling; docs/optim.md).
HEADROOM = 1.5
#: The default ``lipschitz_max_interval``, in multiples of ``lipschitz_update_interval``.
MAX_INTERVAL_FACTOR = 8

_T = TypeVar("_T")

#: State tensors laid out like their parameter: the fused kernel pairs the elements of a
#: parameter and of its moments by memory position, not by index
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "snapshot")
#: h3-optimizer 0.2.0's per-parameter buffers, which nothing reads any more
_LEGACY_STATE = ("prev_grad", "prev_params")


@dataclass(slots=True)
class _Bucket:
    """One group's parameters that share a device and dtype, with their state tensors."""

    device: torch.device
    impl: str  # "single" | "foreach" | "fused"
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    #: None when every parameter's step count is the same (the common case); else the
    #: indices grouped by count, the highest count first (set by ``_bind_counters``)
    runs: list[list[int]] | None = None

    def counted_runs(self) -> list[tuple[list[int] | None, int]]:
        """(indices, step count) per run of parameters with one count; indices ``None``:
        the whole bucket. Reads CPU tensors: no sync."""
        if self.runs is None:
            return [(None, int(self.steps[0].item()))]
        return [(run, int(self.steps[run[0]].item())) for run in self.runs]


@dataclass(slots=True)
class _Counters:
    """A bucket's step counters as views of one tensor (see ``_bind_counters``)."""

    ids: tuple[int, ...]
    counts: Tensor
    views: list[Tensor]
    runs: list[list[int]] | None
    #: a fused bucket's parameters' strides when its state was last laid out like them
    strides: list[tuple[int, ...]] | None = None


def _runs(values: list[float]) -> list[list[int]] | None:
    """Indices grouped by equal value, the highest first; ``None`` if all are equal."""
    if all(v == values[0] for v in values):
        return None
    by_count: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        by_count.setdefault(v, []).append(i)
    return [by_count[v] for v in sorted(by_count, reverse=True)]


def _pick(items: list[_T], idx: list[int] | None) -> list[_T]:
    return items if idx is None else [items[i] for i in idx]


def _match_layout(state: dict[str, Any], p: Tensor) -> None:
    """Re-lay each of ``state``'s parameter-shaped tensors whose strides differ from ``p``'s
    as a copy with ``p``'s strides (same values at the same indices)."""
    for key in _PARAM_SHAPED:
        t = state.get(key)
        if isinstance(t, Tensor) and t.stride() != p.stride():
            state[key] = torch.empty_like(p, dtype=t.dtype, device=t.device).copy_(t)


class H3Optimizer(Optimizer):
    """Adam with a Lipschitz-adaptive step: η ← min(η_max, growth·η, γ / (L̂ + ε_L)).

    Every ``lipschitz_update_interval`` steps the optimizer re-evaluates the closure at the
    point it was at ``lipschitz_update_interval`` steps ago, **on the current minibatch**, so
    the gradient difference measures curvature rather than the noise between two different
    minibatches (which, measured, drives the naive estimate's step to zero). The estimate
    L̂ = ‖Δg‖_{D⁻¹}/‖Δθ‖_D is taken in Adam's own metric D = √v̂ + ε, smoothed by an EMA in log
    space, and the step may grow by at most ``max_growth`` per update (as AdGD does). The
    extra forward/backward costs 1/``lipschitz_update_interval`` of the training compute;
    there is one host-device synchronisation per interval (for all groups together: one
    probe call moves every group that is due) and none otherwise. While the step sits at its
    ceiling with room to spare (γ/L̂ at least ``HEADROOM`` × ``lr_max``), the probe can only
    confirm it, so the interval doubles after each such probe, up to
    ``lipschitz_max_interval``; a probe that finds less room, or lowers the step, sets it
    back to ``lipschitz_update_interval``. Between probes the step stays where it is, at most
    ``lr_max`` (by default ``lr``: Adam's step at the same ``lr``). The probe keeps two
    parameter-sized buffers per parameter (the snapshot, which is part of the state_dict,
    and a scratch copy, which is not), allocated once and reused.

    ``lr`` is the starting step and, by default, also its ceiling (``lr_max``): the measured
    smoothness then only ever lowers the step below ``lr`` where the loss is too curved for
    it. In a stochastic setting γ/L̂ is a stability bound, far above the step that
    generalises best (measured: on MNIST, an MLP whose step was allowed to grow to 10·lr sat
    at 10·lr and ended 1.6 points below Adam at lr); pass a larger ``lr_max`` to let it grow.
    Without a closure the step stays at its current value (plain Adam).

    An LR scheduler (or ``group["lr"] = x``) sets the step as it does Adam's: the next step
    sees that ``group["lr"]`` is not the step the optimizer left there, and the group's
    nominal step (``lr_nominal``) and its bounds scale with the change, keeping their ratios,
    so the probes adapt within the schedule. Without a closure the step is the scheduler's;
    with one it is never above the scheduler's step (× ``lr_max``/``lr``). Whether a
    scheduler multiplied the step the probe left (StepLR, CosineAnnealingLR) or set its own
    value (OneCycleLR, LambdaLR) cannot be told from the number, so the change is read the
    way that gives the lower bounds: after a probe lowered the step, a multiplying scheduler
    carries the lowering on (as torch chains schedulers), and one setting its own values is
    followed exactly between probes. The probe works under ``torch.autocast`` (it clears
    autocast's weight cache around its closure).

    A group's ``step_scale`` (1 when absent) multiplies the step taken, leaving ``lr``, its
    bounds and any scheduler's view of them as they are; the curvature bound applies to the
    step taken (lr × step_scale). :class:`~h3optim.AutoH3` sets it to compensate the steps
    a sampled epoch leaves out (its ``lr_compensation``).

    A NaN or infinite gradient anywhere skips the whole step: parameters and moments of
    every group are left unchanged, the step counters still advance, and the skip is counted
    in ``skipped_steps`` (a device counter, read only when asked). The decision is taken on
    the device, without a synchronisation.

    Implementations (``foreach`` and ``fused`` have ``torch.optim.Adam``'s meaning):

    - ``fused``: PyTorch's fused AdamW kernel (one pass per tensor; CPU and CUDA, floating
      dtypes). It computes exactly this update, p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε), with the
      operations in another order (agreement to float tolerance is tested), and skips a
      non-finite step inside the kernel.
    - ``foreach``: ``torch._foreach_*`` over each group's tensors bucketed by device and dtype.
    - ``foreach=False``: the per-tensor reference loop (slow; kept as the specification).

    With both left at ``None`` each bucket takes ``fused`` where the kernel exists and
    ``foreach`` elsewhere: measured on the CPU (benchmarks/results/optimizer_step.md) the
    fused step is the fastest, unlike torch's Adam whose CPU default is the per-tensor loop;
    on CUDA PyTorch documents the fused kernels as its fastest. Apart from the fused kernel,
    the only per-parameter Python on the hot path is gathering gradients and state into
    lists, as ``torch.optim.Adam`` does.

    Args:
        params: Parameters or parameter groups.
        lr: Initial step size.
        betas: Adam's moment coefficients.
        eps: Adam's denominator term.
        weight_decay: Decoupled (AdamW-style) weight decay.
        lipschitz_safety: γ: the fraction of 1/L̂ taken as the step.
        lipschitz_update_interval: Steps between curvature estimates (the shortest
            interval).
        lipschitz_max_interval: Longest interval between curvature estimates while the step
            sits at its ceiling with room to spare (default 8 × ``lipschitz_update_interval``;
            equal to it: a fixed interval).
        lr_max: Upper bound on the step (default: each group's own ``lr``).
        lr_min: Lower bound on the step (default: each group's own ``lr``/100): the step
            cannot collapse. A parameter group may give its own ``lr_max``/``lr_min``; every
            group needs ``lr_min <= lr <= lr_max``.
        max_growth: Largest factor the step may grow by per update.
        lipschitz_smoothing: EMA weight of the newest log L̂.
        foreach: ``True``: multi-tensor path; ``False``: per-tensor reference; ``None``:
            choose (see above).
        fused: ``True``: the fused kernel (every parameter must be a floating tensor on the
            CPU or a CUDA device); ``False``: never; ``None``: choose.

    Raises:
        ValueError: On an invalid hyperparameter (a group's ``lr`` outside its
            [``lr_min``, ``lr_max``] included), on ``foreach=True`` with ``fused=True``, or
            on ``fused=True`` with a parameter the fused kernel cannot update.

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
        lipschitz_max_interval: int | None = None,
        lr_max: float | None = None,
        lr_min: float | None = None,
        max_growth: float = 1.5,
        lipschitz_smoothing: float = 0.3,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
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
        if lipschitz_max_interval is None:
            lipschitz_max_interval = MAX_INTERVAL_FACTOR * lipschitz_update_interval
        if lipschitz_max_interval < lipschitz_update_interval:
            raise ValueError(
                f"Invalid lipschitz_max_interval: {lipschitz_max_interval} "
                f"(below lipschitz_update_interval {lipschitz_update_interval})"
            )
        if max_growth < 1.0:
            raise ValueError(f"Invalid max_growth: {max_growth}")
        if not 0.0 < lipschitz_smoothing <= 1.0:
            raise ValueError(f"Invalid lipschitz_smoothing: {lipschitz_smoothing}")
        # lr_max/lr_min left at None follow each group's own lr (add_param_group), which
        # also checks lr_min <= lr <= lr_max per group
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "lipschitz_safety": lipschitz_safety,
            "lipschitz_update_interval": lipschitz_update_interval,
            "lipschitz_max_interval": lipschitz_max_interval,
            "lr_max": lr_max,
            "lr_min": lr_min,
            "max_growth": max_growth,
            "lipschitz_smoothing": lipschitz_smoothing,
            "foreach": foreach,
            "fused": fused,
        }
        self._scratch: dict[Tensor, Tensor] = {}  # the probe's second buffer (not saved)
        self._flags: dict[torch.device, Tensor] = {}  # this step's non-finite flag per device
        self._pending_skips: dict[torch.device, Tensor] = {}  # skips not yet in self.state
        # per bucket, the parameters' step counters as views of one tensor (_bind_counters)
        self._counters: dict[tuple[int, int], _Counters] = {}
        super().__init__(params, defaults)
        self.lr_history: list[float] = []  # the step after each curvature update
        self.lipschitz_history: list[float] = []

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles (and deep-copies) defaults, state and param_groups only:
        # bring the skip counters up to date and keep the step's history with them
        self._flush_skips()
        return {
            **super().__getstate__(),
            "lr_history": self.lr_history,
            "lipschitz_history": self.lipschitz_history,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lr_min", group["lr"] / 100.0)
            group.setdefault("lr_max", group["lr"])
            group.setdefault("max_growth", 1.5)
            group.setdefault("lipschitz_smoothing", 0.3)
            group.setdefault("lipschitz_safety", 0.9)
            group.setdefault("lipschitz_update_interval", 10)
            group.setdefault(
                "lipschitz_max_interval", MAX_INTERVAL_FACTOR * group["lipschitz_update_interval"]
            )
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("lr_seen", group["lr"])
            group.setdefault("lr_nominal", group["lr"])
        # a pickled optimizer carries only defaults, state and param_groups; a loaded state
        # brings its own skip counters
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_flags", {})
        self._pending_skips = {}
        self._counters = {}
        self.__dict__.setdefault("lr_history", [])
        self.__dict__.setdefault("lipschitz_history", [])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer``), checking its ``foreach``/``fused``.

        A group without its own ``lr_max``/``lr_min`` (and no constructor value for them)
        gets its own ``lr`` and ``lr``/100: the bounds follow the group's step, not the
        constructor's ``lr``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["lr_max"] is None:
            group["lr_max"] = group["lr"]
        if group["lr_min"] is None:
            group["lr_min"] = group["lr"] / 100.0
        problem = None
        if not group["lr_min"] <= group["lr"] <= group["lr_max"]:
            problem = (
                f"param group {len(self.param_groups) - 1}: need lr_min <= lr <= lr_max, "
                f"got {group['lr_min']}, {group['lr']}, {group['lr_max']}"
            )
        elif group["fused"] and group["foreach"]:
            problem = "`fused` and `foreach` cannot be `True` together."
        elif group["fused"] and not all(fused_supported(p) for p in group["params"]):
            problem = (
                "`fused=True` requires every parameter to be a floating-point tensor on the "
                "CPU or a CUDA device"
            )
        if problem is not None:
            self.param_groups.pop()
            raise ValueError(problem)
        group["lr_seen"] = group["lr_nominal"] = group["lr"]

    def _init_group(self, group: dict[str, Any]) -> list[_Bucket]:
        """The group's parameters that have a gradient, bucketed by device and dtype (in
        first-seen order, so ``buckets[0].steps[0]`` is the group's first such parameter)."""
        if group["lr"] != group["lr_seen"]:  # a scheduler (or the user) set the step
            self._follow(group)
        buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:  # every step: a parameter with state may get one too
                raise RuntimeError(
                    "H3Optimizer does not support sparse gradients (nn.Embedding(sparse=True)): "
                    "use sparse=False, or torch.optim.SparseAdam for those parameters"
                )
            state = self.state[p]
            if len(state) == 0:
                if p.is_complex():
                    raise RuntimeError("H3Optimizer does not support complex parameters")
                state["step"] = torch.zeros((), dtype=torch.float32)  # kept on CPU, as AdamW
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["skipped"] = torch.zeros((), dtype=torch.int64, device=p.device)
            key = (p.device, p.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket(p.device, self._impl(group, p))
            bucket.params.append(p)
            bucket.grads.append(grad)
            bucket.exp_avgs.append(state["exp_avg"])
            bucket.exp_avg_sqs.append(state["exp_avg_sq"])
            bucket.steps.append(state["step"])
        return list(buckets.values())

    @staticmethod
    def _impl(group: dict[str, Any], p: Tensor) -> str:
        if group["fused"]:
            return "fused"
        if group["foreach"] is not None:
            return "foreach" if group["foreach"] else "single"
        return "fused" if group["fused"] is None and fused_supported(p) else "foreach"

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/inf (reads a device counter: one sync)."""
        self._flush_skips()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)  # not self.state[p]: no empty entry for p
                if state is not None and "skipped" in state:
                    return int(state["skipped"].item())
        return 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, with the ``skipped`` counters kept
        as int64 counts (torch casts every state tensor but ``step`` to its parameter's
        dtype, and bfloat16 holds a count exactly only up to 256).

        Unlike torch, it checks that each saved moment and snapshot has its parameter's
        shape (the fused kernel does not check: it would read and write out of bounds), and
        lays them out in memory like their parameter (the fused kernel pairs elements by
        memory position: a ``channels_last`` state for a contiguous parameter, or the
        reverse, would pair each weight with another's moments). A state without
        ``skipped`` counters (``torch.optim.Adam``'s, h3-optimizer 0.2.0's) gets them at
        zero, and 0.2.0's ``prev_grad``/``prev_params`` are dropped.

        Raises:
            ValueError: As torch's, or when a saved ``exp_avg``, ``exp_avg_sq`` or
                ``snapshot`` has another shape than its parameter.
        """
        saved = state_dict["state"]
        self._check_shapes(state_dict["param_groups"], saved)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        counts = {i: saved[i]["skipped"] for i in ids if "skipped" in saved.get(i, ())}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):  # torch pairs them the same way
            state = self.state.get(p)  # not self.state[p]: no empty entry for p
            if not state:
                continue
            for key in _LEGACY_STATE:
                state.pop(key, None)
            _match_layout(state, p)
            if i in counts:
                count = torch.as_tensor(counts[i])
                if count.is_floating_point():  # saved after a load that had cast it
                    count = count.round()
                state["skipped"] = count.to(p.device, torch.int64, copy=True)
            else:
                state["skipped"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _check_shapes(self, saved_groups: list[dict[str, Any]], saved: dict[Any, Any]) -> None:
        """Raise ``ValueError`` if a saved parameter-shaped state tensor has another shape
        than the parameter it will be loaded into (paired as torch pairs them)."""
        if len(saved_groups) != len(self.param_groups):
            return  # torch's own check raises
        pairs = list(zip(saved_groups, self.param_groups, strict=True))
        if any(len(s["params"]) != len(own["params"]) for s, own in pairs):
            return  # torch's own check raises
        for g, (saved_group, group) in enumerate(pairs):
            for i, (k, p) in enumerate(zip(saved_group["params"], group["params"], strict=True)):
                entry = saved.get(k)
                if not isinstance(entry, dict):
                    continue
                for key in _PARAM_SHAPED:
                    t = entry.get(key)
                    if isinstance(t, Tensor) and t.shape != p.shape:
                        raise ValueError(
                            f"param group {g}, parameter {i}: saved state {key!r} has shape "
                            f"{tuple(t.shape)}, parameter has shape {tuple(p.shape)}"
                        )

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, with the per-parameter ``skipped``
        counters brought up to date first (they are counted on the device and folded into
        ``state`` lazily, so a step costs one counter update, not one per parameter)."""
        self._flush_skips()
        return super().state_dict()

    def _flush_skips(self) -> None:
        pending, self._pending_skips = self._pending_skips, {}
        if not pending:
            return
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)  # not self.state[p]: no empty entry for p
                count = pending.get(p.device)
                if state is not None and "skipped" in state and count is not None:
                    state["skipped"] += count.to(torch.int64)

    def _found_inf(self, buckets: list[_Bucket]) -> dict[torch.device, Tensor]:
        """Per device, a float32 flag: 1.0 if any gradient of this step is NaN/inf; the
        flag is also added to the device's pending skip counter. No host sync."""
        flags: dict[torch.device, Tensor] = {}
        for b in buckets:
            flag = flags.get(b.device)
            if flag is None:
                flag = self._flags.get(b.device)
                if flag is None:
                    flag = torch.zeros((), dtype=torch.float32, device=b.device)
                    self._flags[b.device] = flag
                flags[b.device] = flag.zero_()
            mark_nonfinite(b.grads, flag)
        if len(flags) > 1:  # one decision for the whole step, at one transfer per device
            first = next(iter(flags.values()))
            anywhere = torch.stack([f.to(first.device) for f in flags.values()]).amax()
            flags = {dev: anywhere.to(dev) for dev in flags}
        for dev, flag in flags.items():
            count = self._pending_skips.get(dev)
            if count is None:
                self._pending_skips[dev] = flag.clone()
            else:
                count.add_(flag)
        return flags

    def _snapshots(self, params: list[Tensor]) -> list[Tensor] | None:
        snaps = [self.state[p].get("snapshot") for p in params]
        return None if any(s is None for s in snaps) else snaps

    def _take_snapshots(self, params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "snapshot" not in state:
                state["snapshot"] = torch.empty_like(p, memory_format=torch.preserve_format)
        torch._foreach_copy_([self.state[p]["snapshot"] for p in params], params)

    def _probe(
        self, due: list[tuple[dict[str, Any], list[_Bucket]]], closure: Callable[[], Any]
    ) -> None:
        """One closure call at the due groups' snapshots; adapts their steps (one sync)."""
        ready: list[tuple[dict[str, Any], list[_Bucket]]] = []
        for group, buckets in due:
            if all(self._snapshots(b.params) is not None for b in buckets):
                ready.append((group, buckets))
            else:  # a parameter without a snapshot (new, or the first due step): take them
                for b in buckets:
                    self._take_snapshots(b.params)
                self._schedule(group, self._clock(buckets) + 1, roomy=False)
        if not ready:
            return
        moved = [b for _, buckets in ready for b in buckets]
        snaps = [self._snapshots(b.params) or [] for b in moved]
        scratch = [[self._scratch_for(p) for p in b.params] for b in moved]
        all_params = [p for group in self.param_groups for p in group["params"]]
        grads_now = [p.grad for p in all_params]
        for b, snap, now in zip(moved, snaps, scratch, strict=True):
            torch._foreach_copy_(now, b.params)
            torch._foreach_copy_(b.params, snap)
        # fresh gradient tensors for the probe, whether the closure zeroes or sets to None
        for p in all_params:
            p.grad = None
        # autocast keeps its low-precision copies of the weights until the outermost region
        # exits, keyed by the tensor, not its values: a closure re-run inside the step's
        # region would compute with the current weights, not the snapshot copied into them
        # (Δg = 0 exactly), and code after the step with the snapshot's
        autocast = any(
            torch.amp.is_autocast_available(t) and torch.is_autocast_enabled(t)
            for t in {b.device.type for b in moved}
        )
        if autocast:
            torch.clear_autocast_cache()
        try:
            with torch.enable_grad():
                closure()
            grads_then = [
                [torch.zeros_like(p) if p.grad is None else p.grad for p in b.params] for b in moved
            ]
        finally:
            if autocast:
                torch.clear_autocast_cache()
            for b, now in zip(moved, scratch, strict=True):
                torch._foreach_copy_(b.params, now)
            for p, g in zip(all_params, grads_now, strict=True):
                p.grad = g
        lhats: list[Tensor] = []
        i = 0
        for group, buckets in ready:
            beta2, eps = group["betas"][1], group["eps"]
            parts = []
            for b in buckets:
                now, then, snap = scratch[i], grads_then[i], snaps[i]
                i += 1
                # the metric's v̂ takes each parameter's own count (before this step's)
                for idx, step in b.counted_runs():
                    v, grads = _pick(b.exp_avg_sqs, idx), _pick(b.grads, idx)
                    lists = (_pick(then, idx), _pick(now, idx), _pick(snap, idx))
                    if b.impl == "single":
                        metric = preconditioner(v, step=step, beta2=beta2, eps=eps)
                        sums = _single_tensor_curvature(grads, *lists, metric)
                    else:
                        sums = _multi_tensor_curvature(
                            grads, *lists, v, step=step, beta2=beta2, eps=eps
                        )
                    parts.append(torch.stack(sums))
            lhats.append(_combine(parts))
        first = lhats[0].device
        values = torch.stack([t.to(first) for t in lhats]).tolist()  # the one sync
        for b, now, snap in zip(moved, scratch, snaps, strict=True):  # θ_now is the snapshot
            for p, new, old in zip(b.params, now, snap, strict=True):
                self.state[p]["snapshot"] = new
                self._scratch[p] = old
        for (group, buckets), lhat in zip(ready, values, strict=True):
            self._schedule(group, self._clock(buckets) + 1, self._adapt(group, lhat))

    def _bind_counters(self, key: tuple[int, int], b: _Bucket) -> Tensor:
        """The tensor whose ``add_(1)`` advances the step counter of each of the bucket's
        parameters, in one kernel; sets ``b.runs``.

        The counters (``state[p]["step"]``, float32 on the CPU, one per parameter as in
        ``torch.optim.Adam``) are views of one tensor per bucket, so that a step costs one
        ``add_``, not one per parameter (a multi-tensor add over N CPU scalars is N
        dispatches: 100 µs a step for ResNet-18's 62 tensors). A bucket whose parameters or
        counters changed (a parameter without a gradient this step, a new parameter,
        ``load_state_dict``) gets its counters rebuilt, each keeping its value.

        Each parameter's bias correction takes its own count, but the counts need not be
        read every step: the one ``add_`` advances all of a bucket's counters together, so
        which of them are equal can only change when the bucket is rebuilt. The rebuild,
        which reads every count anyway, notes the runs of equal counts (``b.runs``: None
        when all are equal, the common case, which then costs nothing extra); only a
        bucket where a parameter sat out a step or joined late is split into runs.

        A fused bucket also keeps its state laid out in memory like its parameters (the
        kernel pairs elements by memory position, see ``_match_layouts``). A new state is
        created in its parameter's layout and ``load_state_dict`` re-lays a loaded one, but a
        parameter's layout can change under the optimizer (``module.to(memory_format=...)``
        swaps its data, keeping the object), so every step compares the bucket's parameter
        strides with those its state was last laid out for: one C-level ``map`` and one list
        comparison per bucket, no Python bytecode per parameter (measured: 6 µs for 64
        tensors, about 0.2 % of ``Adam(foreach=True)``'s step on the 64-tensor benchmark
        model). Only a change (or a rebuilt bucket) pays the per-parameter check."""
        ids = tuple(map(id, b.params))
        shared = self._counters.get(key)
        if shared is None or shared.ids != ids or any(map(_is_not, b.steps, shared.views)):
            values = [float(s) for s in b.steps]
            counts = torch.tensor(values, dtype=torch.float32)
            views = list(counts.unbind())
            for p, view in zip(b.params, views, strict=True):
                self.state[p]["step"] = view
            b.steps[:] = views
            shared = self._counters[key] = _Counters(ids, counts, views, _runs(values))
        b.runs = shared.runs
        if b.impl == "fused":
            strides = list(map(Tensor.stride, b.params))
            if strides != shared.strides:
                self._match_layouts(b)
                shared.strides = strides
        return shared.counts

    def _match_layouts(self, b: _Bucket) -> None:
        """Lay out the state of each of the bucket's parameters like the parameter (a copy
        where the strides differ), and point the bucket's lists at the state."""
        for i, p in enumerate(b.params):
            state = self.state[p]
            _match_layout(state, p)
            b.exp_avgs[i] = state["exp_avg"]
            b.exp_avg_sqs[i] = state["exp_avg_sq"]

    @staticmethod
    def _clock(buckets: list[_Bucket]) -> int:
        """The group's step count for the probe schedule: that of its most advanced
        parameter with a gradient this step (CPU reads, no sync)."""
        return max(int(b.steps[0 if b.runs is None else b.runs[0][0]].item()) for b in buckets)

    def _scratch_for(self, p: Tensor) -> Tensor:
        buf = self._scratch.get(p)
        if (
            buf is None
            or buf.shape != p.shape
            or buf.stride() != p.stride()  # laid out like p, as the snapshot it becomes
            or buf.dtype != p.dtype
            or buf.device != p.device
        ):
            buf = self._scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    @staticmethod
    def _follow(group: dict[str, Any]) -> None:
        """Carry a step set from outside (an LR scheduler, or ``group["lr"] = x``) into the
        group's bounds, which keep their ratios to the new nominal step: the probes then
        adapt within the schedule, never above it.

        Whether the new step was made from the one this optimizer left (a chainable
        scheduler: StepLR, CosineAnnealingLR, ``*=``) or is the schedule's own value
        (OneCycleLR, LambdaLR, ``= x``) cannot be told from the number. The nominal step
        scales by the new step over the larger of the step left and the nominal step, which
        is never above either reading: after a probe lowered the step, a chainable scheduler
        carries that lowering on (the step stays below the schedule, as torch chains
        schedulers), and one setting its own values is followed exactly (measured: the
        other reading put the step 1.5–3.8× above OneCycleLR, LambdaLR and steps set by
        hand). A step of 0 leaves the bounds as they were; the next positive step scales
        them from the nominal one."""
        new = group["lr"]
        if new > 0.0:
            ratio = new / max(group["lr_seen"], group["lr_nominal"])
            group["lr_nominal"] *= ratio
            group["lr_min"] *= ratio
            group["lr_max"] *= ratio
        group["lr_seen"] = new

    def _adapt(self, group: dict[str, Any], lhat: float) -> bool:
        """The step from a new L̂; True if the step sits at its ceiling with room to spare."""
        if not math.isfinite(lhat) or lhat <= 0 or not group["lr"] > 0.0:
            return False  # no estimate, or a step of 0 set from outside: nothing to adapt
        prev = group.get("lipschitz_log")
        alpha = group["lipschitz_smoothing"]
        log_l = math.log(lhat) if prev is None else (1 - alpha) * prev + alpha * math.log(lhat)
        group["lipschitz_log"] = log_l
        # the bound is on the step taken: lr × step_scale (AutoH3's lr compensation)
        target = group["lipschitz_safety"] / (math.exp(log_l) + 1e-12)
        target /= group.get("step_scale", 1.0)
        new_lr = min(group["lr_max"], group["lr"] * group["max_growth"], target)
        group["lr"] = group["lr_seen"] = max(group["lr_min"], new_lr)
        self.lr_history.append(group["lr"])
        self.lipschitz_history.append(math.exp(log_l))
        ceiling: float = group["lr_max"]
        return bool(group["lr"] >= ceiling and target >= HEADROOM * ceiling)

    @staticmethod
    def _schedule(group: dict[str, Any], step: int, roomy: bool) -> None:
        """The group's next probe, after one at ``step``: the interval doubles (up to
        ``lipschitz_max_interval``) while the probes find room, else it is the shortest."""
        base = group["lipschitz_update_interval"]
        interval = (
            min(group["lipschitz_max_interval"], 2 * group.get("lipschitz_interval", base))
            if roomy
            else base
        )
        group["lipschitz_interval"], group["lipschitz_next"] = interval, step + interval

    @staticmethod
    def _due(group: dict[str, Any], step: int) -> bool:
        """Is the curvature probe due at ``step`` (a state without a schedule: every
        ``lipschitz_update_interval`` steps, as before the schedule existed)?"""
        nxt = group.get("lipschitz_next")
        return bool(step % group["lipschitz_update_interval"] == 0 if nxt is None else step >= nxt)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step. With a closure, when the curvature probe is due (every
        ``lipschitz_update_interval`` steps, or up to ``lipschitz_max_interval`` while the
        step has room) the step size adapts (the closure is then called twice); returns the
        closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(g, bs) for g in self.param_groups if (bs := self._init_group(g))]
        if not groups:
            return loss
        counters = [
            self._bind_counters((id(g), i), b) for g, bs in groups for i, b in enumerate(bs)
        ]
        found_inf = self._found_inf([b for _, buckets in groups for b in buckets])
        if closure is not None:
            due = [(g, bs) for g, bs in groups if self._due(g, self._clock(bs) + 1)]
            if due:
                self._probe(due, closure)
        for counts in counters:
            counts.add_(1)
        for group, buckets in groups:
            beta1, beta2 = group["betas"]
            hyper = {
                "lr": group["lr"] * group.get("step_scale", 1.0),
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
            }
            # each parameter's bias correction takes its own step count, as in Adam: the
            # reference reads every parameter's counter, and so does the fused kernel on the
            # CPU when the bucket's counts differ; the others run once per run of equal
            # counts. Equal counts (b.runs None, the common case) cost what they did before
            # per-parameter counts were honoured (_bind_counters says why that is cheap).
            for b in buckets:
                flag = found_inf[b.device]
                if b.impl == "single":
                    args = (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs)
                    _single_tensor_h3(*args, steps=b.steps, finite=flag == 0, **hyper)
                    continue
                if b.impl == "fused" and b.device.type == "cpu":
                    args = (b.params, b.grads, b.exp_avgs, b.exp_avg_sqs)
                    # equal counts: one counter for all (measured 1 % cheaper than N views)
                    steps = b.steps if b.runs else [b.steps[0]] * len(b.steps)
                    _fused_h3(*args, steps=steps, found_inf=flag, **hyper)
                    continue
                for idx, step in b.counted_runs():  # CPU reads: no sync
                    args = (
                        _pick(b.params, idx),
                        _pick(b.grads, idx),
                        _pick(b.exp_avgs, idx),
                        _pick(b.exp_avg_sqs, idx),
                    )
                    if b.impl == "fused":  # on an accelerator: the count on the device
                        step_t = torch.full((), step, dtype=torch.float32, device=b.device)
                        _fused_h3(*args, steps=[step_t] * len(args[0]), found_inf=flag, **hyper)
                    else:
                        _multi_tensor_h3(*args, step=step, found_inf=flag, **hyper)
            if closure is not None and "snapshot" not in self.state[buckets[0].params[0]]:
                for b in buckets:
                    self._take_snapshots(b.params)
        return loss


def _combine(parts: list[Tensor]) -> Tensor:
    """L̂ from per-bucket (Σ‖Δg‖², Σ‖Δθ‖²) pairs (0-dim, no sync)."""
    if len(parts) == 1:
        return lipschitz_from_sums(parts[0][0], parts[0][1])
    first = parts[0].device
    total = torch.stack([p.to(first) for p in parts]).sum(0)
    return lipschitz_from_sums(total[0], total[1])
