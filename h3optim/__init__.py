"""h3optim: loss tracking, information-weighted sampling and energy-aware optimizers.

The optimizer-side names of the published ``h3-optimizer`` 0.2.0 are importable from here,
with 0.2.0's positional orders; its measuring and logging names (``EnergyTracker``,
``H3Profiler``, ``ThermoAuditLogger``, ``explain_thermo_log``) from :mod:`h3client`.
docs/optim.md lists what differs.

The names below are loaded on first use (PEP 562), so that ``import h3optim`` itself needs
nothing: without PyTorch (``pip install h3`` with no extras) using any of them raises an
ImportError that names the ``optim`` extra, and the ``h3-tune`` script
(:mod:`h3optim._tune_entry`) says the same in one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from h3optim.auto import AutoH3
    from h3optim.compat import auto_h3
    from h3optim.controller import MODES, EtaController, OperatingMode
    from h3optim.loading import TensorBatchSampler, batch_loader, is_batchable
    from h3optim.models import (
        AdiabaticProcessingUnit,
        InformationOptimalNetwork,
        LosslessIntegrationLayer,
        ReversibleStack,
        TemperatureSchedule,
        ThrottledInformationChannel,
        compute_absorption_efficiency,
        information_optimal_loss,
    )
    from h3optim.ngdt import NGDT
    from h3optim.optimizer import H3Optimizer
    from h3optim.presets import (
        CIFAR10Safe,
        EdgeDevice,
        H3Setup,
        MNISTFast,
        create_controlled_h3,
        h3_cifar_safe,
        h3_edge,
        h3_mnist_fast,
    )
    from h3optim.sampler import InformationWeightedSampler, PhaseSchedule, weighted_mean
    from h3optim.tracking import IndexedDataset, LossTracker

#: where each public name lives (its module is imported when the name is first used)
_WHERE = {
    "AutoH3": "h3optim.auto",
    "auto_h3": "h3optim.compat",
    "MODES": "h3optim.controller",
    "EtaController": "h3optim.controller",
    "OperatingMode": "h3optim.controller",
    "TensorBatchSampler": "h3optim.loading",
    "batch_loader": "h3optim.loading",
    "is_batchable": "h3optim.loading",
    "AdiabaticProcessingUnit": "h3optim.models",
    "InformationOptimalNetwork": "h3optim.models",
    "LosslessIntegrationLayer": "h3optim.models",
    "ReversibleStack": "h3optim.models",
    "TemperatureSchedule": "h3optim.models",
    "ThrottledInformationChannel": "h3optim.models",
    "compute_absorption_efficiency": "h3optim.models",
    "information_optimal_loss": "h3optim.models",
    "NGDT": "h3optim.ngdt",
    "H3Optimizer": "h3optim.optimizer",
    "CIFAR10Safe": "h3optim.presets",
    "EdgeDevice": "h3optim.presets",
    "H3Setup": "h3optim.presets",
    "MNISTFast": "h3optim.presets",
    "create_controlled_h3": "h3optim.presets",
    "h3_cifar_safe": "h3optim.presets",
    "h3_edge": "h3optim.presets",
    "h3_mnist_fast": "h3optim.presets",
    "InformationWeightedSampler": "h3optim.sampler",
    "PhaseSchedule": "h3optim.sampler",
    "weighted_mean": "h3optim.sampler",
    "IndexedDataset": "h3optim.tracking",
    "LossTracker": "h3optim.tracking",
}

__all__ = [
    "AdiabaticProcessingUnit",
    "AutoH3",
    "CIFAR10Safe",
    "EdgeDevice",
    "EtaController",
    "H3Optimizer",
    "H3Setup",
    "IndexedDataset",
    "InformationOptimalNetwork",
    "InformationWeightedSampler",
    "LossTracker",
    "LosslessIntegrationLayer",
    "MNISTFast",
    "MODES",
    "NGDT",
    "OperatingMode",
    "PhaseSchedule",
    "ReversibleStack",
    "TemperatureSchedule",
    "TensorBatchSampler",
    "ThrottledInformationChannel",
    "auto_h3",
    "batch_loader",
    "compute_absorption_efficiency",
    "create_controlled_h3",
    "h3_cifar_safe",
    "h3_edge",
    "h3_mnist_fast",
    "information_optimal_loss",
    "is_batchable",
    "weighted_mean",
]


NO_TORCH = (
    'h3optim needs PyTorch, which is not installed here: pip install "h3[optim]" (or install torch)'
)


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'h3optim' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        # name="torch": the h3-tune script tells this case from a real error
        raise ImportError(NO_TORCH, name="torch") from exc
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
