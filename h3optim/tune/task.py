"""The task protocol: what a user hands the tuner, and how ``file.py:factory`` is loaded."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

Metric = Callable[[nn.Module, DataLoader[Any]], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader[Any]) -> float:
    """Fraction of ``(x, y)`` batches whose arg-max prediction equals the label."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


@dataclass
class Task:
    """What the tuner needs to train one model many ways.

    Args:
        model: The model, freshly initialised. Every trial trains a deep copy of it, so all
            trials start from the same weights.
        train_data: A map-style dataset of ``(input, target)`` items.
        val_data: Held-out ``(input, target)`` items for the metric.
        loss: ``loss(output, target) -> scalar``, in nats (e.g. ``nn.CrossEntropyLoss()``).
            A loss with a ``reduction`` attribute also gives per-sample losses, which H3's
            sampler needs.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``.
        metric: ``metric(model, val_loader) -> float``, higher is better (default: accuracy).
        batch_size: The baseline's batch size.
        name: A label for runs and reports.
        metric_name: What the metric is called in reports.
        device: ``"cuda"`` when available, else ``"cpu"`` (default), or any torch device.

    Example:
        >>> def make_task() -> Task:  # doctest: +SKIP
        ...     model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        ...     return Task(model, train_set, val_set, nn.CrossEntropyLoss(),
        ...                 lambda p: torch.optim.Adam(p, lr=1e-3))
    """

    model: nn.Module
    train_data: Dataset[Any]
    val_data: Dataset[Any]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: OptimizerFactory
    metric: Metric = accuracy
    batch_size: int = 64
    name: str = "task"
    metric_name: str = "accuracy"
    device: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"Invalid batch_size: {self.batch_size}")
        if len(self.train_data) < 1:  # type: ignore[arg-type]
            raise ValueError("train_data is empty")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def n_train(self) -> int:
        return len(self.train_data)  # type: ignore[arg-type]


def _import_file(file: Path) -> ModuleType:
    """Run ``file`` as the module named by its stem, its directory first on ``sys.path`` (as
    ``python file.py`` has it), so that the name imports: DataLoader workers pickle the
    file's classes by module name, and a spawned worker (the default start method on macOS
    and Windows) imports that module afresh, with this process's ``sys.path``.

    Raises:
        ValueError: Another module of that name is loaded already.
    """
    name = file.stem
    taken = getattr(sys.modules.get(name), "__file__", None)
    if name in sys.modules and (taken is None or Path(taken).resolve() != file):
        raise ValueError(
            f"cannot load {file} as module {name!r}, which is {taken or 'built in'}: "
            "rename the file"
        )
    if sys.path[:1] != [str(file.parent)]:  # first, as `python file.py` has it: its
        sys.path.insert(0, str(file.parent))  # neighbours win over same-named modules
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"cannot import {file}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    return module


def load_task(spec: str) -> Task:
    """Call the factory named by ``"path/to/file.py:make_task"`` (or ``"pkg.module:make_task"``).

    Raises:
        ValueError: The spec has no ``:factory`` part, the file, module or factory is missing,
            another module has the file's name, or the factory returns something other than
            a :class:`Task`.
    """
    path, sep, attr = spec.rpartition(":")
    if not sep or not path or not attr:
        raise ValueError(f"expected 'path/to/file.py:factory', got {spec!r}")
    if path.endswith(".py") or "/" in path or "\\" in path:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"no such file: {file}")
        module = _import_file(file.resolve())
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as exc:  # a mistyped module, or one its own imports fail in
            raise ValueError(f"cannot import {path}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable {attr!r}")
    task = factory()
    if not isinstance(task, Task):
        raise ValueError(f"{spec} returned {type(task).__name__}, not h3optim.tune.Task")
    return task
