"""NGD-T: what reaches the Kronecker factors: every backward since the gradients were
zeroed (gradient accumulation), no non-finite batch, any parameter dtype."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from h3optim import NGDT


class _SharedMiddle(nn.Module):
    """One Linear layer called twice in a forward: recorded twice, for one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        return self.out(torch.tanh(self.mid(h)))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), (8,)),
    "conv": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
        ),
        (1, 6, 6),
    ),
    "shared layer": (_SharedMiddle, (8,)),
}


def _accumulated_run(
    model_name: str, sizes: list[int], steps: int = 6
) -> tuple[nn.Module, NGDT, list[dict[str, float]]]:
    """NGD-T on 48 samples (float64), each step's gradient accumulated over micro-batches of
    ``sizes``, each backward of its mean loss weighted by its share of the batch (the
    ``loss / k`` of equal micro-batches)."""
    make, shape = MODELS[model_name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    model = make().double()
    opt = NGDT(model, lr_max=0.3, q_budget=1e-2, inv_update_steps=3)
    factors = []
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True):
            loss = nn.functional.cross_entropy(model(xb), yb) * (len(yb) / len(y))
            loss.backward()
        opt.step()
        factors.append({"delta_f": opt.last_stats["delta_f"]})
        for i, layer in enumerate(opt.layers):
            assert layer.A is not None and layer.G is not None
            factors[-1][f"A{i}"] = float(layer.A.norm())
            factors[-1][f"G{i}"] = float(layer.G.norm())
    return model, opt, factors


@pytest.mark.parametrize("model_name", list(MODELS))
def test_accumulated_micro_batches_give_the_full_batchs_factors_and_steps(
    model_name: str,
) -> None:
    """Under gradient accumulation the factors came from the last micro-batch alone, at 1/k²
    of their scale (its output gradients carry the 1/k of loss/k): Δ_F was k² too large and
    η_T k too small. Every backward since the gradients were zeroed now adds to the factors,
    scaled by the samples of all of them: the run is the full-batch run, step for step."""
    full, full_opt, full_factors = _accumulated_run(model_name, [48])
    for sizes in ([24, 24], [12, 12, 12, 12], [20, 28]):
        acc, acc_opt, acc_factors = _accumulated_run(model_name, sizes)
        for step, (f, a) in enumerate(zip(full_factors, acc_factors, strict=True)):
            for key in f:
                assert a[key] == pytest.approx(f[key], rel=1e-9), (sizes, step, key)
        for p, q in zip(full.parameters(), acc.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-10), sizes
        assert acc_opt.total_predicted_q == pytest.approx(full_opt.total_predicted_q, rel=1e-9)


def test_a_layer_called_twice_in_a_forward_counts_its_batch_once() -> None:
    """Its two calls' rows are averaged, and their output gradients carry the one batch's
    per-sample scale (the loss averages over 48 samples, not 96)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    model = _SharedMiddle()
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        out.retain_grad()
        outputs.append(out)

    model.mid.register_forward_hook(keep)
    opt = NGDT(model, lr_max=0.3, q_budget=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    gy = torch.cat([o.grad for o in outputs])  # 96 rows
    assert opt.layers[1].G is not None
    assert torch.allclose(opt.layers[1].G, gy.t() @ gy * (48**2 / 96), rtol=1e-5)


def test_a_backward_whose_gradients_were_zeroed_is_not_in_the_factors() -> None:
    """``zero_grad`` drops what the hooks recorded with the gradients it drops, so the factors
    describe the gradient the step takes."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    runs = []
    for discarded in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = NGDT(model, lr_max=0.3, q_budget=1e-2)
        if discarded:
            nn.functional.cross_entropy(model(2 * x[:8]), y[:8]).backward()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        runs.append(opt)
    for a, b in zip(runs[0].layers, runs[1].layers, strict=True):
        assert a.A is not None and b.A is not None and torch.equal(a.A, b.A)
        assert a.G is not None and b.G is not None and torch.equal(a.G, b.G)


@pytest.mark.parametrize(("bad_step", "value"), [(0, float("inf")), (5, float("nan"))])
def test_a_non_finite_batch_leaves_the_factors_and_its_layer_alone(
    bad_step: int, value: float
) -> None:
    """A batch with a corrupt sample (inf or NaN, no GradScaler) was folded into the running
    factors before its non-finite gradient was dropped: the factor stayed NaN for good, every
    later eigendecomposition failed and the layer kept a stale eigenbasis (at the first step:
    the fallback, with a warning). It is left out of the factors as its gradient is."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = NGDT(model, lr_max=0.3, q_budget=1e-2, inv_update_steps=4)
    first = opt.layers[0]

    def snapshot() -> list[torch.Tensor | None]:
        kept = [*first.params(), first.A, first.G]
        return [None if t is None else t.detach().clone() for t in kept]

    losses = []
    for step in range(30):
        xb = x.clone()
        if step == bad_step:
            xb[0, 0] = value
            before = snapshot()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), y)
        loss.backward()
        opt.step()
        if step == bad_step:
            assert not torch.isfinite(first.weight.grad).all()
            for t, b in zip(snapshot(), before, strict=True):
                assert (t is None and b is None) or (
                    t is not None and b is not None and torch.equal(t, b)
                )
        else:
            losses.append(float(loss.detach()))
    assert opt.eig_failures == 0
    for layer in opt.layers:
        assert layer.A is not None and layer.G is not None
        assert torch.isfinite(layer.A).all() and torch.isfinite(layer.G).all()
    assert opt.last_stats["bound"] in ("budget", "lr_max")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["float64", "bf16", "fp16"]
)
def test_a_model_in_any_float_dtype_trains(dtype: torch.dtype) -> None:
    """The factors were float32 whatever the weights, and the step's matmul refused a
    float64, bf16 or fp16 gradient at the first step. They are in the weight's dtype, at
    least float32, and the weights keep theirs."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    opt = NGDT(model, lr_max=0.3, q_budget=1e-2, inv_update_steps=5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    factor_dtype = torch.promote_types(dtype, torch.float32)
    for layer in opt.layers:
        assert layer.A is not None and layer.A.dtype == factor_dtype
        assert layer.eig is not None and layer.eig[1].dtype == factor_dtype
    assert opt.last_stats["bound"] in ("budget", "lr_max")
    assert losses[-1] < 0.7 * losses[0]
