"""Ready-made set-ups that keep the published ``h3-optimizer`` names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from h3optim.controller import EtaController
from h3optim.loading import batch_loader
from h3optim.optimizer import H3Optimizer
from h3optim.sampler import InformationWeightedSampler, PhaseSchedule
from h3optim.tracking import IndexedDataset, LossTracker


def create_controlled_h3(
    params: Iterable[Any],
    dataset: Any,
    mode: str = "balanced",
    accuracy_tolerance: float = 1.0,
    total_epochs: int = 10,
    *,
    lr: float = 1e-3,
    eta_source: Callable[[], float | None] | None = None,
    warmup: float = 0.15,
    consolidation: float = 0.15,
    **optimizer_kwargs: Any,
) -> tuple[H3Optimizer, EtaController, LossTracker, IndexedDataset]:
    """An optimizer, an η-controller, a loss tracker and an indexed dataset that fit together.

    ``warmup`` and ``consolidation`` are the controller's phase fractions; the other keyword
    arguments go to :class:`~h3optim.H3Optimizer`.

    Returns:
        ``(optimizer, controller, loss_tracker, indexed_dataset)``.
    """
    ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
    tracker = LossTracker(len(ds))
    controller = EtaController(
        mode,
        accuracy_tolerance,
        total_epochs,
        eta_source,
        warmup=warmup,
        consolidation=consolidation,
    )
    return H3Optimizer(params, lr=lr, **optimizer_kwargs), controller, tracker, ds


class H3Setup:
    """A preset: unpacks as ``(optimizer, loss_tracker, indexed_dataset)``.

    ``get_sampler(epoch, total_epochs)`` returns ``(phase, sampler)``: uniform over all data in
    warmup and consolidation, information-weighted with the preset's fractions in between.
    ``get_loader(epoch, total_epochs, batch_size)`` returns ``(phase, loader)`` over that
    sampler, fetching whole batches from a tensor-backed dataset (:func:`~h3optim.batch_loader`).
    """

    def __init__(
        self,
        optimizer: H3Optimizer,
        loss_tracker: LossTracker,
        indexed_dataset: IndexedDataset,
        *,
        keep_frac: float,
        uniform_mix: float,
        seed: int = 0,
        unbiased: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.loss_tracker = loss_tracker
        self.indexed_dataset = indexed_dataset
        self.keep_frac, self.uniform_mix = keep_frac, uniform_mix
        self.sampler = InformationWeightedSampler(
            indexed_dataset, loss_tracker, keep_frac, uniform_mix, seed=seed, unbiased=unbiased
        )

    def __iter__(self) -> Iterator[Any]:
        return iter((self.optimizer, self.loss_tracker, self.indexed_dataset))

    def get_sampler(self, epoch: int, total_epochs: int) -> tuple[str, InformationWeightedSampler]:
        phase = PhaseSchedule(total_epochs).phase(epoch)
        if phase == "thermodynamic":
            self.sampler.set_fractions(self.keep_frac, self.uniform_mix)
        else:
            self.sampler.set_fractions(1.0, 1.0)
        self.sampler.set_epoch(epoch)
        return phase, self.sampler

    def get_loader(
        self, epoch: int, total_epochs: int, batch_size: int, **loader_kwargs: Any
    ) -> tuple[str, DataLoader[Any]]:
        """``(phase, loader)`` of ``(data, target, index)`` batches for ``epoch``."""
        phase, sampler = self.get_sampler(epoch, total_epochs)
        return phase, batch_loader(self.indexed_dataset, sampler, batch_size, **loader_kwargs)


def _preset(
    params: Iterable[Any],
    dataset: Any,
    *,
    lr: float,
    keep_frac: float,
    uniform_mix: float,
    **kw: Any,
) -> H3Setup:
    ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
    seed = kw.pop("seed", 0)
    unbiased = kw.pop("unbiased", False)
    opt = H3Optimizer(params, lr=lr, **kw)
    return H3Setup(
        opt,
        LossTracker(len(ds)),
        ds,
        keep_frac=keep_frac,
        uniform_mix=uniform_mix,
        seed=seed,
        unbiased=unbiased,
    )


def h3_mnist_fast(params: Iterable[Any], dataset: Any, **kw: Any) -> H3Setup:
    """Small image classifiers: half the data per thermodynamic epoch, 30 % of it uniform."""
    kw.setdefault("lr", 1e-3)
    return _preset(params, dataset, keep_frac=0.5, uniform_mix=0.3, **kw)


def h3_cifar_safe(params: Iterable[Any], dataset: Any, **kw: Any) -> H3Setup:
    """Harder data: 80 % per epoch, half of it uniform, weight decay."""
    kw.setdefault("lr", 1e-3)
    kw.setdefault("weight_decay", 5e-4)
    return _preset(params, dataset, keep_frac=0.8, uniform_mix=0.5, **kw)


def h3_edge(params: Iterable[Any], dataset: Any, **kw: Any) -> H3Setup:
    """Tight energy budgets: 40 % per epoch, 20 % of it uniform."""
    kw.setdefault("lr", 1e-3)
    return _preset(params, dataset, keep_frac=0.4, uniform_mix=0.2, **kw)
