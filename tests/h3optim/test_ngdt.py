"""NGD-T: the natural-gradient direction, the dissipation budget, rank deficiency, state and
distributed agreement."""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from h3optim import NGDT


def test_direction_matches_the_true_fisher_on_a_linear_gaussian_model() -> None:
    # y = W x + ε, ε ~ N(0, I): the Fisher of W is E[x xᵀ] ⊗ I. Near the true W the residuals
    # are the noise, so K-FAC's factors converge to exactly that Fisher.
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 6, 3, 50_000
    cov_root = torch.randn(d_in, d_in, generator=g) / 2 + torch.eye(d_in)
    x = torch.randn(n, d_in, generator=g) @ cov_root
    w_true = torch.randn(d_out, d_in, generator=g)
    y = x @ w_true.t() + torch.randn(n, d_out, generator=g)
    model = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_true + 0.05 * torch.randn(d_out, d_in, generator=g))
    opt = NGDT(model, lr_max=1e-9, q_budget=1.0, damping=1e-6, factor_decay=0.0, inv_update_steps=1)
    loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    grad = model.weight.grad.clone()
    layer = opt.layers[0]
    opt._update_factors(0.0)
    opt._update_eigs()
    nat, null, frac = opt._natural(layer, grad, 1e-6)
    assert frac == 0.0 and torch.count_nonzero(null) == 0
    sigma = x.t() @ x / n  # E[x xᵀ]
    expected = grad @ torch.linalg.inv(sigma)  # (Σ ⊗ I)⁻¹ vec(g) = g Σ⁻¹
    cos = float((nat * expected).sum() / (nat.norm() * expected.norm()))
    assert cos > 0.995
    assert float((nat - expected).norm() / expected.norm()) < 0.08


def mlp_and_batch(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.randn(64, 8), torch.randint(0, 4, (64,))


@pytest.mark.parametrize("q", [1e-5, 1e-3, 1e-1])
def test_predicted_dissipation_never_exceeds_the_budget(q: float) -> None:
    model, x, y = mlp_and_batch()
    opt = NGDT(model, lr_max=0.5, q_budget=q, damping=1e-3)
    bounds = set()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s = opt.last_stats
        bounds.add(s["bound"])
        assert s["predicted_q"] == pytest.approx(0.5 * s["eta"] ** 2 * s["delta_f"])
        if s["bound"] == "budget":
            assert s["predicted_q"] == pytest.approx(q, rel=1e-9)
        else:
            assert s["eta"] == 0.5 and s["predicted_q"] <= q * (1 + 1e-9)
    assert "budget" in bounds


def test_budget_schedule_and_stats_callback() -> None:
    model, x, y = mlp_and_batch()
    seen: list[dict] = []
    opt = NGDT(model, lr_max=10.0, q_budget=lambda step: 1e-3 / step, stats_callback=seen.append)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert [round(s["q_budget"] * 1e3, 6) for s in seen] == [1.0, 0.5, round(1 / 3, 6), 0.25, 0.2]
    assert opt.total_predicted_q == pytest.approx(sum(s["predicted_q"] for s in seen))


def test_a_rank_deficient_layer_trains_without_nan() -> None:
    torch.manual_seed(0)
    base = torch.randn(256, 4)
    x = torch.cat([base, base, torch.zeros(256, 2)], dim=1)  # duplicated and dead inputs
    y = (base[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2, damping=1e-8)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(loss.detach()) < 0.5 * first
    assert opt.last_stats["nullspace_frac"] > 0  # the nullspace was detected, not amplified


def test_state_dict_round_trip_gives_the_identical_next_step() -> None:
    model, x, y = mlp_and_batch()
    opt = NGDT(model, lr_max=0.5, q_budget=1e-3, inv_update_steps=3)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    clone = copy.deepcopy(model)
    opt2 = NGDT(clone, lr_max=0.5, q_budget=1e-3, inv_update_steps=3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (clone, opt2)):
        for _ in range(3):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_uncovered_parameters_use_the_fallback_and_plain_params_work() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = NGDT(model)
    assert [g["kfac"] for g in opt.param_groups] == [True, False]
    ln = model[1].weight.detach().clone()
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(ln, model[1].weight)
    p = nn.Parameter(torch.ones(3))
    plain = NGDT([p], fallback_lr=0.1)
    (p * p).sum().backward()
    plain.step()
    assert torch.all(p < 1)


def test_a_conv_net_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.5 * first
    assert opt.factor_bytes > 0


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)  # same initial model on every rank
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = NGDT(model, lr_max=0.5, q_budget=1e-3, inv_update_steps=1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():  # DDP would average the gradients
        dist.all_reduce(p.grad)
        p.grad /= world
    opt.step()
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "A": opt.layers[0].A},
        os.path.join(out, f"{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_gloo_ranks_precondition_identically() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
        r0 = torch.load(os.path.join(out, "0.pt"))
        r1 = torch.load(os.path.join(out, "1.pt"))
    assert torch.equal(r0["A"], r1["A"])  # factors averaged across ranks
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(float(r0["params"][0].sum()))


def digits_batch(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of sklearn's 8×8 digits, as (n, 64) floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def _train(
    model: nn.Module, opt: NGDT, x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_eval_mode_trains_the_covered_layers_as_train_mode_does() -> None:
    """torch optimizers do not care about train/eval mode (fine-tuning with frozen
    batch-norm statistics trains in eval mode): NGD-T records its factors in either, and a
    model without dropout or batch norm takes the same steps in both."""
    x, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    twin = copy.deepcopy(model)  # before NGDT hooks it
    model.train()
    twin.eval()
    _train(model, NGDT(model, lr_max=0.5, q_budget=1e-2), x, y, 5)
    _train(twin, NGDT(twin, lr_max=0.5, q_budget=1e-2), x, y, 5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # fine-tuning with batch norm frozen: eval mode, every Linear layer moves, the loss falls
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net(x)  # batch-norm statistics from the data, then frozen
    net.eval()
    before = [m.weight.detach().clone() for m in (net[0], net[3])]
    opt = NGDT(net, lr_max=0.5, q_budget=1e-2)
    losses = _train(net, opt, x, y, 30)
    assert not net.training and losses[-1] < 0.5 * losses[0]
    for m, w in zip((net[0], net[3]), before, strict=True):
        assert not torch.equal(m.weight, w)
    assert all(layer.eig is not None for layer in opt.layers)


def test_a_bias_frozen_before_building_is_left_alone_and_its_weight_preconditioned() -> None:
    x, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    assert opt.layers[0].bias is None and opt.layers[1].bias is model[2].bias
    losses = _train(model, opt, x, y, 20)
    assert losses[-1] < 0.7 * losses[0]
    assert opt.layers[0].A.shape == (64, 64) and opt.layers[1].A.shape == (33, 33)
    assert torch.equal(model[0].bias, bias)
    # a frozen bias that holds a gradient is not updated either
    model[0].bias.grad = torch.ones(32)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].bias, bias)


def test_freezing_part_of_a_covered_layer_after_building_is_a_clear_error() -> None:
    x, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    _train(model, opt, x, y, 2)
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layer '2': its bias was frozen after"):
        _train(model, opt, x, y, 1)
    # freezing the whole layer is fine: it stays as it is, the others train on
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    first = model[0].weight.detach().clone()
    _train(model, opt, x, y, 2)
    assert torch.equal(model[2].weight, frozen) and not torch.equal(model[0].weight, first)


def _conv_rows(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The layer's output recomputed from NGD-T's activation rows: a @ [W b]ᵀ."""
    return layer.activations(x) @ layer.weight_matrix().t()


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=4, padding="same", dilation=2),  # asymmetric padding
        dict(kernel_size=3, padding="valid", stride=2),
        dict(kernel_size=3, padding=(1, 2), padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", bias=False),
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
    ],
)
def test_conv_activations_reproduce_the_layers_output(conv: dict[str, Any]) -> None:
    """The rows K-FAC's activation factor is built from are the layer's own input patches,
    for every padding Conv2d takes: each row times the weight gives that output pixel."""
    x, _ = digits_batch(16)
    images = x.reshape(-1, 1, 8, 8).repeat(1, 2, 1, 1)
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, **conv)
    opt = NGDT(model)
    layer = opt.layers[0]
    with torch.no_grad():
        out = model(images)
        rows = _conv_rows(layer, images)
        assert torch.allclose(rows, out.permute(0, 2, 3, 1).reshape(-1, 3), atol=1e-5)
        single = _conv_rows(layer, images[0])  # an unbatched image
        assert torch.allclose(single, out[0].permute(1, 2, 0).reshape(-1, 3), atol=1e-5)


def test_same_padding_and_grouped_convolutions_train() -> None:
    """padding="same" is preconditioned like any other padding; a grouped convolution,
    whose weight is not one Kronecker product, is left to the fallback (Adam) and said so
    in ``uncovered``, with no warning."""
    x, y = digits_batch()
    images = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding="same"),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    assert [layer.name for layer in opt.layers] == ["0", "5"]
    assert opt.uncovered == {"2": "a grouped convolution (groups=2)"}
    grouped = model[2].weight.detach().clone()
    assert all(
        id(p) not in {id(q) for q in opt.param_groups[0]["params"]} for p in model[2].parameters()
    )
    losses = _train(model, opt, images, y, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model[2].weight, grouped)
    assert all(layer.eig is not None for layer in opt.layers)


def test_a_layer_used_without_its_forward_takes_the_fallback_step_with_a_warning() -> None:
    """nn.MultiheadAttention uses its out_proj Linear's weight without calling it: no
    activations are recorded for it. It takes the fallback step (it used to be left
    unchanged, silently), with one warning naming it."""
    x, y = digits_batch(128)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16 * 8, 10)

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            h = self.embed(rows.reshape(-1, 8, 8))  # each image as 8 rows of 8 pixels
            h, _ = self.attn(h, h, h, need_weights=False)
            return self.head(h.flatten(1))

    torch.manual_seed(0)
    model = Attend()
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    assert any(layer.module is model.attn.out_proj for layer in opt.layers)
    out_proj = model.attn.out_proj.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"'attn.out_proj' takes the fallback \(Adam\) step"):
        losses = _train(model, opt, x, y, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a layer
        losses += _train(model, opt, x, y, 29)
    assert not torch.equal(model.attn.out_proj.weight, out_proj)
    assert losses[-1] < 0.7 * losses[0]


def _train_scaled(
    scaler: torch.amp.GradScaler | None,
    *,
    overflow_at: int | None = None,
    clip: bool = False,
    steps: int = 12,
) -> tuple[nn.Module, NGDT]:
    """An MLP on digits batches, NGD-T stepped through ``scaler`` (None: no scaler). At step
    ``overflow_at`` the loss is inf (without a scaler that step is left out); ``clip``:
    ``scaler.unscale_`` before ``scaler.step``, as gradient clipping does."""
    x, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2, inv_update_steps=4)
    for step in range(steps):
        xb, yb = x[(step * 64) % 512 :][:64], y[(step * 64) % 512 :][:64]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        if step == overflow_at:
            if scaler is None:
                continue
            loss = loss * math.inf
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        scaler.step(opt)
        scaler.update()
    return model, opt


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=10**6)


def test_under_a_grad_scaler_the_factors_and_steps_are_the_unscaled_ones() -> None:
    """GradScaler scales the loss, so the output gradients the hooks record carry the scale
    (G was scale² too large: K-FAC's steps shrank to nothing). ``scaler.step`` tells NGDT the
    scale: the run is the one without a scaler, factors and parameters alike."""
    plain, plain_opt = _train_scaled(None)
    scaled, scaled_opt = _train_scaled(_scaler())
    assert scaled_opt.steps == plain_opt.steps == 12
    for a, b in zip(plain_opt.layers, scaled_opt.layers, strict=True):
        assert torch.allclose(a.G, b.G, rtol=1e-5, atol=1e-9)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert scaled_opt.last_stats["bound"] == plain_opt.last_stats["bound"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scaled.parameters())


def test_an_overflowing_step_under_a_grad_scaler_changes_nothing() -> None:
    """A step whose gradients overflow is skipped whole: its output gradients are not
    folded into the factors, and the run is the one that left that step out."""
    plain, plain_opt = _train_scaled(None, overflow_at=5)
    scaled, scaled_opt = _train_scaled(_scaler(), overflow_at=5)
    assert scaled_opt.steps == plain_opt.steps == 11
    for a, b in zip(plain_opt.layers, scaled_opt.layers, strict=True):
        assert torch.isfinite(b.G).all() and torch.allclose(a.G, b.G, rtol=1e-5, atol=1e-9)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_unscaling_before_the_step_needs_the_scaler_handed_to_ngdt() -> None:
    """After ``scaler.unscale_`` (to clip), ``scaler.step`` no longer says the scale: with
    ``grad_scaler=scaler`` NGD-T reads it, without it the step is a clear error."""
    plain, _ = _train_scaled(None)
    scaler = _scaler()
    with pytest.raises(RuntimeError, match=r"grad_scaler=scaler"):
        _train_scaled(scaler, clip=True)

    x, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    scaler = _scaler()
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2, inv_update_steps=4, grad_scaler=scaler)
    for step in range(12):
        xb, yb = x[(step * 64) % 512 :][:64], y[(step * 64) % 512 :][:64]
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(xb), yb)).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        scaler.step(opt)
        scaler.update()
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_param_group_added_later_trains_with_the_fallback() -> None:
    """``add_param_group`` (a new head, unfrozen parameters) as with any torch optimizer: the
    group takes the Adam fallback (it raised KeyError 'kfac' at the next step)."""
    x, y = digits_batch()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
    head = nn.Linear(32, 10)
    opt = NGDT(body, lr_max=0.5, q_budget=1e-2)
    opt.add_param_group({"params": head.parameters(), "fallback_lr": 1e-2})
    assert [g["kfac"] for g in opt.param_groups] == [True, False]
    model = nn.Sequential(body, head)
    start = [p.detach().clone() for p in model.parameters()]
    losses = _train(model, opt, x, y, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    with pytest.raises(ValueError, match=r"takes the fallback \(Adam\) step, not K-FAC"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "kfac": True})


def test_a_model_compiled_before_ngdt_gets_a_warning_naming_torch_compile() -> None:
    """Hooks added to a module after its compiled version ran are not seen by the compiled
    code: no factors, every layer takes the fallback. The warning says so (it blamed a
    weight used without calling its module), and ``last_stats`` says K-FAC took no step
    (it reported η = lr_max). Built before compiling, NGD-T preconditions as usual; so it does
    when the compiled model ran only under ``torch.no_grad`` before (Dynamo guards on the grad
    mode: the first recorded forward compiles anew, with the hooks)."""
    x, y = digits_batch(128)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    compiled = torch.compile(model, backend="eager")
    nn.functional.cross_entropy(compiled(x), y).backward()  # a first compiled call
    seen: list[dict[str, Any]] = []
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2, stats_callback=seen.append)
    with pytest.warns(RuntimeWarning, match=r"torch\.compile.*build NGDT before compiling"):
        losses = _train(compiled, opt, x, y, 3)
    assert all(layer.A is None for layer in opt.layers)
    assert losses[-1] < losses[0]  # the fallback trains
    for stats in seen:
        assert stats["eta"] is None and stats["bound"] == "fallback"
        assert stats["delta_f"] == 0.0 and stats["predicted_q"] == 0.0
    assert opt.total_predicted_q == 0.0

    for evaluated_first in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        if not evaluated_first:
            opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
        compiled = torch.compile(model, backend="eager")
        if evaluated_first:
            with torch.no_grad():
                compiled(x)
            opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(compiled, opt, x, y, 3)
        assert not [w for w in caught if "NGDT" in str(w.message)]
        assert all(layer.eig is not None for layer in opt.layers)
        assert opt.last_stats["bound"] in ("budget", "lr_max") and opt.last_stats["eta"] > 0


def test_lr_schedulers_drive_the_cap_and_the_fallbacks_step() -> None:
    """Torch LR schedulers raised ``KeyError: 'lr'`` (the groups had none). Each group's
    ``"lr"`` is now the K-FAC step's cap (``lr_max``) or the fallback's Adam step
    (``fallback_lr``), and the step follows what a scheduler writes there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    opt = NGDT(model, lr_max=0.5, q_budget=math.inf, fallback_lr=1e-2)  # the cap always holds
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-2]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        assert opt.last_stats["bound"] == "lr_max"
        assert opt.last_stats["eta"] == pytest.approx(0.5 * 0.5**k)
    # the fallback's step is the scheduled one: as torch's Adam under the same schedule
    p, q = nn.Parameter(torch.linspace(-1, 1, 4)), nn.Parameter(torch.linspace(-1, 1, 4))
    ngdt, adam = NGDT([p], fallback_lr=0.1), torch.optim.Adam([q], lr=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.3) for o in (ngdt, adam)]
    for _ in range(4):
        for param, o in ((p, ngdt), (q, adam)):
            o.zero_grad()
            (param**4).sum().backward()
            o.step()
        for s in scheds:
            s.step()
    assert torch.allclose(p, q, atol=1e-6) and not torch.allclose(p, torch.linspace(-1, 1, 4))
    for make in (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.5, 1e-2], total_steps=10),
    ):
        make(NGDT(model, lr_max=0.5))


def test_a_checkpoint_from_before_the_groups_lr_loads_with_its_steps() -> None:
    """A state_dict whose groups hold ``lr_max`` and ``fallback_lr`` and no ``lr`` (saved
    before groups had one) loads with the cap and the fallback's step it had."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = NGDT(model, lr_max=0.3, fallback_lr=2e-2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["lr"]
        group["lr_max"] = 0.3
    fresh = NGDT(model, lr_max=0.5)
    fresh.load_state_dict(old)
    assert [g["lr"] for g in fresh.param_groups] == [0.3, 2e-2]
    assert not any("lr_max" in g for g in fresh.param_groups)


def test_sparse_gradients_are_a_clear_runtime_error_before_any_change() -> None:
    """An ``nn.Embedding(sparse=True)`` gradient reached the fallback's Adam and raised a
    dispatcher dump (NotImplementedError, ``aten::ne.Scalar`` on SparseCPU) after the K-FAC
    layers had stepped; it is a RuntimeError, as under H3Optimizer or Adam, before any
    parameter changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = NGDT(model, lr_max=0.5, q_budget=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.tensor([1, 2, 3])), torch.tensor([0, 1, 0])).backward()
    with pytest.raises(RuntimeError, match=r"NGDT does not support sparse gradients.*SparseAdam"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
