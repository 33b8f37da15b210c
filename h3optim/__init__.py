"""h3optim: loss tracking, information-weighted sampling and energy-aware optimizers."""

from __future__ import annotations

__all__: list[str] = []
