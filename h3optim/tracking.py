"""Per-sample loss tracking: ``IndexedDataset`` and ``LossTracker``."""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, TensorDataset

_TARGET_KEYS = ("target", "label", "labels", "y")
#: :meth:`LossTracker.unlearned_fraction`: a sample counts as learned once its loss is below
#: this fraction of the mean first-sighting loss (the learning floor of ``AutoH3``; 0.05 until
#: ``AutoH3``'s lr compensation made the steps a sampled epoch leaves out cost nothing:
#: docs/optim.md, "The learning floor").
LEARNED_RATIO = 0.2


def take_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` for a 1-D tensor of indices, as one ``index_select``.

    The same values as advanced indexing, at a third of its cost on the CPU for a batch of
    rows (advanced indexing goes through the general index kernel). Boolean masks keep
    advanced indexing.
    """
    if index.dtype not in (torch.int64, torch.int32):
        return tensor[index]
    return tensor.index_select(0, index.to(tensor.device, non_blocking=True))


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
            return take_rows(tensors[0], index), take_rows(tensors[1], index), index
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
    ``smoothing``. Non-finite losses are ignored and counted (in all, and per sample:
    :attr:`nonfinite_counts`), never written. All updates are tensor operations: no
    host-device synchronisation.

    On the CPU, :meth:`update` only records its tensors, and the recorded updates are applied
    together, in order, when the state is next read (any property or method below) or every
    ``max_pending`` samples: in a training loop every tensor operation costs its full
    dispatch, so one bulk update an epoch costs a small fraction of one update a step
    (``benchmarks/tracker_update.py``). The result is bit-identical to applying each update
    at once. Like autograd's saved tensors, the recorded tensors must not be modified in
    place before they are applied: an update whose tensors were is left out, with a warning.

    Args:
        num_samples: Dataset size N.
        smoothing: EMA weight of a new observation, in (0, 1].
        initial_loss: ``h3-optimizer`` 0.2.0's third argument, accepted so that its calls
            (``LossTracker(n, 0.1, 1.0)``) work; it has no effect, with a warning: 0.2.0 gave
            never-seen samples this loss to rank them among the seen ones, and here a
            never-seen sample is drawn before any seen one whatever its loss.
        device: Where the state lives (default: CPU; moved to the losses' device on update).
    """

    #: CPU samples recorded by :meth:`update` before they are applied without a read.
    max_pending = 65536

    def __init__(
        self,
        num_samples: int,
        smoothing: float = 0.1,
        initial_loss: float | None = None,
        *,
        device: Any = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"Invalid num_samples: {num_samples}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing}")
        if initial_loss is not None:
            if not initial_loss > 0.0:
                raise ValueError(f"Invalid initial_loss: {initial_loss}")
            warnings.warn(
                f"LossTracker: initial_loss={initial_loss} has no effect in h3optim's sampling "
                "(kept for h3-optimizer 0.2.0 calls; only 0.2.0's get_weights() reads it): a "
                "never-seen sample is drawn before any seen one whatever its loss",
                UserWarning,
                stacklevel=2,
            )
        # builtin numbers (a numpy scalar would make the state dict fail a weights-only load)
        self.num_samples = operator.index(num_samples)
        self.smoothing = float(smoothing)
        #: The loss :meth:`get_weights` gives never-seen samples (0.2.0's ``initial_loss``).
        self.initial_loss = 1.0 if initial_loss is None else float(initial_loss)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # One (5, N) float32 state, rows EMA, first loss, latest loss, sightings (finite
        # losses) and non-finite losses, so that an update is one gather, a few element-wise
        # kernels and one scatter for all of them (about a dozen small kernels in all).
        # ``first`` is each sample's first observed loss: the reference the sampler's noise
        # guard compares the EMA with (a loss that rose while the model learned points at a
        # wrong label); ``last`` says whether it is learned *now* (the EMA remembers its
        # start). The last row tells a sample never sighted (the sampler draws it first) from
        # one sighted only with non-finite losses (which it must not draw first forever).
        self._state = torch.zeros(5, num_samples, dtype=torch.float32, device=dev)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self._cols: tuple[Any, ...] | None = None  # see _columns
        # CPU updates not applied yet: (indices, losses, their version counters), in order
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self._pending_samples = 0

    @property
    def ema(self) -> torch.Tensor:
        """Each sample's EMA loss (0 where never seen); a view of the tracker's state."""
        return self._applied()[0]

    @property
    def losses(self) -> torch.Tensor:
        """``h3-optimizer`` 0.2.0's ``losses``: each sample's EMA loss, and
        :attr:`initial_loss` where never seen (a new tensor: writing to it changes nothing)."""
        state = self._applied()
        return torch.where(state[3] > 0, state[0], self.initial_loss)

    @property
    def initialized(self) -> torch.Tensor:
        """``h3-optimizer`` 0.2.0's ``initialized``: :attr:`seen`."""
        return self.seen

    @property
    def first(self) -> torch.Tensor:
        """Each sample's first observed loss (0 where never seen); a view."""
        return self._applied()[1]

    @property
    def last(self) -> torch.Tensor:
        """Each sample's latest loss (0 where never seen); a view."""
        return self._applied()[2]

    @property
    def counts(self) -> torch.Tensor:
        """How many finite losses each sample had (a new int32 tensor)."""
        return self._applied()[3].int()

    @property
    def seen(self) -> torch.Tensor:
        """Whether each sample had a finite loss yet (a new bool tensor)."""
        return self._applied()[3] > 0

    @property
    def nonfinite_counts(self) -> torch.Tensor:
        """How many non-finite (ignored) losses each sample had (a new int32 tensor). A
        sample not :attr:`seen` with a count above 0 was sighted, but never with a finite
        loss."""
        return self._applied()[4].int()

    def _applied(self) -> torch.Tensor:
        """The state with every recorded update applied."""
        if self._pending:
            self._apply_pending()
        return self._state

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied (``torch.save``, ``copy.deepcopy``) with every recorded update
        applied, and a pending list of its own."""
        self._applied()
        return {**self.__dict__, "_pending": []}

    def _to(self, device: torch.device) -> None:
        if self._state.device != device:
            self._applied()
            self._state = self._state.to(device)
            self._nonfinite = self._nonfinite.to(device)

    def to(self, device: Any) -> LossTracker:
        """Move the state to ``device`` and return the tracker (``h3-optimizer`` 0.2.0's
        ``tracker.to(device)``; :meth:`update` also moves it to the losses' device)."""
        self._to(torch.device(device))
        return self

    def reset(self) -> None:
        """Forget every sample's losses: all never seen, no non-finite loss counted
        (``h3-optimizer`` 0.2.0's ``reset()``). Updates recorded and not applied yet are
        dropped."""
        self._pending, self._pending_samples = [], 0
        self._state.zero_()
        self._nonfinite.zero_()

    @torch.no_grad()
    def get_weights(self, cap_factor: float = 3.0, min_weight: float = 0.1) -> torch.Tensor:
        """``h3-optimizer`` 0.2.0's sampling weights, computed as it did: each sample's EMA
        loss (:attr:`initial_loss`, 1.0 unless given, for a never-seen one), capped at
        ``cap_factor`` × their mean, raised to at least ``min_weight``, scaled to sum to N
        (for ``torch.utils.data.WeightedRandomSampler``). On the state's device.

        :class:`InformationWeightedSampler` does not use them (it draws never-seen samples
        first and ranks the others by loss).

        Raises:
            ValueError: ``cap_factor`` is not above 0, or ``min_weight`` not in [0, 1).
        """
        if not cap_factor > 0.0:
            raise ValueError(f"Invalid cap_factor: {cap_factor}")
        if not 0.0 <= min_weight < 1.0:
            raise ValueError(f"Invalid min_weight: {min_weight}")
        weights = self.losses
        weights = weights.clamp(max=cap_factor * weights.mean()).clamp(min=min_weight)
        return weights / weights.sum() * self.num_samples

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(5, 1) columns over the state's rows (EMA, first, last, sightings, non-finite
        losses), on its device: how far each row moves toward a new loss for a seen sample
        and for an unseen one (``lerp`` by 0 keeps the value exactly, by 1 takes the loss
        exactly), what each row adds for a finite loss (one sighting) and what it adds for a
        non-finite one (one non-finite loss)."""
        key = (self._state.device, self.smoothing)
        if self._cols is None or self._cols[0] != key:
            kw: dict[str, Any] = {"device": self._state.device, "dtype": torch.float32}
            self._cols = (
                key,
                torch.tensor([[self.smoothing], [0.0], [1.0], [0.0], [0.0]], **kw),
                torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0]], **kw),
                torch.tensor([[0.0], [0.0], [0.0], [1.0], [0.0]], **kw),
                torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]], **kw),
            )
        return self._cols[1], self._cols[2], self._cols[3], self._cols[4]

    def update(self, indices: Any, losses: torch.Tensor) -> None:
        """Record per-sample ``losses`` (any shape with N elements) of dataset ``indices``.

        ``indices``: integers, as a tensor of any integer dtype, a list or a numpy integer
        array; a bool mask or floating-point values are a ``TypeError`` (they would be cast
        to sample numbers). A sample twice in one update counts as two sightings, in order.

        On the CPU the update is recorded and applied with the others when the state is next
        read (see the class; an index out of range raises ``IndexError`` then). Inference
        tensors (made under ``torch.inference_mode()``) have no version counter to record
        them by: such an update is applied now, with the same result (and the same
        ``IndexError``, raised now). Elsewhere it is applied now: about ten tensor
        operations, queued on the device.
        """
        if losses.requires_grad:
            losses = losses.detach()  # then nothing here records a graph
        if losses.dim() != 1:
            losses = losses.reshape(-1)
        if losses.dtype != torch.float32:
            losses = losses.float()
        self._to(losses.device)
        idx = indices
        if not isinstance(idx, torch.Tensor):
            idx = torch.tensor(indices, device=losses.device)  # a copy, as a list gives
            if not idx.numel():
                idx = idx.long()  # [] reads as float32: no index, nothing to refuse
        elif idx.device != losses.device:
            idx = idx.to(losses.device)
        if idx.dim() != 1:
            idx = idx.reshape(-1)
        if idx.dtype != torch.int64:
            if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
                raise TypeError(
                    f"LossTracker.update: indices must be integers (dataset indices), not "
                    f"{idx.dtype}: a bool mask or floating-point values would be cast to "
                    "sample numbers (pass mask.nonzero().flatten() for a mask)"
                )
            idx = idx.long()
        if idx.numel() != losses.numel():
            raise ValueError(f"{idx.numel()} indices for {losses.numel()} losses")
        if losses.is_cpu:
            try:
                versions = (idx._version, losses._version)
            except RuntimeError:
                # an inference tensor has no version counter: applied now, as a recorded
                # update is (repeats in order, an index out of range an IndexError)
                self._applied()
                self._apply_updates([(idx, losses)], recorded=False)
                return
            self._pending.append((idx, losses, *versions))
            self._pending_samples += idx.numel()
            if self._pending_samples >= self.max_pending:
                self._apply_pending()
            return
        self._applied()
        self._apply(idx, losses)

    def _apply_pending(self) -> None:
        """Apply the recorded updates, in order (those modified in place left out)."""
        pending, self._pending, self._pending_samples = self._pending, [], 0
        intact = [(i, x) for i, x, vi, vx in pending if i._version == vi and x._version == vx]
        if len(intact) < len(pending):
            warnings.warn(
                f"LossTracker: {len(pending) - len(intact)} update(s) left out: their indices "
                "or losses were modified in place after update() and before the tracker "
                "applied them (pass tensors that are not modified afterwards, e.g. "
                "losses.detach().clone())",
                RuntimeWarning,
                stacklevel=3,
            )
        self._apply_updates(intact)

    def _apply_updates(
        self, updates: list[tuple[torch.Tensor, torch.Tensor]], recorded: bool = True
    ) -> None:
        """Apply CPU ``updates``, in order: as one update when no sample repeats."""
        if not updates:
            return
        if len(updates) == 1:
            idx, losses = updates[0]
        else:
            idx = torch.cat([i for i, _ in updates])
            losses = torch.cat([x for _, x in updates])
        if not idx.numel():  # updates of no samples change nothing
            return
        low, high = torch.aminmax(idx)
        if int(low) < 0 or int(high) >= self.num_samples:
            # raises, naming the update; applies every valid one
            self._apply_each(updates, recorded)
            return
        # a sample recorded k times is updated in k rounds, in order (each round blends with
        # the last one's result); within a round no sample repeats, so one scatter is exact
        rounds = int(torch.bincount(idx).max())
        if rounds == 1:
            self._apply(idx, losses)
            return
        sorted_idx, order = torch.sort(idx, stable=True)
        pos = torch.arange(idx.numel())
        first = torch.ones_like(sorted_idx, dtype=torch.bool)
        first[1:] = sorted_idx[1:] != sorted_idx[:-1]
        start = torch.cummax(torch.where(first, pos, 0), 0).values
        occurrence = torch.empty_like(pos)
        occurrence[order] = pos - start
        for r in range(rounds):
            sel = occurrence == r
            self._apply(idx[sel], losses[sel])

    def _apply_each(
        self, updates: list[tuple[torch.Tensor, torch.Tensor]], recorded: bool = True
    ) -> None:
        """Apply ``updates`` one at a time; raise about the first that has an index out of
        range after applying the others."""
        error: Exception | None = None
        for k, (idx, losses) in enumerate(updates):
            try:
                self._apply(idx, losses)
            except (IndexError, RuntimeError) as exc:
                which = (
                    f"update {k + 1} of the {len(updates)} recorded since the state was last "
                    "read; the others are applied"
                    if recorded
                    else "an update of inference tensors, applied at once"
                )
                error = error or IndexError(
                    f"LossTracker.update: an index out of range for {self.num_samples} "
                    f"samples ({which}): {exc}"
                )
        if error is not None:
            raise error

    def _apply(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """One update: 1-D int64 ``idx`` and float32 ``losses`` on the state's device."""
        # Non-finite losses leave a sample's state as it was, but for its count of them.
        # On the CPU one sum read back (no device to wait for) says whether there are any,
        # and the common all-finite batch skips the mask; elsewhere the mask is arithmetic,
        # not boolean indexing, which would synchronise with the device.
        finite = None
        if not (losses.is_cpu and math.isfinite(losses.sum().item())):
            finite = (losses - losses) == 0  # isfinite in two kernels (it takes six)
        seen_weight, unseen_weight, step, nonfinite_step = self._columns()
        old = self._state.index_select(1, idx)
        # each row moves toward the loss by its weight: the EMA by `smoothing` once seen,
        # the first loss not at all once seen, the latest loss all the way; at a first
        # sighting all three take it; the sightings row adds one
        weight = torch.where(old[3] > 0, seen_weight, unseen_weight)
        new = old.lerp(losses, weight).add_(step)
        if finite is not None:
            new = torch.where(finite, new, old + nonfinite_step)
            self._nonfinite += finite.numel() - finite.sum()
        self._state.index_copy_(1, idx, new)

    @property
    def nonfinite_count(self) -> int:
        """How many non-finite losses were ignored (reads the device counter)."""
        self._applied()
        return int(self._nonfinite.item())

    @torch.no_grad()
    def sync(self, group: Any = None) -> None:
        """Make every rank's tracker the same under ``torch.distributed`` (a collective: call
        it on every rank; a no-op without an initialised process group or with one rank).

        Each rank tracks the samples of its own shard, so without this the ranks would rank
        samples by different losses, and their shards of a loss-driven draw would overlap
        and leave samples out. Each sample takes the state of the rank that has seen it
        most often (its newest state: shards are disjoint within an epoch), the lowest such
        rank on a tie; a sighting is a finite or a non-finite loss, so every rank also
        agrees on which samples were sighted only with non-finite losses. Three
        all-reduces of the (5, N) state. The total non-finite count
        (:attr:`nonfinite_count`) stays per rank. :meth:`InformationWeightedSampler.set_epoch`
        calls it.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        state = self._applied()
        work = state
        if dist.get_backend(group) == "nccl" and not state.is_cuda:  # NCCL needs CUDA tensors
            work = state.to(torch.device("cuda", torch.cuda.current_device()))
        counts = work[3] + work[4]  # every sighting; the reductions work on copies
        most = counts.clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        rank = float(dist.get_rank(group))
        owner = torch.where(counts == most, rank, float(world))
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
        merged = torch.where(
            owner == rank, work, torch.zeros((), dtype=work.dtype, device=work.device)
        )
        dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=group)
        self._state.copy_(merged)

    @torch.no_grad()
    def unlearned_fraction(
        self,
        ratio: float = LEARNED_RATIO,
        indices: Any = None,
        losses: torch.Tensor | None = None,
    ) -> float:
        """Share of the samples not learned yet: never seen, or whose latest loss is above
        ``ratio`` × the mean first-sighting loss (for cross-entropy from a 10-class start and
        the default ``ratio=0.2``, about 0.46 nats: the right class under 63 % probability,
        not learned yet).

        The latest loss, not the EMA: with smoothing 0.1 the EMA still carries half of a
        sample's first loss after seven sightings. A sample whose loss rose above its first
        while the model learned is not counted: its label likely disagrees with what the
        model learns (a flipped label), and keeping it teaches nothing. One host sync.

        ``indices`` and ``losses``: the share among those samples, judged by these losses
        (measured now, e.g. on a fixed subset) instead of the tracked latest ones. A latest
        loss is as old as its sample's last sighting: after one epoch, the first batches'
        losses are those of a model that had barely trained.
        """
        seen = self.seen
        if not seen.any():
            return 1.0
        scale = ratio * self.first[seen].mean()
        first, last = self.first, self.last
        if indices is not None and losses is not None:
            idx = torch.as_tensor(indices, device=seen.device).long().reshape(-1)
            seen, first = seen[idx], first[idx]
            last = losses.detach().float().to(seen.device).reshape(-1)
            if last.numel() != idx.numel():
                raise ValueError(f"{idx.numel()} indices but {last.numel()} losses")
        settled = seen & ((last <= scale) | (last > first))
        return 1.0 - float(settled.float().mean())

    @torch.no_grad()
    def rose(self, factor: float = 1.0, margin: float = 0.0) -> torch.Tensor:
        """Which samples' EMA loss rose above ``factor`` × their first loss + ``margin`` (a
        bool mask on the tracker's device; never-seen samples are False). A loss that rose
        while the model learned points at a label that disagrees with what the model learns
        (the sampler's noise guard and its ``noise_margin`` both ask this)."""
        return self.seen & (self.ema > factor * self.first + margin)

    def get(self, indices: Any) -> torch.Tensor:
        idx = torch.as_tensor(indices, device=self.ema.device).long()
        return self.ema[idx]

    def unseen(self) -> torch.Tensor:
        """Indices never observed."""
        return torch.nonzero(~self.seen).reshape(-1)

    def summary(self) -> dict[str, float]:
        """Mean, std, min, max of the tracked losses, and the fraction seen."""
        mask = self.seen
        seen = self.ema[mask]
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
            "seen_frac": float(mask.float().mean()),
            "mean": float(seen.mean()),
            "std": float(seen.std()) if seen.numel() > 1 else 0.0,
            "min": float(seen.min()),
            "max": float(seen.max()),
            "nonfinite": float(self.nonfinite_count),
        }

    def state_dict(self) -> dict[str, Any]:
        self._applied()
        return {
            "num_samples": self.num_samples,
            "smoothing": self.smoothing,
            "ema": self.ema.clone(),
            "seen": self.seen,
            "counts": self.counts,
            "first": self.first.clone(),
            "last": self.last.clone(),
            "nonfinite": self._nonfinite.clone(),
            "nonfinite_counts": self.nonfinite_counts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state``, from :meth:`state_dict` (of this version or an earlier one) or
        from ``h3-optimizer`` 0.2.0's ``LossTracker.state_dict()``.

        A 0.2.0 state (``losses``, ``initialized``, ...) is mapped: each initialized sample
        with a finite loss is seen once, that loss its EMA, first and latest loss; one with
        a non-finite loss counts one non-finite loss; the others are never seen.

        Raises:
            ValueError: The state is for another number of samples, or (0.2.0) its
                ``smoothing`` is not in (0, 1].
        """
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"state is for {state['num_samples']} samples, tracker has {self.num_samples}"
            )
        if "ema" not in state and "losses" in state:
            self._load_020(state)
            return
        dev = self._applied().device  # what was recorded before belongs to the old state
        self.smoothing = float(state["smoothing"])
        ema = state["ema"].to(dev).float()
        # a sample marked seen counts at least one sighting
        counts = torch.maximum(state["counts"].to(dev).float(), state["seen"].to(dev).float())
        # states saved before ``first`` and ``last`` existed: the EMA is the best reference
        first = state.get("first", state["ema"]).to(dev).float()
        last = state.get("last", state["ema"]).to(dev).float()
        # states saved before the per-sample non-finite counts: none counted
        bad = state.get("nonfinite_counts")
        bad = torch.zeros_like(ema) if bad is None else bad.to(dev).float()
        self._state = torch.stack((ema, first, last, counts, bad))
        self._nonfinite = state["nonfinite"].to(dev).clone()

    def _load_020(self, state: dict[str, Any]) -> None:
        """:meth:`load_state_dict` of an ``h3-optimizer`` 0.2.0 state."""
        smoothing = float(state["smoothing"])
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(
                f"the h3-optimizer 0.2.0 state has smoothing {smoothing}: h3optim's is in (0, 1]"
            )
        dev = self._applied().device
        losses = state["losses"].to(dev).float()
        initialized = state["initialized"].to(dev).bool()
        finite = torch.isfinite(losses)
        seen = (initialized & finite).float()
        bad = (initialized & ~finite).float()
        ema = torch.where(seen > 0, losses, 0.0)
        self.smoothing = smoothing
        self.initial_loss = float(state.get("initial_loss", self.initial_loss))
        self._state = torch.stack((ema, ema.clone(), ema.clone(), seen, bad))
        self._nonfinite = bad.sum().to(torch.int64)
