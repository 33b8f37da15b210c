"""Batch-at-once loading: a sampled epoch costs what it trains on.

A ``DataLoader`` with ``batch_size=B`` calls the dataset's ``__getitem__`` once per sample and
collates B items per batch; for a small model that Python work costs as much as the training
step. When the data are tensors (a ``TensorDataset``, or an :class:`~h3optim.IndexedDataset`
around one), :func:`batch_loader` instead hands the dataset one tensor of indices per batch
(a :class:`TensorBatchSampler` passed as ``sampler=`` with ``batch_size=None``, the
``DataLoader`` idiom for batched fetching), so a batch is one indexing operation per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from h3optim.tracking import IndexedDataset, take_rows


class TensorBatchSampler(Sampler[torch.Tensor]):
    """Yield a sampler's epoch as 1-D index tensors of ``batch_size``.

    A sampler with an ``indices()`` method returning its epoch as a tensor (such as
    :class:`~h3optim.InformationWeightedSampler`) is sliced without per-index Python work;
    any other ``Sampler[int]`` is read once per epoch into a tensor.

    Args:
        sampler: The per-sample sampler (its ``set_epoch`` is the caller's business).
        batch_size: Indices per batch.
        drop_last: Drop a last batch smaller than ``batch_size``.

    An empty epoch (or, with ``drop_last``, one shorter than a batch) yields no batch, as
    ``len()`` says.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def _indices(self) -> torch.Tensor:
        fn = getattr(self.sampler, "indices", None)
        if callable(fn):
            idx = fn()
            if isinstance(idx, torch.Tensor):
                return idx.reshape(-1).long()
        return torch.as_tensor(list(self.sampler), dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        idx = self._indices()
        n = idx.numel()
        if self.drop_last:
            n -= n % self.batch_size
        if n == 0:  # an empty epoch, or one shorter than a batch with drop_last: no batch
            return  # (torch.split of an empty tensor would give one empty batch)
        yield from torch.split(idx[:n], self.batch_size)

    def __len__(self) -> int:
        n = len(self.sampler) if isinstance(self.sampler, Sized) else 0
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class _TensorBatches:
    """A ``TensorDataset`` indexed by a tensor of indices: a tuple of batch tensors."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(take_rows(t, index) for t in self.tensors)


def is_batchable(dataset: Any) -> bool:
    """Whether :func:`batch_loader` can fetch ``dataset`` a batch at a time."""
    if isinstance(dataset, IndexedDataset):
        return dataset.batchable
    return isinstance(dataset, TensorDataset)


def batch_loader(
    dataset: Any,
    sampler: Sampler[int],
    batch_size: int,
    *,
    drop_last: bool = False,
    **loader_kwargs: Any,
) -> DataLoader[Any]:
    """A ``DataLoader`` over ``sampler``'s epoch that fetches whole batches where it can.

    Tensor-backed datasets (see :func:`is_batchable`) are indexed once per batch with a tensor
    of indices; the batches are what the per-sample loader would give (``(x, y, idx)`` for an
    :class:`~h3optim.IndexedDataset`, ``idx`` a tensor), in the same order. Any other dataset
    gets the ordinary per-sample ``DataLoader(dataset, batch_size, sampler=sampler)``.

    Args:
        dataset: A map-style dataset.
        sampler: Chooses the epoch's indices (``Sampler[int]``).
        batch_size: Samples per batch.
        drop_last: Drop a last incomplete batch.
        **loader_kwargs: Passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).

    Example:
        >>> sampler = InformationWeightedSampler(ds, tracker, keep_frac=0.6)  # doctest: +SKIP
        >>> for x, y, idx in batch_loader(ds, sampler, 128):  # doctest: +SKIP
        ...     ...
    """
    if not is_batchable(dataset):
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs
        )
    source = dataset if isinstance(dataset, IndexedDataset) else _TensorBatches(dataset)
    return DataLoader(
        source,  # type: ignore[arg-type]
        sampler=TensorBatchSampler(sampler, batch_size, drop_last),
        batch_size=None,
        **loader_kwargs,
    )
