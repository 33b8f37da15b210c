"""Subnormal floats: counted from the bits, and flushed while AutoH3 trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from h3optim import AutoH3
from h3optim.denormals import (
    flush_denormal_enabled,
    flushing_denormals,
    set_flush_denormal,
    subnormal_count,
    subnormal_share,
)


@pytest.mark.parametrize("flush", [False, True])
def test_subnormals_are_counted_from_the_bits_in_either_mode(flush: bool) -> None:
    f32 = torch.tensor([1e-39, 0.0, -0.0, 1.0, -1e-40, 1.2e-38, float("inf"), float("nan")])
    f64 = torch.tensor([1e-310, 1e-300, 0.0], dtype=torch.float64)
    f16 = torch.tensor([1e-6, 1e-4, 0.0], dtype=torch.float16)
    bf16 = torch.tensor([1e-39, 1e-30], dtype=torch.bfloat16)
    ints = torch.arange(5)
    torch.set_flush_denormal(flush)  # after the tensors: flush-to-zero would zero their making
    assert subnormal_count([f32]) == (2, 8)
    assert subnormal_count([f64, f16, bf16, ints]) == (3, 8)
    assert subnormal_share([f32, ints]) == 2 / 8
    assert subnormal_share([]) == 0.0


@pytest.mark.parametrize("before", [False, True])
def test_flushing_denormals_restores_the_mode_it_found_however_the_block_ends(
    before: bool,
) -> None:
    torch.set_flush_denormal(before)
    with flushing_denormals() as n:
        assert n >= 1 and flush_denormal_enabled()
    assert flush_denormal_enabled() is before
    with pytest.raises(RuntimeError, match="inside"), flushing_denormals(not before):
        assert flush_denormal_enabled() is not before
        raise RuntimeError("inside")
    assert flush_denormal_enabled() is before


def decayed_adam() -> torch.optim.Adam:
    """Adam whose second moment decays from one tiny gradient into the subnormal range."""
    p = nn.Parameter(torch.zeros(1000))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.9))
    p.grad = torch.full_like(p, 1e-15)
    opt.step()
    p.grad = torch.zeros_like(p)
    for _ in range(200):
        opt.step()
    return opt


def test_adam_state_goes_subnormal_and_flush_to_zero_keeps_it_out() -> None:
    torch.set_flush_denormal(False)
    plain = decayed_adam()
    # exp_avg_sq (1e-31 × 0.9^200 ≈ 7e-41) is subnormal: a third of params + state
    assert subnormal_share(plain) == pytest.approx(1 / 3)
    assert torch.set_flush_denormal(True)
    assert flush_denormal_enabled()
    assert subnormal_share(decayed_adam()) == 0.0  # flushed to zero as it decayed


def digits_auto(flush: bool) -> tuple[AutoH3, nn.Module]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32)[:512], torch.tensor(y)[:512])
    auto = AutoH3(
        model.parameters(),
        ds,
        total_epochs=2,
        profile=False,
        flush_denormal=flush,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    return auto, model


@pytest.mark.parametrize("flush", [False, True])
def test_autoh3_flushes_from_start_to_finish_and_restores_the_mode(flush: bool) -> None:
    torch.set_flush_denormal(False)
    auto, model = digits_auto(flush)
    crit = nn.CrossEntropyLoss()
    for _ in range(2):
        for data, target, idx in auto.get_loader(batch_size=64):
            auto.training_step(model, data, target, crit, idx)
            assert flush_denormal_enabled() is flush
    res = auto.finish()
    assert not flush_denormal_enabled()  # as start() found it
    assert 0.0 <= res["subnormal_share"] < 1e-3


def test_autoh3_leaves_flush_to_zero_on_when_it_was_on() -> None:
    torch.set_flush_denormal(True)
    auto, _model = digits_auto(True)
    auto.start()
    auto.finish()
    assert flush_denormal_enabled()


def test_set_flush_denormal_reaches_every_intra_op_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((4_000_000,), 1e-39)  # large enough to be split between two threads
        assert int(((x * 1.0) == 0).sum()) == 0  # subnormals computed as such; pool started
        assert set_flush_denormal(True) == 2
        assert int(((x * 1.0) == 0).sum()) == x.numel()  # torch's own call flushes about half
        assert set_flush_denormal(False) == 2
        assert int(((x * 1.0) == 0).sum()) == 0 and not flush_denormal_enabled()
    finally:
        torch.set_num_threads(threads)


def test_openmp_runtime_is_pytorchs_own_copy_first() -> None:
    from pathlib import Path

    from h3optim.denormals import _openmp_candidates

    lib = Path("/venv/torch/lib")
    paths = [
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
        "/venv/torch/lib/libgomp-a34b3233.so.1",  # a pip wheel's renamed copy
        "/venv/torch/lib/libgomp-a34b3233.so.1",  # mapped more than once
        "/venv/torch/lib/libtorch_cpu.so",
        "/opt/intel/lib/libiomp5.so",
        "/usr/lib/libgomputil.so",
    ]
    assert _openmp_candidates(paths, lib) == [
        "/venv/torch/lib/libgomp-a34b3233.so.1",
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
        "/opt/intel/lib/libiomp5.so",
    ]


def test_a_script_that_never_calls_finish_exits() -> None:
    """AutoH3 started and left without ``finish()``: at interpreter exit its flush-to-zero
    block is closed by the garbage collector, when the intra-op threads can no longer run
    Python; the mode is restored on the calling thread only, and the process exits."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from h3optim import AutoH3\n"
        "torch.set_num_threads(2)\n"
        "model = torch.nn.Linear(4, 2)\n"
        "ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))\n"
        "auto = AutoH3(model.parameters(), ds, profile=False).start()\n"
        "print('started', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == "started\n", proc.stderr[-2000:]
