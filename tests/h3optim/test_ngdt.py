"""NGD-T: the natural-gradient direction, the dissipation budget, rank deficiency, state and
distributed agreement."""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile

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
