"""NGD-T: natural-gradient descent whose step size is set by a dissipation budget.

Per step, over the parameters K-FAC covers:

- the preconditioned direction u = F̂⁻¹ g, with F̂ the Kronecker-factored Fisher of each
  ``nn.Linear`` / ``nn.Conv2d`` layer (activation covariance A ⊗ output-gradient covariance
  G, running averages, eigendecompositions cached and refreshed every ``inv_update_steps``,
  Tikhonov damping in the eigenbasis);
- Δ_F = gᵀF̂⁻¹g, the squared Fisher norm of the gradient;
- the predicted dissipation of a step of size η, Q(η) = ½ η² Δ_F: to second order the KL
  divergence between the model's predictive distributions before and after the step;
- η_T = min(η_max, √(2·Q_budget/Δ_F)), so each step spends at most ``q_budget`` nats of KL.

This is the KL-clipped step of K-FAC implementations (kfac-pytorch's ``kl_clip``) and of
TRPO's trust region. The "speed–cost bound" is Cauchy–Schwarz in the Fisher metric: for any
step δ, the first-order loss decrease ΔL = gᵀδ obeys ½ δᵀFδ ≥ ΔL²/(2Δ_F), with equality only
along the natural gradient. So for a given dissipation, the natural-gradient direction buys
the most first-order loss decrease; it says nothing about curvature beyond second order.

Rank deficiency: eigen-directions whose eigenvalue product is below ``eig_floor`` × the
largest are treated as the Fisher's nullspace. The gradient's component there is not
amplified by 1/damping; it gets a plain-gradient step scaled by 1/(mean in-range eigenvalue
product + damping) (the hybrid fallback), and is left out of Δ_F. A failed eigendecomposition
is retried in float64; if that fails too the last good cache is kept and the failure counted.

Every backward since the gradients were last zeroed (``zero_grad``) or taken by a step adds
to the factors, as it adds to the gradients: k micro-batches of ``loss / k`` (gradient
accumulation) give the factors, Δ_F and η_T of the one full batch. A batch whose activations
or output gradients are not finite (a corrupt sample, an overflow without a GradScaler) is
left out of the factors, as its gradient is left out of the step. The factors are kept in the
weights' dtype, at least float32 (a bf16 or fp16 model's in float32); each step is taken in
the weights' dtype.

Parameters K-FAC does not cover (norm layers, embeddings, grouped convolutions, anything when
plain parameters are given) take the ``fallback`` update (Adam), so any model trains. So does,
with a warning, a covered layer whose gradient arrives without its factors (its weight used
without calling the module, as ``nn.MultiheadAttention`` does with ``out_proj``). The factors
are recorded whenever autograd records a layer's forward, in train or eval mode; a bias frozen
when the optimizer is built stays as it is, and K-FAC covers its layer's weight alone.

Under ``torch.distributed`` the running factors are averaged across ranks before each
eigendecomposition, so every rank preconditions identically.

Under ``torch.amp.GradScaler`` the hooks see the gradients of the scaled loss. NGDT takes
the scale as ``torch.optim.Adam(fused=True)`` does (``_step_supports_amp_scaling``:
``scaler.step`` hands it ``grad_scale`` and ``found_inf``): it unscales the gradients and the
recorded output gradients before they reach the factors, so G does not depend on the loss
scale, and a step whose gradients overflowed changes nothing and leaves its batch out of the
factors. After an explicit ``scaler.unscale_(opt)`` (to clip) ``scaler.step`` no longer says
the scale: pass ``grad_scaler=scaler`` to NGDT then.

Build NGDT before calling ``torch.compile`` on the model: Dynamo does not guard on a module's
hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so code it compiled from a forward
that autograd recorded before NGDT was built runs on without NGDT's hooks, and the layers take
the fallback (a compiled forward under ``torch.no_grad`` alone does not: the first recorded
one compiles anew).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer


def _uncovered(module: nn.Linear | nn.Conv2d) -> str | None:
    """Why K-FAC leaves a Linear or Conv2d layer to the fallback (None: it covers it)."""
    if not module.weight.requires_grad:
        return "its weight is frozen"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"a grouped convolution (groups={module.groups})"
    return None


class _Layer:
    """K-FAC bookkeeping for one Linear or Conv2d layer.

    A bias frozen (``requires_grad=False``) when the optimizer is built is a constant of the
    layer: K-FAC then covers the weight alone (no column of ones in the activations) and
    never changes the bias.
    """

    def __init__(self, module: nn.Linear | nn.Conv2d, name: str = "") -> None:
        self.module = module
        self.name = name or type(module).__name__
        self.conv = isinstance(module, nn.Conv2d)
        self.weight: Tensor = module.weight
        bias = module.bias
        self.bias: Tensor | None = bias if bias is not None and bias.requires_grad else None
        self.has_bias = self.bias is not None
        # the padding unfold applies, or None and a pad before it ("same", "valid", a
        # padding_mode other than zeros: what Conv2d._conv_forward does)
        self.unfold_padding: tuple[int, ...] = (0, 0)
        self.pre_pad: tuple[list[int], str] | None = None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode == "zeros" and not isinstance(module.padding, str):
                self.unfold_padding = tuple(module.padding)
            else:
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                self.pre_pad = (list(module._reversed_padding_repeated_twice), mode)
        # what the backwards since the gradients were last taken or zeroed recorded: Σ aᵀa
        # over the rows of the activations (rows × in[+1]) and Σ gᵀg over the output
        # gradients' (rows × out), and the rows
        self.a_gram: Tensor | None = None
        self.g_gram: Tensor | None = None
        self.rows = 0
        # the samples those backwards' losses average over: the batch of each finished
        # backward summed (micro-batches under gradient accumulation), and the batch of the
        # one under way (a layer called twice in a forward records twice, for one batch)
        self.batch = 0
        self.backward_batch = 0
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (lA, QA, lG, QG)

    def record(self, a: Tensor, g: Tensor, batch: int) -> None:
        """Add a forward call's activations and output gradients, when its backward reaches
        it. The sums are in the weight's dtype, at least float32, and in place: a backward
        run inside ``torch.autocast`` would take a matmul's result in bf16."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        a, g = a.to(dtype), g.to(dtype)
        if self.a_gram is None or self.g_gram is None:
            self.a_gram = a.new_zeros(a.shape[1], a.shape[1])
            self.g_gram = g.new_zeros(g.shape[1], g.shape[1])
        self.a_gram.addmm_(a.t(), a)
        self.g_gram.addmm_(g.t(), g)
        self.rows += a.shape[0]
        self.backward_batch = batch

    def end_backward(self, weight: Tensor) -> None:
        """The weight's gradient is accumulated: a backward is done (a post-accumulate-grad
        hook, once a backward however often the layer was called)."""
        self.batch += self.backward_batch
        self.backward_batch = 0

    def drop_records(self) -> None:
        self.a_gram = self.g_gram = None
        self.rows = self.batch = self.backward_batch = 0

    def activations(self, x: Tensor) -> Tensor:
        m = self.module
        if self.conv:
            assert isinstance(m, nn.Conv2d)
            if x.dim() == 3:  # an unbatched image
                x = x.unsqueeze(0)
            if self.pre_pad is not None:
                x = nn.functional.pad(x, self.pre_pad[0], mode=self.pre_pad[1])
            patches = nn.functional.unfold(
                x, m.kernel_size, m.dilation, self.unfold_padding, m.stride
            )  # B × (C·k·k) × L
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            a = x.reshape(-1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def out_grads(self, gy: Tensor) -> Tensor:
        if self.conv:
            if gy.dim() == 3:  # an unbatched image
                gy = gy.unsqueeze(0)
            return gy.transpose(1, 3).reshape(-1, gy.shape[1])
        return gy.reshape(-1, gy.shape[-1])

    def grad_matrix(self) -> Tensor:
        """The gradient as one matrix (out × in[+1]); call only when :meth:`grads_missing`
        is None."""
        w = self.weight
        assert w.grad is not None
        gw = w.grad.reshape(w.shape[0], -1)
        if self.bias is not None:
            assert self.bias.grad is not None
            gw = torch.cat([gw, self.bias.grad.reshape(-1, 1)], dim=1)
        return gw

    def frozen_since(self) -> str | None:
        """Which of the covered parameters was frozen after the optimizer was built (None
        if none or all were)."""
        frozen = [n for n, p in self.named_params() if not p.requires_grad]
        if not frozen or len(frozen) == len(self.params()):
            return None
        return frozen[0]

    def grads_missing(self) -> str | None:
        """None if every covered parameter has a gradient; else which has none."""
        return next((n for n, p in self.named_params() if p.grad is None), None)

    def named_params(self) -> list[tuple[str, Tensor]]:
        named = [("weight", self.weight)]
        return named if self.bias is None else [*named, ("bias", self.bias)]

    def weight_matrix(self) -> Tensor:
        wm = self.weight.reshape(self.weight.shape[0], -1)
        if self.bias is not None:
            wm = torch.cat([wm, self.bias.reshape(-1, 1)], dim=1)
        return wm

    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


class _ForwardHook:
    """NGDT's forward hook on a covered layer's module: keeps the layer's input and, through a
    tensor hook on its output, its output gradient for the factors, whenever autograd records
    the forward: in eval mode too (like any torch optimizer, NGDT does not depend on it:
    fine-tuning with frozen batch-norm statistics trains in eval mode). The pair is recorded
    when the gradient arrives, so a forward that is never back-propagated records nothing,
    and every backward until the step adds its pairs, as it adds to the gradients (gradient
    accumulation), when that step folds them into the factors.

    A copy of the module (``copy.deepcopy``, pickling: ``torch.save(model)``) gets a
    :class:`_DetachedHook` in its place: a copied hook would feed this optimizer's factors
    (or a copy of the optimizer nothing steps) with the copy's batches. A copy of the
    optimizer hooks its own copies of the layers (``NGDT.__setstate__``).
    """

    __slots__ = ("layer", "opt")

    def __init__(self, opt: NGDT, layer: _Layer) -> None:
        self.opt = opt
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        opt, layer = self.opt, self.layer
        x = inputs[0].detach()
        a = layer.activations(x)
        unbatched = x.dim() == (3 if layer.conv else 1)
        batch = 1 if unbatched else x.shape[0]

        def grad_hook(gy: Tensor) -> None:
            # the next step folds in every factor_update_steps-th step's batches, and a
            # layer's first at once
            if (opt.steps + 1) % opt.factor_update_steps == 0 or layer.A is None:
                layer.record(a, layer.out_grads(gy.detach()), batch)

        output.register_hook(grad_hook)  # type: ignore[no-untyped-call]

    def __reduce__(self) -> tuple[type[_DetachedHook], tuple[()]]:
        return _DetachedHook, ()


class _DetachedHook:
    """What a copied module holds in place of NGDT's forward hook: nothing to record for."""

    __slots__ = ()

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        return None


class NGDT(Optimizer):
    """Thermodynamic natural-gradient descent: K-FAC directions, steps sized by a KL budget.

    The optimizer hooks the model's layers. A copy of a hooked model (``copy.deepcopy``,
    ``torch.save(model)``) holds inert hooks in their place: to train it with NGDT, build a
    new NGDT on it. A copy of the optimizer (``copy.deepcopy``, pickling), as a torch
    optimizer's copy, holds copies of the parameters, with its state: copied with its model
    (``copy.deepcopy((model, opt))``, ``torch.save({"model": model, "opt": opt})``) it hooks
    and trains that model's copy. ``state_dict`` / ``load_state_dict`` carry the state to an
    NGDT built on another model.

    Args:
        params_or_model: An ``nn.Module`` (its Linear/Conv2d layers get K-FAC, the rest the
            fallback; grouped convolutions too, listed in ``uncovered``) or parameters (then
            everything uses the fallback). Which parameters K-FAC covers is settled here:
            freezing part of a covered layer (its bias, say) afterwards raises a
            ``ValueError`` at the next step (freezing a whole layer is fine).
        lr_max: η_max, the largest step: the K-FAC group's ``"lr"``, which an LR scheduler
            drives as on any torch optimizer (the budget still bounds each step below it).
        q_budget: Dissipation budget per step (nats of KL), or a callable ``step -> budget``.
        damping: Tikhonov damping added to the eigenvalue products.
        factor_decay: Running-average weight of the old factors.
        factor_update_steps: Steps between factor updates.
        inv_update_steps: Steps between eigendecompositions.
        fallback: ``"adam"`` for parameters K-FAC does not cover.
        fallback_lr: The fallback's learning rate: the ``"lr"`` of the group of parameters
            K-FAC does not cover (a scheduler drives it too), and the fixed step of a covered
            layer that takes the fallback (see the module's notes).
        q_decay: Multiply the budget by this every step (a decaying schedule).
        eig_floor: Relative eigenvalue-product floor below which a direction is nullspace.
        weight_decay: L2 penalty added to covered gradients.
        stats_callback: Called with ``last_stats`` after every step (e.g. to hand the figures
            to an ``H3Profiler``: ``lambda s: prof.log_batch(...)`` or a collector).
        grad_scaler: The ``torch.amp.GradScaler`` the loss is scaled with, needed only when
            ``scaler.unscale_(opt)`` is called before ``scaler.step(opt)`` (to clip the
            gradients): ``scaler.step`` alone tells NGDT the scale (see the module's notes).

    Each group's ``"lr"`` is what a torch LR scheduler reads and writes: for the K-FAC group
    the cap η_max (η_T = min(lr, √(2·Q_budget/Δ_F)), so a schedule lowers the cap and the
    budget still holds), for the fallback groups Adam's step. A schedule of the budget itself
    is a callable ``q_budget`` or ``q_decay``.

    Raises:
        RuntimeError: At a step after ``scaler.unscale_(opt)`` without ``grad_scaler``, or
            with a sparse gradient (``nn.Embedding(sparse=True)``).

    Example:
        >>> opt = NGDT(model, lr_max=0.5, q_budget=1e-3)  # doctest: +SKIP
        >>> loss = criterion(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        >>> opt.last_stats["bound"]  # "budget", "lr_max" or "fallback"  # doctest: +SKIP
    """

    # torch.amp.GradScaler.step hands the scale and the overflow flag to the optimizer
    # (grad_scale, found_inf) instead of unscaling: the hooks' output gradients need it too
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        lr_max: float = 0.5,
        q_budget: float | Callable[[int], float] = 1e-3,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 20,
        fallback: str = "adam",
        *,
        fallback_lr: float = 1e-3,
        q_decay: float = 1.0,
        eig_floor: float = 1e-8,
        weight_decay: float = 0.0,
        stats_callback: Callable[[dict[str, Any]], None] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not lr_max > 0.0:
            raise ValueError(f"Invalid lr_max: {lr_max}")
        if not callable(q_budget) and not q_budget > 0:
            raise ValueError(f"Invalid q_budget: {q_budget}")
        if not damping >= 0.0:
            raise ValueError(f"Invalid damping: {damping}")
        if not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"Invalid factor_decay: {factor_decay}")
        if factor_update_steps < 1 or inv_update_steps < 1:
            raise ValueError("factor_update_steps and inv_update_steps must be >= 1")
        if fallback != "adam":
            raise ValueError(f"Invalid fallback: {fallback!r} (only 'adam')")
        self.layers: list[_Layer] = []
        # Linear/Conv2d layers left to the fallback, and why (grouped convolutions)
        self.uncovered: dict[str, str] = {}
        if isinstance(params_or_model, nn.Module):
            for name, m in params_or_model.named_modules():
                if not isinstance(m, (nn.Linear, nn.Conv2d)):
                    continue
                why = _uncovered(m)
                if why is None:
                    layer = _Layer(m, name)
                    self._hook(layer)
                    self.layers.append(layer)
                elif m.weight.requires_grad:
                    self.uncovered[name or type(m).__name__] = why
            params: list[Any] = [p for p in params_or_model.parameters() if p.requires_grad]
        else:
            params = list(params_or_model)
        covered = {id(p) for layer in self.layers for p in layer.params()}
        groups: list[dict[str, Any]] = []
        kfac = [p for p in params if isinstance(p, Tensor) and id(p) in covered]
        rest = [p for p in params if not (isinstance(p, Tensor) and id(p) in covered)]
        # "lr": what an LR scheduler drives (the K-FAC step's cap, the fallback's Adam step)
        if kfac:
            groups.append({"params": kfac, "kfac": True, "lr": lr_max})
        if rest:
            groups.append({"params": rest, "kfac": False, "lr": fallback_lr})
        defaults = {
            "damping": damping,
            "factor_decay": factor_decay,
            "weight_decay": weight_decay,
            "fallback_lr": fallback_lr,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            # a group added later (add_param_group) takes the fallback: K-FAC covers the
            # layers hooked here
            "kfac": False,
        }
        self._built = False
        super().__init__(groups, defaults)
        self._built = True
        self.q_budget = q_budget
        self.q_decay = q_decay
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.eig_floor = eig_floor
        self.stats_callback = stats_callback
        self.grad_scaler = grad_scaler
        self.steps = 0
        self.eig_failures = 0
        self.total_predicted_q = 0.0
        self.last_stats: dict[str, Any] = {}
        self._warned: set[str] = set()  # layers whose fallback step was warned about

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as :meth:`torch.optim.Optimizer.add_param_group` does. Its
        parameters take the fallback (Adam at the group's ``"lr"``; without one, at its
        ``fallback_lr``, or the optimizer's): K-FAC covers the layers hooked when the
        optimizer was built.

        Raises:
            ValueError: For a group with ``"kfac": True`` (no hook records its factors).
        """
        if self._built and param_group.get("kfac", False):
            raise ValueError(
                "NGDT: a group added after the optimizer was built takes the fallback (Adam) "
                "step, not K-FAC (kfac=True): no hook records its layers' factors; build NGDT "
                "from a model that holds them"
            )
        if "lr" not in param_group:
            param_group["lr"] = param_group.get("fallback_lr", self.defaults["fallback_lr"])
        super().add_param_group(param_group)

    # NGDT's own attributes, which pickling and ``copy.deepcopy`` carry along with torch's
    # defaults, state and param_groups (as torch's do, they leave out the optimizer's hooks,
    # and the scale GradScaler.step hands over for one step: grad_scale, found_inf)
    _OWN_STATE = (
        "layers",
        "uncovered",
        "_built",
        "q_budget",
        "q_decay",
        "factor_update_steps",
        "inv_update_steps",
        "eig_floor",
        "stats_callback",
        "grad_scaler",
        "steps",
        "eig_failures",
        "total_predicted_q",
        "last_stats",
        "_warned",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update((k, self.__dict__[k]) for k in self._OWN_STATE)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # a checkpoint from before groups had an "lr" held the step's cap in "lr_max"
            # (the K-FAC group) and the fallback's step in "fallback_lr"
            lr_max = group.pop("lr_max", None)
            if "lr" not in group:
                kfac = group["kfac"] and lr_max is not None
                group["lr"] = lr_max if kfac else group["fallback_lr"]
        if "layers" in state:
            # unpickled or deep-copied (load_state_dict passes torch's state alone): the
            # layers are copies, whose module's and weight's hooks the copy did not carry
            for layer in self.layers:
                self._hook(layer)

    # --- hooks ---------------------------------------------------------------------------

    def _hook(self, layer: _Layer) -> None:
        """Hook the layer's module (its inputs and output gradients, see
        :class:`_ForwardHook`) and weight (the end of each backward)."""
        layer.module.register_forward_hook(_ForwardHook(self, layer))
        layer.weight.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
            layer.end_backward
        )

    # --- factors and their eigenbases ------------------------------------------------------

    def _update_factors(self, decay: float) -> None:
        """Fold what each layer recorded since the gradients were last taken into its running
        factors, and drop it.

        The covariances are over every row recorded, and the output gradients carry the
        per-sample scale of the loss averaged over every backward's batch: k micro-batches
        of loss/k give the factors of the one full batch. A non-finite batch (a corrupt
        input, an overflow without a GradScaler) is left out, as its gradient is: folded
        in, it would leave the running factor NaN for good."""
        for layer in self.layers:
            a_gram, g_gram, rows = layer.a_gram, layer.g_gram, layer.rows
            batch = layer.batch + layer.backward_batch
            layer.drop_records()
            if a_gram is None or g_gram is None:
                continue
            a_cov = a_gram / rows
            g_cov = g_gram * (batch**2 / rows)  # per-sample gradient scale
            # one sum for both: a NaN or inf anywhere in them makes it non-finite, at a
            # fraction of the cost of isfinite().all() per factor
            if not math.isfinite(float(a_cov.sum() + g_cov.sum())):
                continue
            if layer.A is None or layer.G is None:
                layer.A, layer.G = a_cov, g_cov
            else:
                layer.A.mul_(decay).add_(a_cov, alpha=1 - decay)
                layer.G.mul_(decay).add_(g_cov, alpha=1 - decay)

    @staticmethod
    def _eigh(m: Tensor) -> tuple[Tensor, Tensor] | None:
        for dtype in (m.dtype, torch.float64):
            try:
                sym = 0.5 * (m + m.t())
                vals, vecs = torch.linalg.eigh(sym.to(dtype))
                if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
                    return vals.clamp_min(0).to(m.dtype), vecs.to(m.dtype)
            except RuntimeError:
                continue
        return None

    def _update_eigs(self, every_layer: bool = True) -> None:
        """Eigendecompose each layer's factors (``every_layer`` False: only the layers
        without an eigenbasis yet)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for layer in self.layers:
            if layer.A is None or layer.G is None or not (every_layer or layer.eig is None):
                continue
            if world > 1:  # every rank preconditions with the same factors
                dist.all_reduce(layer.A)
                dist.all_reduce(layer.G)
                layer.A.div_(world)
                layer.G.div_(world)
            ea, eg = self._eigh(layer.A), self._eigh(layer.G)
            if ea is None or eg is None:
                self.eig_failures += 1
                continue  # keep the last good cache
            layer.eig = (ea[0], ea[1], eg[0], eg[1])

    # --- the step --------------------------------------------------------------------------

    def _budget(self) -> float:
        q = self.q_budget(self.steps) if callable(self.q_budget) else self.q_budget
        return float(q) * (self.q_decay**self.steps)

    def _natural(self, layer: _Layer, gw: Tensor, damping: float) -> tuple[Tensor, Tensor, float]:
        """(range-space natural gradient, nullspace plain-gradient part, nullspace fraction)."""
        assert layer.eig is not None
        la, qa, lg, qg = layer.eig
        v = qg.t() @ gw.to(qg.dtype) @ qa  # in the factors' dtype (a bf16 weight's: float32)
        prod = lg[:, None] * la[None, :]
        in_range = prod > self.eig_floor * prod.max().clamp_min(1e-30)
        nat = torch.where(in_range, v / (prod + damping), torch.zeros_like(v))
        scale = (
            1.0 / (float(prod[in_range].mean()) + damping)
            if bool(in_range.any())
            else 1.0 / max(damping, 1e-12)
        )
        null = torch.where(in_range, torch.zeros_like(v), v * scale)
        frac = float((~in_range).float().mean())
        return qg @ nat @ qa.t(), qg @ null @ qa.t(), frac

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_dense()
        if not self._unscale():
            return loss  # the gradients overflowed (GradScaler): a skipped step
        self.steps += 1
        group_k = next((g for g in self.param_groups if g["kfac"]), None)
        stats = self._no_kfac_stats()
        if group_k is not None and self.layers:
            self._update_factors(group_k["factor_decay"])
            self._update_eigs(self.steps % self.inv_update_steps == 1 or self.inv_update_steps == 1)
            updates = []
            delta_f = torch.zeros(())
            null_fracs = []
            for layer in self.layers:
                frozen = layer.frozen_since()
                if frozen is not None:
                    raise ValueError(
                        f"NGDT: layer {layer.name!r}: its {frozen} was frozen after the "
                        "optimizer was built, and K-FAC preconditions a layer's weight and "
                        "bias together; freeze it before building NGDT (a bias frozen then "
                        "is left as it is), or freeze the whole layer"
                    )
                if not layer.weight.requires_grad:  # the whole layer frozen since: nothing
                    continue
                missing = layer.grads_missing()
                if missing is not None and all(p.grad is None for p in layer.params()):
                    continue  # not used in this step
                gw: Tensor | None = None
                if missing is None:
                    gw = layer.grad_matrix()
                    if group_k["weight_decay"]:
                        gw = gw + group_k["weight_decay"] * layer.weight_matrix()
                    if not torch.isfinite(gw).all():
                        continue  # a non-finite gradient never reaches the parameters
                if layer.eig is None or gw is None:
                    # a gradient K-FAC cannot precondition: typically the layer's weight was
                    # used without calling the module (nn.MultiheadAttention's out_proj,
                    # F.linear(x, layer.weight)), or the model compiled before NGDT hooked
                    # it: the hooks do not see either
                    if missing is not None:
                        why = f"its {missing} has no gradient"
                    elif layer.A is None:
                        why = (
                            "no activations were recorded for it: either the model was "
                            "compiled (torch.compile) and trained before NGDT was built, and "
                            "the compiled code does not see hooks added since (build NGDT "
                            "before compiling), or its weight is used without calling the "
                            "module"
                        )
                    else:
                        why = "its factors could not be eigendecomposed"
                    self._fallback_layer(layer, group_k, why)
                    continue
                nat, null, frac = self._natural(layer, gw, group_k["damping"])
                delta_f = delta_f + (gw * nat).sum()
                updates.append((layer, nat + null))
                null_fracs.append(frac)
            q = self._budget()
            if updates:
                df = float(delta_f)
                eta_budget = math.sqrt(2.0 * q / df) if df > 0 else math.inf
                cap = group_k["lr"]  # lr_max, or where an LR scheduler has put it
                eta = min(cap, eta_budget)
                stats = {
                    "delta_f": df,
                    "eta": eta,
                    "predicted_q": 0.5 * eta * eta * df,
                    "bound": "budget" if eta_budget < cap else "lr_max",
                    "q_budget": q,
                    "nullspace_frac": sum(null_fracs) / len(null_fracs),
                }
            else:  # no layer preconditioned: K-FAC took no step (there is no η to report)
                stats = self._no_kfac_stats(q)
            for layer, upd in updates:
                n_w = layer.weight[0].numel()
                layer.weight.sub_(eta * upd[:, :n_w].reshape_as(layer.weight))
                if layer.bias is not None:
                    layer.bias.sub_(eta * upd[:, n_w])
            self.total_predicted_q += stats["predicted_q"]
        for group in self.param_groups:
            if not group["kfac"]:
                for p in group["params"]:
                    self._adam_param(p, group, group["lr"])
        self.last_stats = stats
        if self.stats_callback is not None:
            self.stats_callback(dict(stats))
        return loss

    @staticmethod
    def _no_kfac_stats(q: float | None = None) -> dict[str, Any]:
        """``last_stats`` of a step in which K-FAC preconditioned no layer."""
        stats: dict[str, Any] = {
            "delta_f": 0.0,
            "eta": None,
            "predicted_q": 0.0,
            "bound": "fallback",
            "nullspace_frac": 0.0,
        }
        if q is not None:
            stats["q_budget"] = q
        return stats

    def _unscale(self) -> bool:
        """Undo ``torch.amp.GradScaler``'s loss scale (its ``step`` sets ``found_inf``, and
        ``grad_scale`` unless ``unscale_`` ran). False if the gradients overflowed: what the
        hooks recorded since the last step is dropped, nothing else changes. Else True, with
        the gradients and the output gradients recorded since the last step unscaled."""
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        inv: Tensor | None = None
        if found_inf is not None:
            if float(found_inf) > 0:
                for layer in self.layers:
                    layer.drop_records()
                return False
            if grad_scale is not None:  # scaler.step left the gradients scaled
                # the reciprocal in float64, as GradScaler.unscale_ takes it
                inv = grad_scale.double().reciprocal().float()
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv.to(p.grad.device))
            elif self.grad_scaler is not None:  # scaler.unscale_ left the hooks' ones scaled
                inv = torch.tensor(1.0 / self.grad_scaler.get_scale())
            else:
                raise RuntimeError(
                    "NGDT: GradScaler.unscale_ was called before GradScaler.step, so the step "
                    "does not learn the loss scale that NGDT's recorded output gradients carry: "
                    "build NGDT with grad_scaler=scaler (or leave the unscaling to "
                    "scaler.step)"
                )
        if inv is not None:
            for layer in self.layers:
                if layer.g_gram is not None:
                    layer.g_gram.mul_(inv.to(layer.g_gram.device).square())
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, as :meth:`torch.optim.Optimizer.zero_grad` does, and drop what
        the hooks recorded with them: the factors come from the backwards the step takes."""
        super().zero_grad(set_to_none)
        for layer in self.layers:
            layer.drop_records()

    def _fallback_layer(self, layer: _Layer, group: dict[str, Any], why: str) -> None:
        """A covered layer K-FAC cannot precondition this step: the fallback's update (Adam at
        ``fallback_lr``) for its parameters with a gradient, and a warning, once a layer."""
        if layer.name not in self._warned:
            self._warned.add(layer.name)
            warnings.warn(
                f"NGDT: layer {layer.name!r} takes the fallback (Adam) step: {why}",
                RuntimeWarning,
                stacklevel=3,
            )
        for p in layer.params():
            self._adam_param(p, group, group["fallback_lr"])

    def _check_dense(self) -> None:
        """Raise, before anything changes, for a sparse gradient (the fallback's Adam, like
        torch's, has none; K-FAC's layers never get one)."""
        for group in self.param_groups:
            if group["kfac"]:
                continue
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "NGDT does not support sparse gradients (nn.Embedding(sparse=True)): "
                        "use sparse=False, or torch.optim.SparseAdam for those parameters"
                    )

    def _adam_param(self, p: Tensor, group: dict[str, Any], lr: float) -> None:
        if p.grad is None:
            return
        beta1, beta2 = group["betas"]
        st = self.state[p]
        if len(st) == 0:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        g = p.grad
        if not torch.isfinite(g).all():
            return
        st["step"] += 1
        st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** st["step"], 1 - beta2 ** st["step"]
        p.addcdiv_(
            st["exp_avg"] / bc1,
            (st["exp_avg_sq"] / bc2).sqrt_().add_(group["eps"]),
            value=-lr,
        )

    # --- state -----------------------------------------------------------------------------

    @property
    def factor_bytes(self) -> int:
        """Memory the factors and their eigenbases take."""
        total = 0
        for layer in self.layers:
            for t in (layer.A, layer.G, *(layer.eig or ())):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kfac"] = {
            "steps": self.steps,
            "eig_failures": self.eig_failures,
            "total_predicted_q": self.total_predicted_q,
            "layers": [{"A": layer.A, "G": layer.G, "eig": layer.eig} for layer in self.layers],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kfac = state_dict.get("kfac")
        rest = {k: v for k, v in state_dict.items() if k != "kfac"}
        super().load_state_dict(rest)
        if kfac is not None:
            self.steps = kfac["steps"]
            self.eig_failures = kfac["eig_failures"]
            self.total_predicted_q = kfac["total_predicted_q"]
            for layer, saved in zip(self.layers, kfac["layers"], strict=True):
                layer.A = None if saved["A"] is None else saved["A"].clone()
                layer.G = None if saved["G"] is None else saved["G"].clone()
                eig = saved["eig"]
                layer.eig = (
                    None
                    if eig is None
                    else (eig[0].clone(), eig[1].clone(), eig[2].clone(), eig[3].clone())
                )
