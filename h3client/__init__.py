"""h3client: stream a training loop's losses to the local h3d daemon without slowing it."""

from __future__ import annotations

__all__: list[str] = []
