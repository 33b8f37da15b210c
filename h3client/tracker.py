"""``EnergyTracker``: the published package's tracker API, over :class:`H3Profiler`."""

from __future__ import annotations

from typing import Any

from h3client.profiler import H3Profiler


class EnergyTracker:
    """Track energy and loss of a block of work (kept for ``h3-optimizer`` users).

    Args:
        device: Recorded with the run ("auto", "cuda:0", "cpu").
        name: Run name.
        **profiler_kwargs: Passed to :class:`H3Profiler` (url, data_dir, autostart, ...).

    Example:
        >>> tracker = EnergyTracker(device="cuda:0")  # doctest: +SKIP
        >>> tracker.start(); tracker.log_loss(loss); stats = tracker.stop()  # doctest: +SKIP
    """

    def __init__(
        self, device: str = "auto", name: str | None = None, **profiler_kwargs: Any
    ) -> None:
        self.device = device
        self.name = name
        self._kwargs = profiler_kwargs
        self._profiler: H3Profiler | None = None

    @property
    def profiler(self) -> H3Profiler:
        if self._profiler is None:
            raise RuntimeError("EnergyTracker: call start() first")
        return self._profiler

    def start(self) -> EnergyTracker:
        """Open the run (idempotent)."""
        if self._profiler is None:
            self._profiler = H3Profiler(self.name, device=self.device, **self._kwargs)
        return self

    def log_loss(self, loss: Any, **kw: Any) -> None:
        """Record one batch's loss (see :meth:`H3Profiler.log_batch`); no-op before start."""
        if self._profiler is not None:
            self._profiler.log_batch(loss, **kw)

    def get_current_stats(self) -> dict[str, Any]:
        """Live figures: energy so far, marginal η, batches logged."""
        p = self.profiler
        return {
            "energy_j": p.energy_j(),
            "live_eta_bits_per_j": p.live_eta(),
            "batches": p.batches_logged,
            "run_id": p.run_id,
        }

    def stop(self) -> dict[str, Any]:
        return self.profiler.stop()
