"""``load_task`` on a task file: its own classes reach DataLoader workers started by spawn."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from h3optim.tracking import IndexedDataset
from h3optim.tune.task import load_task

NAME = "h3_spawn_task"  # the task file's stem: a module name nothing else uses

TASK = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from h3optim.tune import Task


    class Blobs(Dataset):  # the task file's own dataset class, as real datasets are
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 3, (n,), generator=g)
            self.x = torch.randn(n, 4, generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]


    def make_task():
        return Task(
            nn.Linear(4, 3), Blobs(16, 0), Blobs(8, 1), nn.CrossEntropyLoss(),
            lambda p: torch.optim.SGD(p, lr=0.1), device="cpu",
        )
    """
)


@pytest.fixture
def task_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The task file; ``sys.path`` and ``sys.modules`` as they were afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    file = tmp_path / f"{NAME}.py"
    file.write_text(TASK)
    yield file
    sys.modules.pop(NAME, None)


def test_a_task_files_dataset_class_reaches_spawned_dataloader_workers(task_file: Path) -> None:
    """The file was loaded as ``_h3tune_<stem>``, a name a spawned worker cannot import
    (ModuleNotFoundError in the worker: h3-tune's ``workers`` trial failed on macOS and
    Windows, whose default start method is spawn); it loads under its own name."""
    task = load_task(f"{task_file}:make_task")
    loader = DataLoader(
        IndexedDataset(task.train_data),
        batch_size=4,
        num_workers=1,
        multiprocessing_context="spawn",
    )
    batches = list(loader)
    assert len(batches) == 4
    x, y, idx = batches[1]
    assert torch.equal(idx, torch.arange(4, 8))
    assert torch.equal(x, task.train_data.x[4:8]) and torch.equal(y, task.train_data.y[4:8])  # type: ignore[attr-defined]


def test_a_task_file_named_like_a_loaded_module_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "json.py"
    file.write_text(TASK)
    with pytest.raises(ValueError, match=r"as module 'json', which is .*json.*: rename the file"):
        load_task(f"{file}:make_task")
    assert str(tmp_path) not in sys.path


def test_the_task_files_directory_comes_first_on_sys_path(task_file: Path) -> None:
    """docs/tune.md: "its directory first on sys.path", as `python file.py` has it. A
    directory already on it further back stayed there, behind same-named modules."""
    sys.path.append(str(task_file.parent))  # already there, last
    load_task(f"{task_file}:make_task")
    assert sys.path[0] == str(task_file.parent)
