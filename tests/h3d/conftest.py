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
