"""Ready-made set-ups that keep the published ``h3-optimizer`` names.

The names and positional orders are ``h3-optimizer`` 0.2.0's, so a call written for it works
here unchanged: ``create_controlled_h3(params, dataset, mode, accuracy_tolerance, lr,
total_epochs)``, ``h3_mnist_fast(params, dataset, lr)`` and the preset classes
``MNISTFast(params, dataset, lr)``, ``CIFAR10Safe`` and ``EdgeDevice``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from h3optim.controller import EtaController
from h3optim.loading import batch_loader
from h3optim.optimizer import H3Optimizer
from h3optim.sampler import InformationWeightedSampler, PhaseSchedule
from h3optim.tracking import IndexedDataset, LossTracker

#: lr_compensation's largest step scale: an epoch of fewer than half the steps is not made up
MAX_LR_COMPENSATION = 2.0


def compensation_factor(full_steps: int, steps: int) -> float:
    """The step scale of an epoch of ``steps`` where one over all the data takes
    ``full_steps``: their ratio, between 1 and ``MAX_LR_COMPENSATION`` (1 for no steps)."""
    if steps <= 0:
        return 1.0
    return min(MAX_LR_COMPENSATION, max(1.0, full_steps / steps))


def create_controlled_h3(
    params: Iterable[Any],
    dataset: Any,
    mode: str = "balanced",
    accuracy_tolerance: float = 1.0,
    lr: float = 1e-3,
    total_epochs: int = 10,
    *,
    eta_source: Callable[[], float | None] | None = None,
    warmup: float = 0.15,
    consolidation: float = 0.15,
    accuracy_unit: str = "auto",
    **optimizer_kwargs: Any,
) -> tuple[H3Optimizer, EtaController, LossTracker, IndexedDataset]:
    """An optimizer, an η-controller, a loss tracker and an indexed dataset that fit together.

    The positional order is ``h3-optimizer`` 0.2.0's, ``lr`` before ``total_epochs``: a
    0.2.0 call ``create_controlled_h3(params, ds, "balanced", 1.0, 1e-2)`` once put its
    ``lr`` into ``total_epochs`` and trained at the default ``lr`` with a schedule that never
    sampled. A ``total_epochs`` that is not a whole number is a ``ValueError``.

    Args:
        params: Model parameters (or parameter groups) for :class:`~h3optim.H3Optimizer`.
        dataset: Map-style training dataset (wrapped in :class:`~h3optim.IndexedDataset`
            unless it is one).
        mode: Controller mode (``safe``, ``balanced``, ``green``, ``extreme``).
        accuracy_tolerance: Accuracy points below the best that trigger a back-off.
        lr: The optimizer's learning rate.
        total_epochs: Length of training, for the phase schedule.
        eta_source: The controller's η source (see :class:`~h3optim.EtaController`).
        warmup, consolidation: The controller's phase fractions.
        accuracy_unit: How the controller reads accuracies (``"auto"``, ``"fraction"``,
            ``"percent"``; see :class:`~h3optim.EtaController`).
        **optimizer_kwargs: Passed to :class:`~h3optim.H3Optimizer`.

    Returns:
        ``(optimizer, controller, loss_tracker, indexed_dataset)``.

    Example:
        >>> opt, ctrl, tracker, ds = create_controlled_h3(  # doctest: +SKIP
        ...     model.parameters(), train_set, "balanced", 1.0, 1e-3, 20
        ... )
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
        accuracy_unit=accuracy_unit,
    )
    return H3Optimizer(params, lr=lr, **optimizer_kwargs), controller, tracker, ds


class H3Setup:
    """A preset: unpacks as ``(optimizer, loss_tracker, indexed_dataset)``.

    ``get_sampler(epoch, total_epochs)`` returns ``(phase, sampler)``: uniform over all data in
    warmup and consolidation, information-weighted with the preset's fractions in between.
    ``get_loader(epoch, total_epochs, batch_size)`` returns ``(phase, loader)`` over that
    sampler, fetching whole batches from a tensor-backed dataset (:func:`~h3optim.batch_loader`).

    With ``lr_compensation`` (the default), ``get_sampler`` also sets the optimizer's step
    scale for the epoch (its groups' ``step_scale``, ``lr_factor`` here): all the data over
    the epoch's share of it, at most ``MAX_LR_COMPENSATION``, so that a sampled epoch, with
    fewer steps at the same batch size, moves the weights about as far as a full one; the
    groups' ``lr`` (what a scheduler sets) is untouched. ``lr_compensation=False`` trains
    every step at ``lr``, as h3-optimizer's presets did.
    """

    #: The preset's name (``h3-optimizer`` 0.2.0's preset classes have one).
    name = "custom"

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
        lr_compensation: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.loss_tracker = loss_tracker
        self.indexed_dataset = indexed_dataset
        self.keep_frac, self.uniform_mix = keep_frac, uniform_mix
        self.lr_compensation = lr_compensation
        self.lr_factor = 1.0  # the step scale of the epoch get_sampler set up last
        self.sampler = InformationWeightedSampler(
            indexed_dataset, loss_tracker, keep_frac, uniform_mix, seed=seed, unbiased=unbiased
        )

    def __iter__(self) -> Iterator[Any]:
        return iter((self.optimizer, self.loss_tracker, self.indexed_dataset))

    def get_components(self) -> tuple[H3Optimizer, LossTracker, IndexedDataset]:
        """``(optimizer, loss_tracker, indexed_dataset)``, as ``h3-optimizer`` 0.2.0's preset
        classes give them (the set-up unpacks to the same three)."""
        return self.optimizer, self.loss_tracker, self.indexed_dataset

    def get_sampler(self, epoch: int, total_epochs: int) -> tuple[str, InformationWeightedSampler]:
        phase = PhaseSchedule(total_epochs).phase(epoch)
        if phase == "thermodynamic":
            self.sampler.set_fractions(self.keep_frac, self.uniform_mix)
        else:
            self.sampler.set_fractions(1.0, 1.0)
        self.sampler.set_epoch(epoch)
        # lr_compensation: the epoch's steps scaled by all the data over its share, so that
        # it moves the weights as far as a full epoch (as AutoH3 does; docs/optim.md)
        factor = 1.0
        if self.lr_compensation:
            factor = compensation_factor(self.sampler.n, self.sampler.num_kept)
        self.lr_factor = factor
        for group in self.optimizer.param_groups:
            group["step_scale"] = factor
        return phase, self.sampler

    def get_loader(
        self, epoch: int, total_epochs: int, batch_size: int, **loader_kwargs: Any
    ) -> tuple[str, DataLoader[Any]]:
        """``(phase, loader)`` of ``(data, target, index)`` batches for ``epoch``."""
        phase, sampler = self.get_sampler(epoch, total_epochs)
        return phase, batch_loader(self.indexed_dataset, sampler, batch_size, **loader_kwargs)


class _Preset(H3Setup):
    """A preset built from its parameters and dataset, as ``h3-optimizer`` 0.2.0's classes
    were: ``lr`` positional; keyword arguments ``seed`` and ``unbiased`` go to the sampler,
    ``lr_compensation`` to the set-up (see :class:`H3Setup`), the others to
    :class:`~h3optim.H3Optimizer`. Its fractions (``fractions``: keep_frac,
    uniform_mix) and phases are h3optim's (see docs/optim.md), not 0.2.0's."""

    fractions: tuple[float, float]
    weight_decay: float | None = None  # the preset's default, if it has one

    def __init__(self, params: Iterable[Any], dataset: Any, lr: float = 1e-3, **kw: Any) -> None:
        if self.weight_decay is not None:
            kw.setdefault("weight_decay", self.weight_decay)
        ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        seed, unbiased = kw.pop("seed", 0), kw.pop("unbiased", False)
        lr_compensation = kw.pop("lr_compensation", True)
        keep_frac, uniform_mix = self.fractions
        super().__init__(
            H3Optimizer(params, lr=lr, **kw),
            LossTracker(len(ds)),
            ds,
            keep_frac=keep_frac,
            uniform_mix=uniform_mix,
            seed=seed,
            unbiased=unbiased,
            lr_compensation=lr_compensation,
        )
        self.lr = lr


class MNISTFast(_Preset):
    """Small image classifiers: half the data per thermodynamic epoch, 30 % of it uniform.

    The set-up :func:`h3_mnist_fast` returns, under ``h3-optimizer`` 0.2.0's class name.
    """

    name = "mnist_fast"
    fractions = (0.5, 0.3)


class CIFAR10Safe(_Preset):
    """Harder data: 80 % per epoch, half of it uniform, weight decay (5e-4 by default).

    The set-up :func:`h3_cifar_safe` returns, under ``h3-optimizer`` 0.2.0's class name.
    """

    name = "cifar10_safe"
    fractions = (0.8, 0.5)
    weight_decay = 5e-4


class EdgeDevice(_Preset):
    """Tight energy budgets: 40 % per epoch, 20 % of it uniform.

    The set-up :func:`h3_edge` returns, under ``h3-optimizer`` 0.2.0's class name.
    """

    name = "edge_device"
    fractions = (0.4, 0.2)


def h3_mnist_fast(params: Iterable[Any], dataset: Any, lr: float = 1e-3, **kw: Any) -> H3Setup:
    """Small image classifiers: half the data per thermodynamic epoch, 30 % of it uniform.

    ``lr`` may be passed positionally, as in ``h3-optimizer`` 0.2.0; see :class:`MNISTFast`.
    """
    return MNISTFast(params, dataset, lr, **kw)


def h3_cifar_safe(params: Iterable[Any], dataset: Any, lr: float = 1e-3, **kw: Any) -> H3Setup:
    """Harder data: 80 % per epoch, half of it uniform, weight decay (see :class:`CIFAR10Safe`)."""
    return CIFAR10Safe(params, dataset, lr, **kw)


def h3_edge(params: Iterable[Any], dataset: Any, lr: float = 1e-3, **kw: Any) -> H3Setup:
    """Tight energy budgets: 40 % per epoch, 20 % of it uniform (see :class:`EdgeDevice`)."""
    return EdgeDevice(params, dataset, lr, **kw)
