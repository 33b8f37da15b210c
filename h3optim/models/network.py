"""``InformationOptimalNetwork``, its loss and its temperature schedule."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from h3optim.models.adiabatic import AdiabaticProcessingUnit, ReversibleStack
from h3optim.models.channels import ThrottledInformationChannel
from h3optim.models.integration import LosslessIntegrationLayer


class InformationOptimalNetwork(nn.Module):
    """Throttled input channel → reversible stack → integration layer → linear read-out.

    Args:
        input_dim: Input features.
        hidden_dim: Width of the reversible stack (even).
        output_dim: Classes.
        depth: Reversible units in the stack.
        temperature: Initial temperature of the units.
        num_heads: Heads of the integration layer.
        bottleneck_ratio: Of the input channel.
        memory_saving: Reversible backward (activation memory constant in depth).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        depth: int = 3,
        temperature: float = 1.0,
        *,
        num_heads: int = 2,
        bottleneck_ratio: float = 0.5,
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        self.channel = ThrottledInformationChannel(input_dim, hidden_dim, bottleneck_ratio)
        self.stack = ReversibleStack(
            [AdiabaticProcessingUnit(hidden_dim, temperature) for _ in range(depth)], memory_saving
        )
        self.integration = LosslessIntegrationLayer(hidden_dim, num_heads)
        self.readout = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.channel(x.reshape(x.shape[0], -1))
        h = self.stack(h)
        out: Tensor = self.readout(self.integration(h))
        return out

    @property
    def temperature(self) -> float:
        units = self.stack.unit_list()
        return float(units[0].temperature) if units else 1.0

    def set_temperature(self, t: float) -> None:
        for unit in self.stack.unit_list():
            unit.temperature = t

    def penalty(self) -> Tensor:
        """The differentiable flow/energy price of the last forward (then forgotten).

        flow: mean gate activity of the input channel (0: closed, 1: open);
        energy: the stack's relative change in squared activation norm, |Δ‖a‖²| / d.
        """
        flow, energy = self.channel.flow, self.stack.energy
        if flow is None or energy is None:
            raise RuntimeError("penalty() needs a forward pass first")
        self.channel.flow, self.stack.energy = None, None  # no graph survives the step
        width = self.readout.in_features
        return flow + energy.abs() / width

    def get_efficiency_metrics(self) -> dict[str, Any]:
        """Figures of the last forward: gate activity, unit energies, preservation, T."""
        return {
            "gate_activity": float(self.channel.flow.detach())
            if self.channel.flow is not None
            else None,
            "unit_energies": [u.last_energy for u in self.stack.unit_list()],
            "preservation": self.integration.last_preservation,
            "temperature": self.temperature,
        }


def information_optimal_loss(
    outputs: Tensor, targets: Tensor, model: InformationOptimalNetwork, beta: float = 0.1
) -> Tensor:
    """Cross-entropy plus ``beta`` × the network's flow/energy price from this forward pass."""
    return nn.functional.cross_entropy(outputs, targets) + beta * model.penalty()


class TemperatureSchedule:
    """T(t) = T₀ (1 + α t)^(−β), applied to the model's units at each :meth:`step`.

    Call ``step()`` per optimizer step or per epoch, whichever ``t`` should count.
    """

    def __init__(
        self,
        model: InformationOptimalNetwork,
        t0: float = 1.0,
        alpha: float = 0.01,
        beta: float = 0.5,
    ) -> None:
        if t0 <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"Invalid schedule: t0={t0}, alpha={alpha}, beta={beta}")
        self.model, self.t0, self.alpha, self.beta = model, t0, alpha, beta
        self.t = 0
        model.set_temperature(self.value(0))

    def value(self, t: int) -> float:
        return float(self.t0 * (1.0 + self.alpha * t) ** (-self.beta))

    def step(self) -> float:
        self.t += 1
        temp = self.value(self.t)
        self.model.set_temperature(temp)
        return temp

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "t0": self.t0, "alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.t0, self.alpha, self.beta = (
            state["t"],
            state["t0"],
            state["alpha"],
            state["beta"],
        )
        self.model.set_temperature(self.value(self.t))
