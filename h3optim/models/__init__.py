"""The information-optimal network: throttled channels, reversible units, integration layers."""

from __future__ import annotations

from h3optim.models.absorption import compute_absorption_efficiency
from h3optim.models.adiabatic import AdiabaticProcessingUnit, ReversibleStack
from h3optim.models.channels import ThrottledInformationChannel
from h3optim.models.integration import LosslessIntegrationLayer
from h3optim.models.memory import saved_activation_bytes
from h3optim.models.network import (
    InformationOptimalNetwork,
    TemperatureSchedule,
    information_optimal_loss,
)

__all__ = [
    "AdiabaticProcessingUnit",
    "InformationOptimalNetwork",
    "LosslessIntegrationLayer",
    "ReversibleStack",
    "TemperatureSchedule",
    "ThrottledInformationChannel",
    "compute_absorption_efficiency",
    "information_optimal_loss",
    "saved_activation_bytes",
]
