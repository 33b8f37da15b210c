"""Information-weighted sampling with warmup, thermodynamic and consolidation phases."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from h3optim.tracking import LossTracker, take_rows

PHASES = ("warmup", "thermodynamic", "consolidation")


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean(weights · losses)`` over a batch's per-sample ``losses`` (one per sample, of
    any shape): the loss to back-propagate with :meth:`InformationWeightedSampler.weights`.

    The weights (no gradient flows into them) may be on another device or of another dtype
    than the losses (the sampler's are float32 on the CPU). Computed as one dot product with
    ``weights / n``, which costs autograd a third of a product followed by a mean.
    """
    if losses.dim() != 1:
        losses = losses.reshape(-1)
    w = weights.to(device=losses.device, dtype=losses.dtype)
    return losses @ (w if w.dim() == 1 else w.reshape(-1)).mul(1.0 / losses.numel())


def _epoch_count(total_epochs: object) -> int:
    """``total_epochs`` as an ``int`` above 0, or a clear error.

    Accepts integers (numpy's too) and integral floats (``10.0``); refuses a bool (``True``
    is no count of epochs), a fraction (``0.01``: an ``lr`` in the wrong place) and 0 or less.
    """
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, numbers.Real):
        raise TypeError(
            f"total_epochs must be a whole number of epochs, got {type(total_epochs).__name__} "
            f"{total_epochs!r}"
        )
    if isinstance(total_epochs, numbers.Integral):
        count = int(total_epochs)
    elif float(total_epochs).is_integer():
        count = int(float(total_epochs))
    else:
        raise ValueError(
            f"Invalid total_epochs: {total_epochs!r} is not a whole number of epochs (a learning "
            "rate passed where total_epochs stands?)"
        )
    if count <= 0:
        raise ValueError(f"Invalid total_epochs: {total_epochs!r}")
    return count


class PhaseSchedule:
    """Which phase an epoch is in: warmup → thermodynamic → consolidation.

    Warmup and consolidation sample uniformly over all data; the thermodynamic phase is where
    information weighting applies. Fractions are of ``total_epochs`` (15/70/15 by default).

    ``total_epochs`` is a whole number of epochs (an integral float such as ``10.0`` is taken
    as ``10``). A fraction is refused: ``0.01``, say, an ``lr`` passed where ``total_epochs``
    stands, made every epoch after the first "consolidation", so the run never sampled, and
    nothing said so.

    Raises:
        TypeError: ``total_epochs`` is a bool or not a real number.
        ValueError: ``total_epochs`` is not a whole number above 0, or the fractions are
            out of range.
    """

    def __init__(
        self, total_epochs: int, warmup: float = 0.15, consolidation: float = 0.15
    ) -> None:
        total_epochs = _epoch_count(total_epochs)
        if warmup < 0 or consolidation < 0 or warmup + consolidation > 1:
            raise ValueError(
                f"Invalid phase fractions: warmup={warmup}, consolidation={consolidation}"
            )
        self.total_epochs = total_epochs
        self.warmup_epochs = int(math.ceil(warmup * total_epochs)) if warmup > 0 else 0
        self.consolidation_epochs = (
            int(math.ceil(consolidation * total_epochs)) if consolidation > 0 else 0
        )

    def phase(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch >= self.total_epochs - self.consolidation_epochs:
            return "consolidation"
        return "thermodynamic"


class InformationWeightedSampler(Sampler[int]):
    """Each epoch, ``keep_frac·N`` indices: a share chosen by loss, the rest uniformly.

    The ``1 − uniform_mix`` share goes to the highest-information samples (never-seen ones
    first, then the highest tracked loss); the ``uniform_mix`` share is drawn uniformly from
    all the others, so no sample is starved forever. Samples whose loss is above the
    ``outlier_quantile`` of seen losses are not eligible for the loss-driven share (loss-driven
    selection otherwise keeps choosing mislabeled examples); they can still be drawn uniformly.
    Nor is a sample whose losses were all non-finite (a corrupt input, say) once it has been
    sighted: never seen, it would otherwise be ranked first and drawn every epoch.

    Deterministic for (``seed``, epoch): it uses its own generator, never global RNG state.
    With ``num_replicas`` it shards like ``DistributedSampler`` (padded to equal length,
    disjoint strides). With ``unbiased=True``, :meth:`weights` returns per-index loss
    weights under which the expected gradient of an epoch equals full-data training's
    (inverse inclusion probability, the idea of InfoBatch's 1/(1−r) rescaling), except for
    samples whose loss rose more than ``noise_margin`` above its first value: their labels
    likely disagree with what the model learns, and they get weight 0.

    N is fixed when the sampler is built, as its tracker's is: a dataset whose length
    changed since raises ``RuntimeError`` at the next epoch (:meth:`set_epoch`, or a draw:
    iterating, :meth:`indices`, :meth:`draw`); build a new tracker and sampler for it.

    Args:
        dataset_or_n: The dataset (its length is used, and checked at every epoch) or N.
        loss_tracker: Where per-sample losses come from.
        keep_frac: Fraction of N drawn per epoch, in (0, 1].
        uniform_mix: Fraction of the drawn set that is uniform, in [0, 1].
        num_replicas: World size (default: from torch.distributed if initialised, else 1).
        rank: This replica (default: from torch.distributed if initialised, else 0).
        seed: Base seed.
        unbiased: Expose re-weighting through :meth:`weights`.
        outlier_quantile: Losses above this quantile of seen losses are left to the uniform
            share. 0.9 by default: measured on MNIST-1D with 20 % flipped labels it brings the
            flipped share of back-propagated samples from 26 % (at 0.98) to 21.5 % and gains 3
            points, for at most a point on clean data (benchmarks/learning.py).
        noise_guard: A sample whose tracked loss is above ``noise_guard`` × its first loss is
            left to the uniform share (None: no such guard).
        max_weight: Cap on the unbiased weights (None: no cap).
        noise_margin: With ``unbiased=True``, a sample whose tracked loss is more than
            ``noise_margin`` above its first loss (in the loss's unit: nats for a
            cross-entropy) gets weight 0, so the mean is then unbiased for the other samples.
            0.5 by default: with 20 % flipped MNIST-1D labels it flags about a quarter of the
            flipped samples by mid-run and about 1 % of the clean ones (none on a clean run's
            first epochs); None re-weights every sample. When more than half the seen samples
            would be flagged, the model is not learning (a divergence), not meeting bad
            labels, and no sample is set to 0.
        noise_min_share: ``noise_margin`` sets samples to 0 only once at least this share of
            the seen samples is flagged. On clean data a few losses rise while the model
            learns: about 1.3 % of clean MNIST-1D over 40 epochs, hard samples it still
            learns from (leaving them out cost 0.6 points of test accuracy over 30 seeds);
            with 20 % flipped labels 8 % are flagged, 94 % of them flipped. 0 flags at any
            share.
    """

    def __init__(
        self,
        dataset_or_n: Sized | int,
        loss_tracker: LossTracker,
        keep_frac: float = 1.0,
        uniform_mix: float = 1.0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        unbiased: bool = False,
        outlier_quantile: float = 0.9,
        noise_guard: float | None = 1.0,
        max_weight: float | None = None,
        noise_margin: float | None = 0.5,
        noise_min_share: float = 0.02,
    ) -> None:
        n = dataset_or_n if isinstance(dataset_or_n, int) else len(dataset_or_n)
        if n <= 0:
            raise ValueError(f"Invalid dataset size: {n}")
        if n != loss_tracker.num_samples:
            raise ValueError(f"dataset has {n} samples, loss tracker {loss_tracker.num_samples}")
        if num_replicas is None:
            num_replicas = (
                dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            )
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank} for {num_replicas} replicas")
        if not 0.0 < outlier_quantile <= 1.0:
            raise ValueError(f"Invalid outlier_quantile: {outlier_quantile}")
        if noise_guard is not None and not noise_guard > 0:
            raise ValueError(f"Invalid noise_guard: {noise_guard}")
        if max_weight is not None and not max_weight > 0:
            raise ValueError(f"Invalid max_weight: {max_weight}")
        if noise_margin is not None and not noise_margin >= 0:
            raise ValueError(f"Invalid noise_margin: {noise_margin}")
        if not 0.0 <= noise_min_share <= 0.5:
            raise ValueError(f"Invalid noise_min_share: {noise_min_share}")
        self.n = n
        #: The dataset whose length N is, checked at every epoch (None when built from N).
        self.data_source: Sized | None = None if isinstance(dataset_or_n, int) else dataset_or_n
        self.tracker = loss_tracker
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = operator.index(seed)  # a builtin int: a numpy one fails a weights-only load
        self.unbiased = unbiased
        self.outlier_quantile = outlier_quantile
        self.noise_guard = noise_guard
        self.max_weight = max_weight
        self.noise_margin = noise_margin
        self.noise_min_share = noise_min_share
        self.replacement = False
        self.epoch = 0
        self.keep_frac = 1.0
        self.uniform_mix = 1.0
        self.set_fractions(keep_frac, uniform_mix)
        self._probs: torch.Tensor | None = None
        self._weights: tuple[torch.Tensor, tuple[Any, ...], torch.Tensor] | None = None

    def set_fractions(self, keep_frac: float, uniform_mix: float) -> None:
        if not 0.0 < keep_frac <= 1.0:
            raise ValueError(f"Invalid keep_frac: {keep_frac}")
        if not 0.0 <= uniform_mix <= 1.0:
            raise ValueError(f"Invalid uniform_mix: {uniform_mix}")
        self.keep_frac, self.uniform_mix = float(keep_frac), float(uniform_mix)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` next. With several replicas under ``torch.distributed``, the
        loss trackers of all ranks are made the same first (:meth:`LossTracker.sync`), so
        that every rank draws the same epoch and the shards split it: call it on every rank
        at every epoch, as with ``DistributedSampler``.

        Raises:
            RuntimeError: The dataset's length changed since the sampler was built.
        """
        self._check_size()
        self.epoch = operator.index(epoch)
        if self.num_replicas > 1:
            self.tracker.sync()

    def _check_size(self) -> None:
        """Raise if the dataset's length is no longer N: its new samples would never be
        drawn (and the tracker could not hold their losses), without a word."""
        if self.data_source is None:
            return
        size = len(self.data_source)
        if size != self.n:
            raise RuntimeError(
                f"the dataset changed from {self.n} to {size} samples since the sampler was "
                f"built: InformationWeightedSampler and its LossTracker hold {self.n}; build a "
                f"new LossTracker and InformationWeightedSampler for the {size} samples"
            )

    @property
    def num_kept(self) -> int:
        return max(1, int(round(self.keep_frac * self.n)))

    @property
    def num_samples(self) -> int:
        """Indices this replica yields per epoch."""
        return int(math.ceil(self.num_kept / self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def epoch_indices(self) -> torch.Tensor:
        """All replicas' indices for this epoch (before sharding), on the CPU."""
        idx, probs = self.draw(self.keep_frac, self.uniform_mix)
        self._probs = probs
        return idx

    def draw(self, keep_frac: float, uniform_mix: float) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's indices under (``keep_frac``, ``uniform_mix``), and every sample's
        inclusion probability: tensor operations only, deterministic for (seed, epoch).

        :meth:`epoch_indices` is ``draw`` at the sampler's own fractions; a controller that
        compares two settings within an epoch draws both from the same losses
        (:meth:`draws`).
        """
        idx, probs, _ = self._draw(keep_frac, uniform_mix, None)
        return idx, probs

    def draws(self, settings: list[tuple[float, float]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`draw` for each (``keep_frac``, ``uniform_mix``) in ``settings``, the same
        results, with the samples ranked by loss once for all of them (the ranking depends
        only on the tracked losses and the epoch's seed)."""
        ranked = None
        out = []
        for keep_frac, uniform_mix in settings:
            idx, probs, ranked = self._draw(keep_frac, uniform_mix, ranked)
            out.append((idx, probs))
        return out

    def _rank(self, jitter: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every sample, never sighted first (in random order), then by tracked loss,
        descending; and how many are eligible for the loss-driven share (outliers, likely
        flipped labels and samples sighted only with non-finite losses wait for the uniform
        draw)."""
        ema = self.tracker.ema.detach().float().cpu()
        seen = self.tracker.seen.cpu()
        # no finite loss yet: never sighted (first), or sighted with non-finite losses only
        # (a corrupt sample: ranked first, it would be drawn every epoch and its NaN
        # gradient skip its batch's step each time)
        unseen = ~seen
        fresh = unseen & (self.tracker.nonfinite_counts.cpu() == 0)
        score = ema.clone()
        if seen.any():
            cap = (
                torch.quantile(ema[seen], self.outlier_quantile)
                if self.outlier_quantile < 1
                else math.inf
            )
            score[seen & (ema > cap)] = -math.inf
            if self.noise_guard is not None:  # likely a flipped label (LossTracker.rose)
                score[self.tracker.rose(factor=self.noise_guard).cpu()] = -math.inf
        score[unseen] = -math.inf
        score[fresh] = math.inf
        order = torch.argsort(score + jitter, descending=True)  # jitter: random among ties
        return order, int(torch.isfinite(score).sum() + fresh.sum())

    def _draw(
        self, keep_frac: float, uniform_mix: float, ranked: tuple[torch.Tensor, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, int] | None]:
        self._check_size()
        g = self._generator()
        n = self.n
        k = max(1, int(round(keep_frac * n)))
        n_loss = int(round((1.0 - uniform_mix) * k))
        probs = torch.zeros(n)
        if n_loss > 0:
            jitter = torch.rand(n, generator=g) * 1e-6  # drawn either way: g's state after it
            if ranked is None:
                ranked = self._rank(jitter)
            order, eligible = ranked
            chosen = order[: min(n_loss, eligible)]
        else:
            chosen = torch.empty(0, dtype=torch.long)
        n_uniform = k - chosen.numel()
        rest_mask = torch.ones(n, dtype=torch.bool)
        rest_mask[chosen] = False
        rest = torch.nonzero(rest_mask).reshape(-1)
        pick = rest[torch.randperm(rest.numel(), generator=g)[:n_uniform]]
        probs[chosen] = 1.0
        if rest.numel() > 0:
            probs[rest] = n_uniform / rest.numel()
        idx = torch.cat([chosen, pick])
        return idx[torch.randperm(idx.numel(), generator=g)], probs, ranked

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This replica's share of all replicas' ``idx`` (padded like ``DistributedSampler``)."""
        total = int(math.ceil(idx.numel() / self.num_replicas)) * self.num_replicas
        if idx.numel() < total:  # pad so that every replica has as many
            reps = int(math.ceil(total / idx.numel()))
            idx = idx.repeat(reps)[:total]
        return idx[self.rank : total : self.num_replicas]

    def indices(self) -> torch.Tensor:
        """This replica's indices for this epoch as one tensor (what ``__iter__`` yields)."""
        return self.shard(self.epoch_indices())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def weights(self, indices: Any) -> torch.Tensor:
        """Loss weights for ``indices`` drawn this epoch: mean(w·loss) is unbiased for the
        full-data mean loss (requires ``unbiased=True``; all ones otherwise). One gather
        from the epoch's weight vector."""
        idx = indices if type(indices) is torch.Tensor else torch.as_tensor(indices)
        if not self.unbiased:
            return torch.ones(idx.numel())
        if self._probs is None:
            self.epoch_indices()
        probs, key = self._probs, (self.num_kept, self.max_weight, self.noise_margin)
        assert probs is not None
        cache = self._weights
        if cache is None or cache[0] is not probs or cache[1] != key:
            # the epoch's vector, computed once per draw and not per batch
            cache = self._weights = (probs, key, self.weights_from(probs, key[0]))
        return take_rows(cache[2], idx if idx.dtype == torch.int64 else idx.long())

    def weights_from(self, probs: torch.Tensor, num_kept: int) -> torch.Tensor:
        """Every sample's unbiased weight under inclusion probabilities ``probs``, capped at
        ``max_weight`` (a rarely drawn sample must not dominate a batch's gradient), and 0
        for the samples :meth:`likely_mislabeled` names (their tracked losses as of the call)."""
        w = (num_kept / self.n) / probs.clamp_min(1e-12)
        if self.max_weight is not None:
            w = w.clamp_max(self.max_weight)
        if self.noise_margin is not None:
            w = w.masked_fill(self.likely_mislabeled(), 0.0)
        return w

    def likely_mislabeled(self) -> torch.Tensor:
        """Which samples' tracked loss rose more than ``noise_margin`` above its first value
        (a bool mask on the CPU). All False without a margin; when fewer than
        ``noise_min_share`` of the seen samples rose (hard samples of clean data, not bad
        labels); and when more than half rose (a model that is not learning)."""
        if self.noise_margin is None:
            return torch.zeros(self.n, dtype=torch.bool)
        rose = self.tracker.rose(margin=self.noise_margin).cpu()
        flagged, seen = int(rose.sum()), int(self.tracker.seen.sum())
        if 2 * flagged > seen or flagged < self.noise_min_share * seen:
            return torch.zeros(self.n, dtype=torch.bool)
        return rose

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "keep_frac": self.keep_frac,
            "uniform_mix": self.uniform_mix,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed = operator.index(state["epoch"]), operator.index(state["seed"])
        self.set_fractions(state["keep_frac"], state["uniform_mix"])
