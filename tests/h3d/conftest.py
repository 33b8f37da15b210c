from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest

from tests.h3d.fake_pynvml import FakeGpu, make_module


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Install a fake ``pynvml`` (the hardware seam) backed by the given GPUs."""

    def install(gpus: list[FakeGpu], **kw: object) -> types.ModuleType:
        mod = make_module(gpus, **kw)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod

    return install


@pytest.fixture
def fake_amdsmi(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Install a fake ``amdsmi`` (the hardware seam) backed by the given GPU dies."""
    from tests.h3d.fake_amdsmi import FakeAmdGpu
    from tests.h3d.fake_amdsmi import make_module as make_amd

    def install(gpus: list[FakeAmdGpu], **kw: object) -> types.ModuleType:
        mod = make_amd(gpus, **kw)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "amdsmi", mod)
        return mod

    return install
