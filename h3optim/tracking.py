"""Per-sample loss tracking: ``IndexedDataset`` and ``LossTracker``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

_TARGET_KEYS = ("target", "label", "labels", "y")


class IndexedDataset(Dataset[tuple[Any, Any, int]]):
    """Wrap a map-style dataset so each item is ``(data, target, index)``.

    Tuple/list items ``(data, target, ...)`` keep their first two fields. Dict items give
    ``(item without its target key, target, index)``, the target found under ``target``,
    ``label``, ``labels`` or ``y``.

    When the wrapped dataset is a ``TensorDataset`` (:attr:`batchable`), a 1-D tensor of
    indices fetches a whole batch at once: ``ds[idx]`` is ``(x[idx], y[idx], idx)``, one
    indexing operation per tensor instead of one ``__getitem__`` per sample and a collate
    (:func:`h3optim.batch_loader` builds such a loader).

    Args:
        dataset: Any map-style dataset (``__getitem__`` and ``__len__``).

    Example:
        >>> ds = IndexedDataset(TensorDataset(x, y))  # doctest: +SKIP
        >>> data, target, index = ds[3]  # doctest: +SKIP
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset (__getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def batchable(self) -> bool:
        """Whether a tensor of indices fetches a batch in one indexing operation."""
        return isinstance(self.dataset, TensorDataset) and len(self.dataset.tensors) >= 2

    def __getitem__(self, index: Any) -> tuple[Any, Any, Any]:
        if isinstance(index, torch.Tensor) and index.dim() == 1:
            if not self.batchable:
                raise TypeError(
                    "a tensor of indices needs a TensorDataset underneath; "
                    f"got {type(self.dataset).__name__}"
                )
            tensors = self.dataset.tensors
            return tensors[0][index], tensors[1][index], index
        item = self.dataset[index]
        if isinstance(item, Mapping):
            key = next((k for k in _TARGET_KEYS if k in item), None)
            if key is None:
                raise TypeError(f"dict item has no target key (one of {_TARGET_KEYS})")
            return {k: v for k, v in item.items() if k != key}, item[key], index
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[0], item[1], index
        raise TypeError(f"expected (data, target) or a dict item, got {type(item).__name__}")


class LossTracker:
    """Per-sample exponential moving average of the loss, kept on the losses' device.

    The first sighting of a sample assigns its loss; later ones blend it with weight
    ``smoothing``. Non-finite losses are ignored and counted, never written. All updates
    are tensor operations: no host-device synchronisation.

    Args:
        num_samples: Dataset size N.
        smoothing: EMA weight of a new observation, in (0, 1].
        device: Where the state lives (default: CPU; moved to the losses' device on update).
    """

    def __init__(self, num_samples: int, smoothing: float = 0.1, device: Any = None) -> None:
        if num_samples <= 0:
            raise ValueError(f"Invalid num_samples: {num_samples}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing}")
        self.num_samples = num_samples
        self.smoothing = smoothing
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.ema = torch.zeros(num_samples, device=dev)
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(num_samples, dtype=torch.int32, device=dev)
        # each sample's first observed loss: the reference the sampler's noise guard compares
        # the EMA with (a loss that rose while the model learned points at a wrong label)
        self.first = torch.zeros(num_samples, device=dev)
        # each sample's latest loss: whether it is learned *now* (the EMA remembers its start)
        self.last = torch.zeros(num_samples, device=dev)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=dev)

    def _to(self, device: torch.device) -> None:
        if self.ema.device != device:
            self.ema = self.ema.to(device)
            self.seen = self.seen.to(device)
            self.counts = self.counts.to(device)
            self.first = self.first.to(device)
            self.last = self.last.to(device)
            self._nonfinite = self._nonfinite.to(device)

    @torch.no_grad()
    def update(self, indices: Any, losses: torch.Tensor) -> None:
        """Record per-sample ``losses`` (any shape with N elements) of dataset ``indices``."""
        losses = losses.detach().reshape(-1).float()
        self._to(losses.device)
        idx = torch.as_tensor(indices, device=losses.device).reshape(-1).long()
        if idx.numel() != losses.numel():
            raise ValueError(f"{idx.numel()} indices for {losses.numel()} losses")
        # non-finite losses leave a sample's state as it was (a mask by where, not by
        # boolean indexing, which would synchronise with the device)
        finite = torch.isfinite(losses)
        self._nonfinite += finite.numel() - finite.sum()
        was_seen = self.seen[idx]
        old = self.ema[idx]
        keep_old = ~finite
        self.ema[idx] = torch.where(
            keep_old, old, torch.where(was_seen, old.lerp(losses, self.smoothing), losses)
        )
        self.first[idx] = torch.where(was_seen | keep_old, self.first[idx], losses)
        self.last[idx] = torch.where(keep_old, self.last[idx], losses)
        self.seen[idx] = was_seen | finite
        self.counts[idx] += finite.int()

    @property
    def nonfinite_count(self) -> int:
        """How many non-finite losses were ignored (reads the device counter)."""
        return int(self._nonfinite.item())

    @torch.no_grad()
    def unlearned_fraction(self, ratio: float = 0.3) -> float:
        """Share of the samples not learned yet: never seen, or whose latest loss is above
        ``ratio`` × the mean first-sighting loss (for cross-entropy from a 10-class start and
        ``ratio=0.3``, about 0.69 nats: the right class under 50 % probability, so possibly
        not the one predicted).

        The latest loss, not the EMA: with smoothing 0.1 the EMA still carries half of a
        sample's first loss after seven sightings. A sample whose loss rose above its first
        while the model learned is not counted: its label likely disagrees with what the
        model learns (a flipped label), and keeping it teaches nothing. One host sync.
        """
        if not self.seen.any():
            return 1.0
        scale = ratio * self.first[self.seen].mean()
        settled = self.seen & ((self.last <= scale) | (self.last > self.first))
        return 1.0 - float(settled.float().mean())

    def get(self, indices: Any) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.ema.device).long()
        return self.ema[idx]

    def unseen(self) -> torch.Tensor:
        """Indices never observed."""
        return torch.nonzero(~self.seen).reshape(-1)

    def summary(self) -> dict[str, float]:
        """Mean, std, min, max of the tracked losses, and the fraction seen."""
        seen = self.ema[self.seen]
        if seen.numel() == 0:
            return {
                "seen_frac": 0.0,
                "mean": float("nan"),
                "std": float("nan"),
                "min": float("nan"),
                "max": float("nan"),
                "nonfinite": float(self.nonfinite_count),
            }
        return {
            "seen_frac": float(self.seen.float().mean()),
            "mean": float(seen.mean()),
            "std": float(seen.std()) if seen.numel() > 1 else 0.0,
            "min": float(seen.min()),
            "max": float(seen.max()),
            "nonfinite": float(self.nonfinite_count),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "smoothing": self.smoothing,
            "ema": self.ema.clone(),
            "seen": self.seen.clone(),
            "counts": self.counts.clone(),
            "first": self.first.clone(),
            "last": self.last.clone(),
            "nonfinite": self._nonfinite.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"state is for {state['num_samples']} samples, tracker has {self.num_samples}"
            )
        dev = self.ema.device
        self.smoothing = state["smoothing"]
        self.ema = state["ema"].to(dev).clone()
        self.seen = state["seen"].to(dev).clone()
        self.counts = state["counts"].to(dev).clone()
        # states saved before ``first`` existed: the EMA is the best reference there is
        self.first = state.get("first", state["ema"]).to(dev).clone()
        self.last = state.get("last", state["ema"]).to(dev).clone()
        self._nonfinite = state["nonfinite"].to(dev).clone()
