"""h3optim: loss tracking, information-weighted sampling and energy-aware optimizers.

The optimizer-side names of the published ``h3-optimizer`` 0.2.0 are importable from here,
with 0.2.0's positional orders; its measuring and logging names (``EnergyTracker``,
``H3Profiler``, ``ThermoAuditLogger``, ``explain_thermo_log``) from :mod:`h3client`.
docs/optim.md lists what differs.
"""

from __future__ import annotations

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
