"""Batch-at-once loading gives the batches the per-sample loader gives."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from h3optim import (
    IndexedDataset,
    InformationWeightedSampler,
    LossTracker,
    TensorBatchSampler,
    batch_loader,
    is_batchable,
)


def data(n: int = 50) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_batched_and_per_sample_loaders_agree() -> None:
    ds = IndexedDataset(data())
    t = LossTracker(len(ds))
    t.update(torch.arange(50), torch.rand(50, generator=torch.Generator().manual_seed(1)))
    s = InformationWeightedSampler(ds, t, keep_frac=0.5, uniform_mix=0.3, seed=2)
    s.set_epoch(1)
    assert is_batchable(ds) and is_batchable(data())
    fast = list(batch_loader(ds, s, 8))
    slow = list(DataLoader(ds, batch_size=8, sampler=s))
    assert len(fast) == len(slow) == 4
    for (x1, y1, i1), (x2, y2, i2) in zip(fast, slow, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    dropped = list(batch_loader(ds, s, 8, drop_last=True))
    assert [len(b[2]) for b in dropped] == [8, 8, 8]
    plain = list(batch_loader(data(), s, 8))  # a bare TensorDataset gives (x, y)
    assert len(plain[0]) == 2 and torch.equal(plain[0][0], fast[0][0])


class Items(Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), i % 3


def test_other_datasets_fall_back_to_the_per_sample_loader() -> None:
    ds = IndexedDataset(Items())
    assert not is_batchable(ds)
    sampler = torch.utils.data.SequentialSampler(range(10))
    batches = list(batch_loader(ds, sampler, 4))
    assert [b[2].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(TypeError, match="TensorDataset"):
        ds[torch.tensor([0, 1])]


def test_tensor_batch_sampler_reads_any_sampler() -> None:
    bs = TensorBatchSampler(torch.utils.data.SequentialSampler(range(7)), 3)
    assert [b.tolist() for b in bs] == [[0, 1, 2], [3, 4, 5], [6]] and len(bs) == 3
    assert len(TensorBatchSampler(torch.utils.data.SequentialSampler(range(7)), 3, True)) == 2
    with pytest.raises(ValueError):
        TensorBatchSampler(torch.utils.data.SequentialSampler(range(7)), 0)


def test_an_epoch_shorter_than_a_batch_with_drop_last_yields_no_batch() -> None:
    # 50 samples at batch 64 with drop_last: len() is 0 and so is the epoch (it used to
    # yield one empty batch, whose mean loss is nan)
    ds = IndexedDataset(data())
    sampler = torch.utils.data.SequentialSampler(range(50))
    loader = batch_loader(ds, sampler, 64, drop_last=True)
    assert len(loader) == 0 and list(loader) == []
    assert len(list(batch_loader(ds, sampler, 64))) == 1  # without drop_last: the short batch
    # an empty epoch, with or without drop_last, has no batch either
    for drop_last in (False, True):
        empty = TensorBatchSampler(torch.utils.data.SequentialSampler(range(0)), 4, drop_last)
        assert len(empty) == 0 and list(empty) == []
        none = torch.utils.data.SequentialSampler(range(0))
        assert list(batch_loader(ds, none, 4, drop_last=drop_last)) == []


def test_the_presets_loader_with_drop_last_trains_on_no_empty_batch() -> None:
    from h3optim import h3_cifar_safe

    model = torch.nn.Linear(3, 4)
    setup = h3_cifar_safe(model.parameters(), data())
    _phase, loader = setup.get_loader(0, 10, batch_size=64, drop_last=True)
    assert len(loader) == 0
    for x, y, _idx in loader:  # pragma: no cover - the loop must not run
        loss = torch.nn.functional.cross_entropy(model(x), y)
        raise AssertionError(f"an empty batch was yielded (loss {float(loss.detach())})")
