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
        self._profiler = H3Profiler(name, device=device, autostart=False, **profiler_kwargs)
        self._autostart_daemon = profiler_kwargs.get("autostart", True)

    @property
    def profiler(self) -> H3Profiler:
        return self._profiler

    def start(self) -> EnergyTracker:
        self._profiler.autostart = self._autostart_daemon
        self._profiler.start()
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
