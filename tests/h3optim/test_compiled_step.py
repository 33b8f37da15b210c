"""``torch.compile(opt.step)``, PyTorch's compiled-optimizer recipe, on H3Optimizer's paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from h3optim import H3Optimizer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*script_method.*:DeprecationWarning"  # torch.compile's import
)


def _train(compiled: bool) -> tuple[list[torch.Tensor], H3Optimizer]:
    """Four steps of a small MLP, the third with a NaN gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = H3Optimizer(model.parameters(), lr=1e-2)
    # the assert is in AOTAutograd's functionalization, which Inductor (the default backend)
    # runs first: "aot_eager" runs it too, without generating code
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    for i in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i == 2:
            model[0].weight.grad[0, 0] = float("nan")
        step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_a_compiled_default_step_gives_the_eager_steps_parameters_and_skips() -> None:
    """The default path (the fused kernel on the CPU, as with ``fused=True``) failed to
    compile: AOTAutograd asserts on the kernel. Traced, it takes the reference update, to
    float tolerance of the kernel's (the foreach and reference paths compiled already)."""
    torch._dynamo.reset()
    eager, eager_opt = _train(False)
    compiled, opt = _train(True)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
    assert opt.skipped_steps == eager_opt.skipped_steps == 1
    counts = {float(s["step"]) for s in opt.state.values()}
    assert counts == {4.0}
