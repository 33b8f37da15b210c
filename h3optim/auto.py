"""``AutoH3``: profiler, controller, sampler, optimizer and loss tracking in one object."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from h3optim.presets import create_controlled_h3
from h3optim.sampler import InformationWeightedSampler


class AutoH3:
    """Energy-aware training in one object, streaming to the h3d daemon.

    Args:
        params: Model parameters.
        dataset: A map-style dataset of ``(data, target)`` (or dict) items.
        mode: Controller mode: ``safe``, ``balanced``, ``green``, ``extreme``.
        name: Run name for the daemon.
        total_epochs: Planned epochs (phases and the controller depend on it).
        lr: Initial step of :class:`~h3optim.H3Optimizer`.
        accuracy_tolerance: Points of accuracy the controller may give up before backing off.
        unbiased: Re-weight losses so the expected gradient matches full-data training.
        seed: Sampler seed.
        profile: Stream to the daemon through an ``h3client.H3Profiler``.
        profiler: A profiler-like object to use instead (``log_batch``, ``log_epoch``,
            ``live_eta``, ``energy_j``, ``stop``).
        config: Extra run configuration to store.
        profiler_kwargs: Passed to ``H3Profiler`` (url, data_dir, autostart, ...).

    Example:
        >>> auto = AutoH3(model.parameters(), train_set, mode="balanced", total_epochs=20)  # doctest: +SKIP
        >>> auto.start()
        >>> for epoch in range(20):
        ...     for data, target, idx in auto.get_loader(batch_size=64):
        ...         auto.training_step(model, data, target, criterion, idx)
        ...     auto.evaluate_epoch(model, test_loader)
        >>> results = auto.finish()
    """

    def __init__(
        self,
        params: Iterable[Any],
        dataset: Any,
        mode: str = "balanced",
        name: str | None = None,
        *,
        total_epochs: int = 10,
        lr: float = 1e-3,
        accuracy_tolerance: float = 1.0,
        unbiased: bool = False,
        seed: int = 0,
        profile: bool = True,
        profiler: Any = None,
        config: dict[str, Any] | None = None,
        profiler_kwargs: dict[str, Any] | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        self.optimizer, self.controller, self.loss_tracker, self.indexed_dataset = (
            create_controlled_h3(
                params, dataset, mode, accuracy_tolerance, total_epochs, lr=lr, **optimizer_kwargs
            )
        )
        self.sampler = InformationWeightedSampler(
            self.indexed_dataset, self.loss_tracker, seed=seed, unbiased=unbiased
        )
        self.name = name
        self.mode = mode
        self.total_epochs = total_epochs
        self.profile = profile
        self.profiler = profiler
        self.config = {
            "mode": mode,
            "lr": lr,
            "total_epochs": total_epochs,
            "unbiased": unbiased,
            **(config or {}),
        }
        self.profiler_kwargs = dict(profiler_kwargs or {})
        self.epoch = 0
        self.phase = "warmup"
        self.samples_backpropagated = 0
        self._epoch_samples = 0
        self._energy_at_epoch_start: float | None = None
        self._started = False

    def start(self) -> AutoH3:
        """Open the profiled run (if profiling) and wire the controller to its live η."""
        if self._started:
            return self
        if self.profiler is None and self.profile:
            from h3client import H3Profiler  # the composition layer's only client import

            self.profiler = H3Profiler(
                self.name,
                config=self.config,
                n_train=len(self.indexed_dataset),
                **self.profiler_kwargs,
            )
        if self.profiler is not None and self.controller.eta_source is None:
            self.controller.eta_source = self.profiler.live_eta
        self._started = True
        return self

    def get_loader(self, batch_size: int, **loader_kwargs: Any) -> DataLoader[Any]:
        """This epoch's loader of ``(data, target, index)`` batches, sampled as the controller says."""
        self.start()
        keep, mix, self.phase = self.controller.control_step()
        self.sampler.set_fractions(keep, mix)
        self.sampler.set_epoch(self.epoch)
        self._epoch_samples = 0
        self._energy_at_epoch_start = self._energy()
        return DataLoader(
            self.indexed_dataset, batch_size=batch_size, sampler=self.sampler, **loader_kwargs
        )

    def _energy(self) -> float | None:
        if self.profiler is None or not hasattr(self.profiler, "energy_j"):
            return None
        e = self.profiler.energy_j()
        return float(e) if e is not None else None

    def training_step(
        self,
        model: torch.nn.Module,
        data: Any,
        target: Any,
        criterion: Callable[..., torch.Tensor],
        indices: Any,
    ) -> float:
        """Forward, per-sample losses, (re-weighted) backward, step; returns the batch loss."""
        model.train()
        idx = torch.as_tensor(indices)
        weights = self.sampler.weights(idx) if self.sampler.unbiased else None
        reduction = getattr(criterion, "reduction", None)
        seen: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            out = model(data)
            if reduction is not None:
                criterion.reduction = "none"  # type: ignore[attr-defined]
                try:
                    losses = criterion(out, target)
                finally:
                    criterion.reduction = reduction  # type: ignore[attr-defined]
            else:
                losses = criterion(out, target, reduction="none")
            losses = losses.reshape(len(idx), -1).mean(1) if losses.dim() > 1 else losses
            seen.setdefault("losses", losses.detach())
            if weights is not None:
                loss = (losses * weights.to(losses.device)).mean()
            else:
                loss = losses.mean()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        loss = self.optimizer.step(closure)
        losses = seen["losses"]
        self.loss_tracker.update(idx, losses)
        self.samples_backpropagated += len(idx)
        self._epoch_samples += len(idx)
        mean = losses.mean()
        if self.profiler is not None:
            self.profiler.log_batch(
                mean, losses=losses, indices=idx, epoch=self.epoch, phase=self.phase
            )
        return float(loss.detach()) if loss is not None else float(mean)

    @torch.no_grad()
    def evaluate_epoch(self, model: torch.nn.Module, test_loader: Iterable[Any]) -> float:
        """Held-out accuracy (a fraction); feeds the controller and the profiler."""
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        for batch in test_loader:
            data, target = batch[0], batch[1]
            out = model(data)
            loss_sum += float(torch.nn.functional.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
            total += len(target)
        acc = correct / max(total, 1)
        held_out = loss_sum / max(total, 1)
        end = self._energy()
        energy = (
            (end - self._energy_at_epoch_start)
            if end is not None and self._energy_at_epoch_start is not None
            else None
        )
        k, u, _phase = self.controller._current
        self.controller.observe(
            accuracy=acc, loss=held_out if math.isfinite(held_out) else None, energy=energy
        )
        if self.profiler is not None:
            self.profiler.log_epoch(
                self.epoch,
                accuracy=acc,
                val_loss=held_out,
                phase=self.phase,
                keep_frac=k,
                uniform_mix=u,
                samples=self._epoch_samples,
            )
        self.epoch += 1
        return acc

    def finish(self) -> dict[str, Any]:
        """Stop the run; results from the daemon plus what the controller did."""
        results: dict[str, Any] = {}
        if self.profiler is not None:
            results.update(self.profiler.stop())
        results.update(
            samples_backpropagated=self.samples_backpropagated,
            controller_report=self.controller.get_report(),
            controller_decisions=list(self.controller.decisions),
            skipped_steps=self.optimizer.skipped_steps,
            final_keep_frac=self.controller.keep_frac,
            final_uniform_mix=self.controller.uniform_mix,
        )
        return results
