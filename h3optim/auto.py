"""``AutoH3``: profiler, controller, sampler, optimizer and loss tracking in one object."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from h3optim._modes import evaluating
from h3optim.controller import EtaController
from h3optim.denormals import flushing_denormals, subnormal_share
from h3optim.loading import batch_loader, is_batchable
from h3optim.optimizer import H3Optimizer
from h3optim.presets import MAX_LR_COMPENSATION as MAX_LR_COMPENSATION  # documented here too
from h3optim.presets import compensation_factor, create_controlled_h3
from h3optim.sampler import InformationWeightedSampler, weighted_mean
from h3optim.tracking import LEARNED_RATIO, IndexedDataset, LossTracker, take_rows

LN2 = math.log(2.0)
_CPU = torch.device("cpu")


def _moved(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a dict, list or tuple of them) on ``device``."""
    return _each_tensor(batch, lambda t: t.to(device))


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``batch`` (a tensor, dict, list or tuple)."""
    return _each_tensor(batch, lambda t: t[start:stop])


def _device_of(model: torch.nn.Module) -> torch.device | None:
    """Where the training loop put ``model`` (its first parameter's device); None without
    parameters."""
    param = next(model.parameters(), None)
    return None if param is None else param.device


def _each_tensor(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _each_tensor(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_each_tensor(v, fn) for v in batch)
    return batch


_PER_SAMPLE = (
    "AutoH3 weights and tracks each sample's loss, so the criterion must return one loss per "
    "sample: accept reduction='none' (as torch's losses and functions do) or have a "
    "reduction attribute (AutoH3 sets it to 'none' for the call), and return a tensor whose "
    "first dimension is the batch, not the batch's mean"
)


def _reduced(
    criterion: Callable[..., torch.Tensor], out: Any, target: Any, reduction: str
) -> torch.Tensor:
    """``criterion(out, target)`` with ``reduction``: a ``reduction`` attribute (as
    ``nn.CrossEntropyLoss`` has) is set for the call, else ``reduction=`` is passed."""
    current = getattr(criterion, "reduction", None)
    if current is not None:
        # a plain attribute (as torch's losses have) is set past nn.Module.__setattr__'s
        # parameter/buffer/module checks: 0.7 µs a step instead of 6
        put = object.__setattr__ if "reduction" in getattr(criterion, "__dict__", ()) else setattr
        put(criterion, "reduction", reduction)
        try:
            return criterion(out, target)
        finally:
            put(criterion, "reduction", current)
    try:
        return criterion(out, target, reduction=reduction)
    except TypeError as exc:
        if "reduction" not in str(exc):
            raise
        raise ValueError(f"{_PER_SAMPLE}; {criterion!r} does not take it: {exc}") from exc


def _per_sample(
    criterion: Callable[..., torch.Tensor], out: Any, target: Any, n: int
) -> torch.Tensor:
    """``criterion``'s loss of each of the ``n`` samples (see :func:`_reduced`); a loss with
    more dimensions is averaged per sample."""
    losses = _reduced(criterion, out, target, "none")
    if losses.dim() == 0 or losses.size(0) != n:
        raise ValueError(
            f"{_PER_SAMPLE}; {criterion!r} returned a loss of shape {tuple(losses.shape)} "
            f"for a batch of {n}"
        )
    return losses.reshape(n, -1).mean(1) if losses.dim() > 1 else losses


def _loss_sum(
    criterion: Callable[..., torch.Tensor], out: Any, target: Any, n: int
) -> torch.Tensor:
    """The sum of ``criterion``'s per-sample losses (:func:`_per_sample`) of ``n`` samples.
    A cross-entropy of (N, C) logits, one loss per sample, sums itself (``reduction="sum"``):
    the same figure, to the bit what the held-out loss always was for it."""
    cross_entropy = criterion is torch.nn.functional.cross_entropy or (
        type(criterion) is torch.nn.CrossEntropyLoss
    )
    if cross_entropy and isinstance(out, torch.Tensor) and out.dim() == 2:
        return _reduced(criterion, out, target, "sum")
    return _per_sample(criterion, out, target, n).sum()


def _class_indices(out: Any, target: Any) -> bool:
    """Whether ``target`` holds the class index of each row of the scores ``out``: an
    integer (N,) tensor, with ``out`` (N, C) (what accuracy by ``argmax(1)`` needs)."""
    return (
        isinstance(out, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
        and target.dim() == 1
        and out.dim() == 2
        and out.shape[0] == target.shape[0]
    )


def _weighted(
    sampler: InformationWeightedSampler,
    idx: torch.Tensor,
    weights_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """This replica's share (``sampler.shard``) of the drawn epoch ``idx`` less the samples
    the step would weight 0 (``weights_of(idx)``: one weight per index), and how many were
    left out. They would add nothing to a step's loss or gradient, so the epoch's gradients
    sum to the same without them, from fewer samples and steps. Only an unbiased draw with a
    noise margin weights samples 0; all of ``idx`` if every weight is 0 (an epoch, or a
    window's draw, is never empty)."""
    kept = idx
    if sampler.unbiased and sampler.noise_margin is not None:
        kept = idx[weights_of(idx).ne(0)]
        if not kept.numel():
            kept = idx
    return sampler.shard(kept), idx.numel() - kept.numel()


class _Drawn(Sampler[int]):
    """One epoch's indices, drawn already (``indices()``: :func:`~h3optim.batch_loader`'s
    one-tensor path)."""

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx

    def __len__(self) -> int:
        return self.idx.numel()

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx.tolist())

    def indices(self) -> torch.Tensor:
        return self.idx


_Setting = tuple[str | None, float, float]  # a window's (label, keep_frac, uniform_mix)


class _Handed(NamedTuple):
    """A batch :class:`_WindowedBatches` handed out: its indices, its window's setting
    (label None: not part of the test) and the weights of the draw it came from."""

    idx: torch.Tensor
    setting: _Setting
    weights: torch.Tensor


class _WindowedBatches(Sampler[torch.Tensor]):
    """A thermodynamic epoch during a windowed A/B test: batches of ``window_steps`` windows
    come from the A draw (current setting) or the B draw (probe) as the controller says.

    The epoch has as many batches as the A draw alone would (it costs what A costs; with
    ``drop_last`` its full batches only); A windows read the A draw in order, B windows the
    B draw. Read lazily, batch by batch, so a decision taken mid-epoch applies to the next
    window. Windows run on across epoch boundaries (``offset``): an epoch shorter than a
    window still contributes.

    A ``DataLoader`` with workers reads its sampler ahead of the training loop (two batches
    per worker by default), so a window can start here before the one before it has been
    trained and observed. Each batch handed out is therefore remembered with its window's
    setting and its draw's weights, and :meth:`take` gives the training step the record of
    the batch it trains (matched by its indices), whatever was handed out since. A window
    that starts while the one before it is still being trained gets the other label (the
    one the controller will expect once that window is observed); one the controller does
    not then expect (a window it did not observe, or a decision in between) is trained but
    not observed (see ``AutoH3._window_tick``).
    """

    def __init__(
        self,
        controller: EtaController,
        sampler: InformationWeightedSampler,
        batch_size: int,
        window_steps: int,
        offset: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.controller = controller
        self.offset = offset  # steps of the current window trained in earlier epochs
        self.batch_size = batch_size
        self.window_steps = window_steps
        self.draws: dict[str, tuple[float, float, torch.Tensor, torch.Tensor]] = {}
        settings = {
            "A": (controller.keep_frac, controller.uniform_mix),
            "B": controller.probe_setting(),
        }
        for (label, (k, u)), (idx, probs) in zip(
            settings.items(), sampler.draws(list(settings.values())), strict=True
        ):
            weights = sampler.weights_from(probs, max(1, int(round(k * sampler.n))))
            share, skipped = _weighted(sampler, idx, functools.partial(take_rows, weights))
            if label == "A":  # the epoch trains on as many samples as A's draw holds
                self.skipped = skipped
            self.draws[label] = (k, u, share, weights)
        a_count = self.draws["A"][2].numel()
        self.num_batches = a_count // batch_size if drop_last else math.ceil(a_count / batch_size)
        self.handed: collections.deque[_Handed] = collections.deque()  # not trained yet
        self.in_flight = 0  # windows begun here and not yet ended by the training loop
        self._last: _Setting | None = None  # the setting of the window begun last

    def __len__(self) -> int:
        return self.num_batches

    def _next_setting(self) -> _Setting:
        """The setting of a window about to begin (label None: train on A, untested)."""
        c = self.controller
        last = self._last if self.in_flight else None
        if last is not None and last[0] is not None and c.window_testing:
            # the window before is still being trained (a loader's workers read ahead): by
            # the time this one ends, the controller will have observed it and expect the
            # other label
            label = "B" if last[0] == "A" else "A"
            k, u = c.probe_setting() if label == "B" else (c.keep_frac, c.uniform_mix)
        else:
            label, k, u = c.window_setting()
        dk, du, _, _ = self.draws[label]
        # a setting this epoch did not draw (a decision mid-epoch): train on A, untested
        return (label, k, u) if (dk, du) == (k, u) else (None, k, u)

    def end_window(self) -> None:
        """The training loop ended a window."""
        self.in_flight = max(0, self.in_flight - 1)

    def take(self, idx: torch.Tensor) -> _Handed | None:
        """The record of the handed-out batch whose indices are ``idx`` (the oldest one not
        trained yet if none matches: indices changed by the caller), forgotten once taken;
        None if nothing is left."""
        handed = self.handed
        if not handed:
            return None
        if handed[0].idx is idx:  # without workers the loader gives back the very tensor
            return handed.popleft()
        if idx.device.type == "cpu":
            for i, batch in enumerate(handed):  # the first one, unless batches were skipped
                if batch.idx.shape == idx.shape and torch.equal(batch.idx, idx):
                    del handed[i]
                    return batch
        return handed.popleft()

    def __iter__(self) -> Iterator[torch.Tensor]:
        cursors = {"A": 0, "B": 0}
        remaining = self.draws["A"][2].numel()  # the epoch trains on exactly what A would
        self.handed.clear()
        self.in_flight = 0
        setting: _Setting = (None, 0.0, 0.0)
        for b in range(self.num_batches):
            if b == 0 or (self.offset + b) % self.window_steps == 0:
                setting = self._last = self._next_setting()
                self.in_flight += 1
            use = setting[0] or "A"
            idx = self.draws[use][2]
            n = min(self.batch_size, remaining)
            remaining -= n
            start = cursors[use] % idx.numel()
            cursors[use] = start + n
            chunk = idx[start : start + n]
            if chunk.numel() < n:  # a B draw smaller than A's reads on from its start
                chunk = torch.cat([chunk, idx[: n - chunk.numel()]])
            self.handed.append(_Handed(chunk, setting, self.draws[use][3]))
            yield chunk


class AutoH3:
    """Energy-aware training in one object, streaming to the h3d daemon.

    Args:
        params: Model parameters.
        dataset: A map-style dataset of ``(data, target)`` (or dict) items.
        mode: Controller mode: ``safe``, ``balanced``, ``green``, ``extreme``.
        name: Run name for the daemon.
        total_epochs: Planned epochs (phases and the controller depend on it); 10 by
            default. Every epoch from ``total_epochs`` on is "consolidation" (all data, no
            sampling): :meth:`get_loader` warns once when it reaches one.
        lr: Initial step of :class:`~h3optim.H3Optimizer`.
        accuracy_tolerance: Points of accuracy the controller may give up before backing off.
        unbiased: Weight each loss by the inverse of its inclusion probability, so an
            epoch's expected gradient is the full data's, less the samples whose loss rose
            more than ``noise_margin`` above its first value (likely mislabeled: weight 0).
            True by default: on clean labels it beats the loss-biased draw, and with the
            margin it keeps the biased draw's protection from flipped labels
            (docs/optim.md, "Biased or unbiased draws"). ``False`` trains on the draw as it is.
            :meth:`get_loader` leaves the drawn samples of weight 0 out of the epoch: they
            would add nothing to a step's loss or gradient, so the epoch's gradients sum to
            the same from fewer samples and steps (their tracked losses then stay as they
            were, and so does their weight; ``samples_skipped`` counts them).
        noise_margin: See :class:`~h3optim.InformationWeightedSampler` (in the loss's unit;
            0.5 suits a cross-entropy in nats; None weights every drawn sample).
        seed: Sampler seed.
        profile: Stream to the daemon through an ``h3client.H3Profiler``.
        profiler: A profiler-like object to use instead (``log_batch``, ``log_epoch``,
            ``live_eta``, ``energy_j``, ``stop``).
        config: Extra run configuration to store.
        profiler_kwargs: Passed to ``H3Profiler`` (url, data_dir, autostart, ...).
        window_steps: Steps per window of the controller's windowed A/B test.
        probe_size: Training samples (a fixed random subset) whose loss is evaluated at each
            window boundary while a test runs; the window's η is their loss drop per joule.
            Evaluated without gradient in chunks of twice the loader's batch size, each
            moved to the model's device in turn.
        warmup, consolidation: Phase fractions (uniform epochs at the start and the end).
        learned_ratio: The learning floor (see :meth:`EtaController.control_step`): a sample
            counts as learned once its loss is below this fraction of the mean
            first-sighting loss (0.2: about 0.46 nats for 10 classes, the right class at
            63 %); while few are, thermodynamic epochs keep every sample not learned yet.
            Judged at the start of each thermodynamic epoch on the ``probe_size`` probe
            samples with the model as it is then (a pass without gradient). It stands down
            in an epoch that starts with likely mislabeled samples flagged (``noise_margin``;
            the report says so once): the share not learned yet then counts the mislabeled
            samples not flagged yet. In (0, 1]; ``None`` turns the floor off.
        log_per_sample: Also stream every batch's per-sample losses and indices to the
            daemon (stored with the run), not only its mean loss. Off by default: the
            controller reads its own tracker, the daemon's η needs only the means, and in a
            fast loop the vectors cost the training thread several µs a step
            (docs/client.md).
        optimizer: A factory ``params -> torch.optim.Optimizer`` to train with instead of
            :class:`~h3optim.H3Optimizer`, e.g. ``lambda p: torch.optim.Adam(p, lr=1e-3)``.
            No H3Optimizer is built then: the factory gets ``params`` as given (parameter
            groups without any key added, so its own ``lr`` and ``weight_decay`` apply where
            a group sets none), ``lr`` does not apply, and H3Optimizer's keyword arguments
            are a ``TypeError``.
        lr_compensation: A sampled epoch takes fewer optimizer steps than an epoch over all
            the data; each of its steps is then scaled by (the full epoch's steps) / (this
            epoch's steps), at most ``MAX_LR_COMPENSATION`` (2), so that the epoch moves the
            weights about as far as a full one and the learning-rate schedule keeps its
            meaning per epoch. Only the step taken is scaled: the optimizer's ``lr``, as
            your LR scheduler reads and sets it, is left as it is (H3Optimizer takes the
            scale as its groups' ``step_scale``; another optimizer's ``lr`` is scaled
            around its ``step`` and restored). It applies to the steps
            :meth:`training_step` takes. ``lr_factor`` is this epoch's scale (1 in uniform
            epochs); each epoch's is logged with it. ``False`` steps at ``lr``.
        flush_denormal: From :meth:`start` to :meth:`finish`, the calling thread and its
            intra-op threads compute subnormal floats (below about 1.2e-38) as zero on the CPU
            (:func:`h3optim.denormals.set_flush_denormal`); :meth:`finish` restores the mode
            the calling thread had. Adam's second moments decay into that range, where a CPU
            takes many times as long per operation (:mod:`h3optim.denormals`). No effect on
            GPU kernels.

    Raises:
        ValueError: An invalid ``mode``, ``total_epochs``, ``window_steps``, ``probe_size``
            or ``learned_ratio``.
        TypeError: H3Optimizer's keyword arguments together with ``optimizer``.

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
        lr: float = 1e-3,
        *,
        total_epochs: int = 10,
        accuracy_tolerance: float = 1.0,
        unbiased: bool = True,
        noise_margin: float | None = 0.5,
        seed: int = 0,
        profile: bool = True,
        profiler: Any = None,
        config: dict[str, Any] | None = None,
        profiler_kwargs: dict[str, Any] | None = None,
        window_steps: int = 50,
        probe_size: int = 512,
        warmup: float = 0.1,
        consolidation: float = 0.15,
        learned_ratio: float | None = LEARNED_RATIO,
        log_per_sample: bool = False,
        optimizer: Callable[[list[Any]], torch.optim.Optimizer] | None = None,
        lr_compensation: bool = True,
        flush_denormal: bool = True,
        **optimizer_kwargs: Any,
    ) -> None:
        if window_steps < 1:
            raise ValueError(f"Invalid window_steps: {window_steps}")
        if probe_size < 1:
            raise ValueError(f"Invalid probe_size: {probe_size}")
        if learned_ratio is not None and not 0.0 < learned_ratio <= 1.0:
            raise ValueError(
                f"Invalid learned_ratio: {learned_ratio} (a fraction of the mean first loss, "
                "in (0, 1], or None to turn the learning floor off)"
            )
        params = list(params)
        self.optimizer: torch.optim.Optimizer
        if optimizer is None:
            self.optimizer, self.controller, self.loss_tracker, self.indexed_dataset = (
                create_controlled_h3(
                    params,
                    dataset,
                    mode=mode,
                    accuracy_tolerance=accuracy_tolerance,
                    total_epochs=total_epochs,
                    lr=lr,
                    warmup=warmup,
                    consolidation=consolidation,
                    accuracy_unit="fraction",  # evaluate_epoch reports fractions
                    **optimizer_kwargs,
                )
            )
        else:
            # no H3Optimizer at all: torch's add_param_group fills a group dict in place with
            # the optimizer's defaults, so the factory would get the user's groups with
            # H3Optimizer's lr and weight_decay set, and its own never applied
            if optimizer_kwargs:
                raise TypeError(
                    f"AutoH3: {sorted(optimizer_kwargs)} are H3Optimizer's arguments, which "
                    "do not apply with optimizer= (a factory): give them to the factory"
                )
            ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
            self.indexed_dataset, self.loss_tracker = ds, LossTracker(len(ds))
            self.controller = EtaController(
                mode,
                accuracy_tolerance,
                total_epochs,
                warmup=warmup,
                consolidation=consolidation,
                accuracy_unit="fraction",
            )
            self.optimizer = optimizer(params)
        self.controller.windowed = True  # windowed A/B from the start (see EtaController)
        self.sampler = InformationWeightedSampler(
            self.indexed_dataset,
            self.loss_tracker,
            seed=seed,
            unbiased=unbiased,
            noise_margin=noise_margin,
        )
        self.window_steps = window_steps
        self.probe_size = probe_size
        self.learned_ratio = learned_ratio
        self.log_per_sample = log_per_sample
        self.lr_compensation = lr_compensation
        self.lr_factor = 1.0  # this epoch's step scale (lr_compensation)
        self._probe_idx: torch.Tensor | None = None  # the probe samples' indices
        self._probe_batch: tuple[torch.Tensor, Any, Any] | None = None  # (indices, x, y)
        # the probe's (data, target) chunks as the user's collate_fn makes them (or the
        # default one, for data not tensor-backed), with the (chunk size, collate) they are for
        self._probe_collated: tuple[tuple[int, Any], list[tuple[Any, Any]]] | None = None
        self._collate: Callable[[list[Any]], Any] | None = None  # get_loader's collate_fn
        self._probe_warned = False  # no finite probe loss: warned once (_probe_mean)
        self._batch_size: int | None = None  # get_loader's: the probe's chunks are twice it
        self._device: torch.device | None = None  # the model's, read at an epoch's first step
        # the model and criterion of the last training step: the learning floor's probe
        self._fitting: tuple[torch.nn.Module, Callable[..., torch.Tensor]] | None = None
        self._windows: _WindowedBatches | None = None
        self._window_step = 0
        self._window_loss: float | None = None
        # the settings the current window's steps trained with: observed only if just one
        self._window_settings: set[_Setting] = set()
        self._j_per_step: float | None = None
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
            "noise_margin": noise_margin,
            "flush_denormal": flush_denormal,  # runs compared in the dashboard say which
            **(config or {}),
        }
        self.profiler_kwargs = dict(profiler_kwargs or {})
        self._saved_run_id: str | None = None  # the daemon run of a loaded state
        self.epoch = 0
        self.phase = "warmup"
        self.samples_backpropagated = 0
        self.samples_skipped = 0  # drawn at weight 0 and left out of their epochs
        self._epoch_samples = self._epoch_steps = 0
        self._energy_at_epoch_start: float | None = None
        self.flush_denormal = flush_denormal
        self._flushing = contextlib.ExitStack()  # start()'s flush-to-zero, undone by finish()
        self._started = False
        self._world = 1  # torch.distributed ranks, read by start()

    def start(self) -> AutoH3:
        """Open the profiled run (if profiling) and wire the controller to its live η."""
        if self._started:
            return self
        if self.profiler is None and self.profile:
            self.profiler = self._open_profiler()
        if self.profiler is not None and self.controller.eta_source is None:
            self.controller.eta_source = self.profiler.live_eta
        if self.flush_denormal:  # until finish() closes it
            self._flushing.enter_context(flushing_denormals())
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self._world > 1 and self.controller.window_state == "testing":
            self.controller.hold(
                f"off under torch.distributed ({self._world} ranks): a decision inside an "
                "epoch would have to reach every rank at the same step"
            )
        self._started = True
        return self

    def _open_profiler(self) -> Any:
        """The ``H3Profiler`` of the run: the daemon run of a loaded state
        (:meth:`load_state_dict`) when it takes data, else a new one."""
        from h3client import Client, H3ClientError, H3Profiler  # the composition layer's

        kwargs = self.profiler_kwargs

        def profiler(**overrides: Any) -> Any:
            return H3Profiler(
                self.name,
                config=self.config,
                n_train=len(self.indexed_dataset),
                **{**kwargs, **overrides},
            )

        saved = self._saved_run_id
        if saved is None or kwargs.get("run_id") != saved:
            return profiler()
        # A run its client ended (finish(), or the exit of a process that died of an
        # exception) takes no more data: the resumed part goes to a new run instead.
        try:
            prof = profiler()
        except H3ClientError as exc:  # no daemon, and no spool to say where the run stopped
            why = str(exc)
        else:
            status = None
            if prof.flush(10.0):  # its create reached the daemon, which reopens a run it failed
                with (
                    contextlib.suppress(H3ClientError),
                    Client(
                        kwargs.get("url"),
                        kwargs.get("token"),
                        data_dir=kwargs.get("data_dir"),
                        http=kwargs.get("http"),
                    ) as client,
                ):
                    status = client.get_run(saved).get("status")
            if status in (None, "running"):
                return prof
            prof.stop(timeout_s=10.0, report=False)
            why = f"it is {status}: a run its client ended takes no more data"
        warnings.warn(
            f"AutoH3: the saved daemon run {saved} cannot be resumed ({why}); this run streams "
            "to a new one",
            UserWarning,
            stacklevel=4,
        )
        return profiler(run_id=None)

    def get_loader(self, batch_size: int = 64, **loader_kwargs: Any) -> DataLoader[Any]:
        """This epoch's loader of ``(data, target, index)`` batches, sampled as the controller
        says. A tensor-backed dataset is fetched a batch at a time (see
        :func:`~h3optim.batch_loader`); while the controller's windowed A/B test runs, windows
        of ``window_steps`` batches alternate between its two settings.

        ``loader_kwargs`` go to the ``DataLoader`` (``num_workers``, ``pin_memory``, ...);
        ``drop_last=True`` leaves out a last batch smaller than ``batch_size``, in windowed
        epochs too. A ``collate_fn`` makes each batch from its ``(data, target, index)``
        items, once (fetched per sample, tensor data too), and each chunk of the probe
        samples as well. With workers the loader reads batches ahead of the training loop:
        each batch still trains with its own draw's weights and window (see
        ``_WindowedBatches``).

        Raises:
            ValueError: ``batch_size`` is below 1.
        """
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        self.start()
        drop_last = bool(loader_kwargs.pop("drop_last", False))
        # the user's collate_fn makes batches of items: applied once per batch by AutoH3
        # (windowed epochs and the probe collate items themselves), never by the loader too
        collate = self._collate = loader_kwargs.pop("collate_fn", None)
        self._batch_size = batch_size
        self._device = None
        # a controller state loaded on its own (not through load_state_dict) carries the
        # epoch: the run goes on there, not at epoch 0's draws with a later epoch's phase
        self.epoch = self.controller.epoch
        unlearned, train_loss = self._probe_figures()  # every rank: a DDP forward is collective
        if unlearned is not None and self._labels_look_noisy():
            unlearned = None  # the floor would keep the mislabeled samples not flagged yet
        if self._world > 1:
            # rank 0's controller decides for all: the ranks' held-out figures and energy
            # readings differ, and every rank must draw the same epoch to shard it
            shared: list[Any] = [self.controller.state_dict(), unlearned, train_loss]
            dist.broadcast_object_list(shared, src=0)
            self.controller.load_state_dict(shared[0])
            unlearned, train_loss = shared[1], shared[2]
        self.controller.warn_past_plan(stacklevel=3, who="AutoH3")  # once, at the user's call
        keep, mix, self.phase = self.controller.control_step(unlearned, train_loss)
        self.sampler.set_fractions(keep, mix)
        self.sampler.set_epoch(self.epoch)
        self._epoch_samples = self._epoch_steps = 0
        self._energy_at_epoch_start = self._energy()
        self._windows = None
        self.controller.plan_windows(self._windows_ahead(batch_size))  # may end the test
        if self.controller.window_testing and self._window_loss is None and train_loss is not None:
            self._window_loss = train_loss  # the first window's start: measured just now
        loader = self._epoch_loader(batch_size, drop_last, collate, loader_kwargs)
        self._compensate(len(loader), batch_size, drop_last)
        return loader

    def _epoch_loader(
        self,
        batch_size: int,
        drop_last: bool,
        collate: Callable[[list[Any]], Any] | None,
        loader_kwargs: dict[str, Any],
    ) -> DataLoader[Any]:
        """The epoch's loader, the sampler set for it: windowed while the A/B test runs."""
        if self.controller.window_testing:
            self._windows = _WindowedBatches(
                self.controller,
                self.sampler,
                batch_size,
                self.window_steps,
                self._window_step,
                drop_last=drop_last,
            )
            self.samples_skipped += self._windows.skipped
            if collate is None and is_batchable(self.indexed_dataset):
                return DataLoader(  # drop_last: the windowed sampler gives only full batches
                    self.indexed_dataset, sampler=self._windows, batch_size=None, **loader_kwargs
                )
            return DataLoader(  # _Items collates each batch: the loader passes it on as is
                _Items(self.indexed_dataset, collate or default_collate),
                sampler=self._windows,
                batch_size=None,
                collate_fn=_as_is,
                **loader_kwargs,
            )
        share, skipped = _weighted(self.sampler, self.sampler.epoch_indices(), self.sampler.weights)
        self.samples_skipped += skipped
        if collate is not None:  # batches of items: batch_loader would hand it a fetched batch
            return DataLoader(
                self.indexed_dataset,
                batch_size=batch_size,
                sampler=_Drawn(share),
                drop_last=drop_last,
                collate_fn=collate,
                **loader_kwargs,
            )
        return batch_loader(
            self.indexed_dataset, _Drawn(share), batch_size, drop_last=drop_last, **loader_kwargs
        )

    def _compensate(self, steps: int, batch_size: int, drop_last: bool) -> None:
        """Sets this epoch's step scale (``lr_compensation``): a full epoch's steps on this
        rank over the ``steps`` of this one, between 1 and ``MAX_LR_COMPENSATION``."""
        factor = 1.0
        if self.lr_compensation:
            n = math.ceil(len(self.indexed_dataset) / self._world)
            full = n // batch_size if drop_last else math.ceil(n / batch_size)
            factor = compensation_factor(full, steps)
        self.lr_factor = factor

    def _step(self, closure: Callable[[], torch.Tensor]) -> Any:
        """The optimizer's step at ``lr_factor`` × its ``lr``, the scale undone after it, so
        a scheduler never sees it: H3Optimizer takes it as its groups' ``step_scale``;
        another optimizer gets each group's ``lr`` scaled for the step, then restored (or,
        if the step set a new one, that one unscaled)."""
        factor = self.lr_factor
        # torch types the closure as returning float; every torch optimizer takes a tensor
        if factor == 1.0:
            return self.optimizer.step(closure)  # type: ignore[arg-type]
        groups = self.optimizer.param_groups
        if isinstance(self.optimizer, H3Optimizer):  # its step scales itself
            own = [group.get("step_scale", 1.0) for group in groups]
            for group, scale in zip(groups, own, strict=True):
                group["step_scale"] = scale * factor
            try:
                return self.optimizer.step(closure)
            finally:
                for group, scale in zip(groups, own, strict=True):
                    group["step_scale"] = scale
        before = [group["lr"] for group in groups]
        scaled = [lr * factor for lr in before]
        for group, lr in zip(groups, scaled, strict=True):
            group["lr"] = lr
        try:
            return self.optimizer.step(closure)  # type: ignore[arg-type]
        finally:
            for group, lr, mine in zip(groups, before, scaled, strict=True):
                group["lr"] = lr if group["lr"] is mine else group["lr"] / factor

    def _windows_ahead(self, batch_size: int) -> int:
        """Windows of ``window_steps`` that the thermodynamic epochs from this one on hold,
        at this epoch's steps per epoch."""
        schedule = self.controller.schedule
        epochs = sum(
            schedule.phase(e) == "thermodynamic" for e in range(self.epoch, self.total_epochs)
        )
        steps = math.ceil(len(self.sampler) / batch_size)
        return epochs * steps // self.window_steps

    def _probe_figures(self) -> tuple[float | None, float | None]:
        """For a thermodynamic epoch (Nones otherwise): the learning floor's share of
        training samples not learned yet (None with the floor off), and the probe samples'
        mean loss (the controller's starvation guard tells overfitting by it).

        Both from the probe samples' losses under the model as it is now once a step has
        run (a tracked loss is as old as its sample's last sighting: after a first epoch,
        the early batches' losses are those of a model that had barely trained and would
        hold the floor up); before any step, the share by the tracked losses."""
        if self.controller.schedule.phase(self.epoch) != "thermodynamic":
            return None, None
        if self._fitting is None:
            if self.learned_ratio is None:
                return None, None
            return self.loss_tracker.unlearned_fraction(self.learned_ratio), None
        idx, losses = self._probe_losses(*self._fitting)
        unlearned = (
            self.loss_tracker.unlearned_fraction(self.learned_ratio, idx, losses)
            if self.learned_ratio is not None
            else None
        )
        return unlearned, self._probe_mean(losses)

    def _labels_look_noisy(self) -> bool:
        """Whether the sampler's noise margin takes some seen samples for mislabeled (see
        :meth:`~h3optim.InformationWeightedSampler.likely_mislabeled`): the learning floor
        then stands down for the epoch. Its share of samples not learned yet counts the
        mislabeled ones the margin has not flagged yet, which no epoch should keep for
        their own sake (measured: docs/benchmarks.md, "The learning floor stands down once
        labels look noisy"). The first such epoch is a controller decision, so the report
        says so."""
        flagged = self.sampler.likely_mislabeled()
        if not bool(flagged.any()):
            return False
        if not any(d["change"] == "learning floor off" for d in self.controller.decisions):
            seen = max(1, int(self.loss_tracker.seen.sum()))
            self.controller.decide(
                "learning floor off",
                f"{int(flagged.sum()) / seen:.1%} of the seen samples' losses rose more than "
                f"{self.sampler.noise_margin:g} above their first (likely mislabeled): the "
                "share not learned yet counts such samples, so it no longer raises keep_frac",
            )
        return True

    def _probe_losses(
        self, model: torch.nn.Module, criterion: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, per-sample losses) of the fixed probe subset of the training data, one
        pass without gradient in eval mode (each module then left in its mode), in chunks
        (see ``probe_size``)."""
        idx = self._probe_indices()
        device = _device_of(model)
        n = idx.numel()
        # in chunks of twice the training batch: a forward without gradient keeps about two
        # layers' activations where training keeps every layer's, so this fits wherever the
        # training step does (512 samples at once might not, on a GPU)
        chunk = 2 * self._batch_size if self._batch_size else n
        parts = []
        with evaluating(model), torch.no_grad():
            for start, (xs, ys) in zip(range(0, n, chunk), self._probe_parts(chunk), strict=True):
                if device is not None:  # the model where the training loop put it (a GPU)
                    xs = _moved(xs, device)
                out = model(xs)
                target = _moved(ys, out.device) if isinstance(out, torch.Tensor) else ys
                parts.append(_per_sample(criterion, out, target, min(chunk, n - start)))
        return idx, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _probe_indices(self) -> torch.Tensor:
        """The fixed probe subset: ``probe_size`` training samples drawn once, by the seed."""
        if self._probe_idx is None:
            n = len(self.indexed_dataset)
            g = torch.Generator().manual_seed(self.sampler.seed + 7919)
            self._probe_idx = torch.randperm(n, generator=g)[: min(self.probe_size, n)]
        return self._probe_idx

    def _probe_parts(self, chunk: int) -> list[tuple[Any, Any]]:
        """The probe samples' ``(data, target)`` in chunks of ``chunk``, fetched once.

        Tensor data are fetched in one indexing operation and sliced. Other data, or any
        data given a ``collate_fn``, are collated a chunk at a time by that function (the
        default one without): each chunk is a batch as the training loop gets it (padded to
        its own longest sequence, say), whatever the function returns besides tensors."""
        idx = self._probe_indices()
        n = idx.numel()
        collate = self._collate
        if collate is None and is_batchable(self.indexed_dataset):
            if self._probe_batch is None:
                x, y, _ = self.indexed_dataset[idx]
                self._probe_batch = (idx, x, y)
            _, x, y = self._probe_batch
            return [
                (_rows(x, start, start + chunk), _rows(y, start, start + chunk))
                for start in range(0, n, chunk)
            ]
        key = (chunk, collate)
        if self._probe_collated is None or self._probe_collated[0] != key:
            fn = collate or default_collate
            parts = []
            for start in range(0, n, chunk):
                batch = fn([self.indexed_dataset[int(i)] for i in idx[start : start + chunk]])
                parts.append((batch[0], batch[1]))  # (data, target, index): the loop's unpacking
            self._probe_collated = (key, parts)
        return self._probe_collated[1]

    def _probe_loss(self, model: torch.nn.Module, criterion: Callable[..., torch.Tensor]) -> float:
        """Mean loss on the fixed probe subset of the training data (no gradient; see
        :meth:`_probe_mean`)."""
        return self._probe_mean(self._probe_losses(model, criterion)[1])

    def _probe_mean(self, losses: torch.Tensor) -> float:
        """The mean of the probe samples' finite ``losses``. One corrupt probe sample (a NaN
        input) would otherwise make every probe mean NaN: no window η would ever be observed
        and the starvation guard would lose its training loss. NaN if none is finite, with
        a warning the first time."""
        mean = float(losses.mean())  # the common case: one host sync
        if math.isfinite(mean):
            return mean
        finite = losses[torch.isfinite(losses)]
        if finite.numel():
            return float(finite.mean())
        if not self._probe_warned:
            self._probe_warned = True
            warnings.warn(
                f"AutoH3: none of the {losses.numel()} probe samples has a finite loss: "
                "windows are not observed, and the starvation guard has no training loss, "
                "until some do (are the model's parameters or the inputs NaN?)",
                RuntimeWarning,
                stacklevel=3,
            )
        return math.nan

    def _window_tick(
        self,
        model: torch.nn.Module,
        criterion: Callable[..., torch.Tensor],
        setting: _Setting,
    ) -> None:
        """After a step in a windowed epoch (trained with ``setting``): at a window's end,
        its η to the controller, if every step of the window trained with the setting the
        controller expects (``window_setting()``: it attributes the η to that)."""
        self._window_step += 1
        self._window_settings.add(setting)
        if self._window_step < self.window_steps:
            return
        if self._windows is not None:
            self._windows.end_window()
        settings, self._window_settings = self._window_settings, set()
        trained = settings.pop() if len(settings) == 1 else None
        now = self._probe_loss(model, criterion)
        if (
            trained is not None
            and trained[0] is not None
            and trained == self.controller.window_setting()
            and self._window_loss is not None
            and self.controller.window_testing
        ):
            # energy: the measured J per step of the last epoch (the daemon's window is
            # coarser than 50 steps); A and B windows have the same steps and batch size
            joules = self.window_steps * (self._j_per_step or 1.0)
            self.controller.observe_window((self._window_loss - now) / LN2 / joules)
        self._window_step, self._window_loss = 0, now

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
        indices: Any = None,
    ) -> torch.Tensor:
        """Forward, per-sample losses, (re-weighted) backward, step.

        ``indices`` are the batch's dataset indices, as :meth:`get_loader`'s batches carry
        them. Without them (``None``, as ``h3-optimizer`` 0.2.0 allowed for a loader of
        ``(data, target)``) the batch trains on its plain mean loss: no loss is tracked, no
        weight applied, and no window test counts it; ``len(target)`` is its size.

        Returns the batch's (weighted) mean loss as a detached 0-dim tensor on the model's
        device: ``float()`` it when a number is needed (on a GPU that waits for the step,
        which is why the step itself does not).

        A model in eval mode (after the caller's own evaluation, say) is put back in train
        mode, as the Hugging Face Trainer's ``training_step`` does; modules put in eval mode
        inside a model in train mode (frozen batch-norm statistics) stay so.

        The first step starts the run (:meth:`start`) if :meth:`get_loader` has not: a loop
        over the caller's own loader, as ``h3-optimizer`` 0.2.0's ``AutoH3`` example trains,
        streams its batches to the profiler too.

        Raises:
            ValueError: ``criterion`` cannot give one loss per sample (it must accept
                ``reduction="none"`` or have a ``reduction`` attribute, as torch's losses do).
        """
        if not self._started:  # a loop over the caller's own loader: no get_loader yet
            self.start()
        if not model.training:  # a flag read: a walk over every module only when it is set
            model.train()
        device = self._device
        if device is None:  # once an epoch: where the training loop put the model
            device = self._device = _device_of(model) or _CPU
        if device.type != "cpu":  # the loader's CPU batches to a GPU (no-ops if already there)
            data, target = _moved(data, device), _moved(target, device)
        idx = None if indices is None else torch.as_tensor(indices)
        n = len(target) if idx is None else len(idx)
        windows = self._windows if idx is not None else None
        if windows is not None and self._window_loss is None and self.controller.window_testing:
            self._window_loss = self._probe_loss(model, criterion)  # the first window's start
        handed = None
        if windows is not None and idx is not None:  # the batch's own draw and window
            handed = windows.take(idx)
            if handed is None:  # not a batch of this epoch's loader: A's weights, untested
                k, u, _, a_weights = windows.draws["A"]
                handed = _Handed(idx, (None, k, u), a_weights)
        weights = None
        if self.sampler.unbiased and idx is not None:
            weights = (
                take_rows(handed.weights, idx) if handed is not None else self.sampler.weights(idx)
            )
        self._fitting = (model, criterion)
        seen: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            losses = _per_sample(criterion, model(data), target, n)
            seen.setdefault("losses", losses.detach())
            loss = weighted_mean(losses, weights) if weights is not None else losses.mean()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        loss = self._step(closure)
        losses = seen["losses"]
        if idx is not None:
            self.loss_tracker.update(idx, losses)
        self.samples_backpropagated += n
        self._epoch_samples += n
        self._epoch_steps += 1
        if self.profiler is not None:
            mean = losses.mean()
            if self.log_per_sample and idx is not None:
                self.profiler.log_batch(
                    mean, losses=losses, indices=idx, epoch=self.epoch, phase=self.phase
                )
            else:
                self.profiler.log_batch(mean, epoch=self.epoch, phase=self.phase)
        if handed is not None and self.controller.window_testing:
            self._window_tick(model, criterion, handed.setting)
        if isinstance(loss, torch.Tensor):
            return loss.detach()
        return torch.tensor(float(loss)) if loss is not None else losses.mean()

    @torch.no_grad()
    def evaluate_epoch(
        self,
        model: torch.nn.Module,
        test_loader: Iterable[Any],
        device: Any = None,
        *,
        criterion: Callable[..., torch.Tensor] | None = None,
    ) -> float | None:
        """The held-out loss and accuracy; both feed the controller (its η is the held-out
        loss's drop per joule) and the profiler (``val_loss``, ``accuracy``).

        ``test_loader`` yields ``(data, target, ...)`` batches; they are moved to the model's
        device, and the sums stay there until the end (one host sync per evaluation). The
        model is evaluated in eval mode and left in the mode it was in.

        Args:
            model: The model being trained.
            test_loader: The held-out batches.
            device: Accepted for ``h3-optimizer`` 0.2.0's calls
                (``evaluate_epoch(model, loader, device)``) and not used: the batches go
                to the model's device.
            criterion: The held-out loss's criterion (the mean of its per-sample losses);
                by default the one the last :meth:`training_step` trained with
                (cross-entropy before any).

        Returns:
            The accuracy (a fraction) when the targets are class indices (an integer (N,)
            tensor for (N, C) outputs); otherwise None (a regression, say: only the loss).
        """
        if criterion is None:
            fitting = self._fitting
            criterion = fitting[1] if fitting is not None else torch.nn.functional.cross_entropy
        device = _device_of(model)
        total = 0
        loss_sum: torch.Tensor | None = None
        correct: torch.Tensor | None = None
        classify = True  # every batch's targets are class indices
        with evaluating(model), torch.no_grad():  # no autograd graph for an evaluation
            for batch in test_loader:
                data, target = batch[0], batch[1]
                if device is not None:  # a CPU loader's batches for a model on a GPU
                    data, target = _moved(data, device), _moved(target, device)
                out = model(data)
                n = len(target)
                batch_loss = _loss_sum(criterion, out, target, n)
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                classify = classify and _class_indices(out, target)
                if classify:
                    batch_correct = (out.argmax(1) == target).sum()
                    correct = batch_correct if correct is None else correct + batch_correct
                total += n
        acc = (int(correct) / total if correct is not None and total else 0.0) if classify else None
        held_out = float(loss_sum) / total if loss_sum is not None and total else math.nan
        end = self._energy()
        energy = (
            (end - self._energy_at_epoch_start)
            if end is not None and self._energy_at_epoch_start is not None
            else None
        )
        k, u, _phase = self.controller._current
        if energy is not None and energy > 0 and self._epoch_steps > 0:
            self._j_per_step = energy / self._epoch_steps
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
                lr_factor=self.lr_factor,
            )
        self.epoch += 1
        return acc

    def finish(self) -> dict[str, Any]:
        """Stop the run; results from the daemon plus what the controller did."""
        results: dict[str, Any] = {}
        self._flushing.close()  # the flush-to-zero mode as start() found it
        if self.profiler is not None:
            results.update(self.profiler.stop())
        results.update(
            samples_backpropagated=self.samples_backpropagated,
            samples_skipped=self.samples_skipped,
            controller_report=self.controller.get_report(),
            controller_decisions=list(self.controller.decisions),
            skipped_steps=getattr(self.optimizer, "skipped_steps", 0),
            final_keep_frac=self.controller.keep_frac,
            final_uniform_mix=self.controller.uniform_mix,
            # samples whose loss rose past noise_margin: weight 0 in the unbiased draws
            likely_mislabeled=int(self.sampler.likely_mislabeled().sum())
            if self.sampler.unbiased
            else 0,
            # of the parameters and the optimizer's state: what the CPU would compute slowly
            # without flush_denormal (see h3optim.denormals)
            subnormal_share=subnormal_share(self.optimizer),
        )
        return results

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs that is not the model's: the state dicts of the
        optimizer, the loss tracker, the sampler and the controller, the epoch, the window
        counters, the sample counters and the profiler's ``run_id`` (None without one): a
        resumed AutoH3 that builds its profiler continues that daemon run.

        Take it between epochs (after :meth:`evaluate_epoch`, before the next
        :meth:`get_loader`), beside ``model.state_dict()``. Plain containers, numbers,
        strings and tensors: ``torch.save`` stores it and ``torch.load`` (``weights_only=True``,
        its default) reads it back. The optimizer's part holds its live tensors, as
        ``Optimizer.state_dict()`` does; the rest is a copy.

        Example:
            >>> torch.save({"model": model.state_dict(), "auto": auto.state_dict()}, path)  # doctest: +SKIP
        """
        return {
            "epoch": self.epoch,
            "phase": self.phase,
            "samples_backpropagated": self.samples_backpropagated,
            "samples_skipped": self.samples_skipped,
            # the window under way: its steps trained so far, its start's probe loss and the
            # settings its steps trained with (a list: a set does not load weights-only)
            "window_step": self._window_step,
            "window_loss": self._window_loss,
            "window_settings": sorted(self._window_settings, key=repr),
            "j_per_step": self._j_per_step,
            # whether a step had run: the learning floor then judges by the probe
            "fitted": self._fitting is not None,
            "optimizer": self.optimizer.state_dict(),
            "loss_tracker": self.loss_tracker.state_dict(),
            "sampler": self.sampler.state_dict(),
            "controller": self.controller.state_dict(),
            # the daemon run: a resumed AutoH3 streams on into it, not into a second run
            "run_id": self._run_id(),
        }

    def _run_id(self) -> str | None:
        """The profiler's daemon run id (None without a profiler, or one without an id)."""
        run_id = getattr(self.profiler, "run_id", None)
        return run_id if isinstance(run_id, str) else None

    def load_state_dict(
        self,
        state: dict[str, Any],
        *,
        model: torch.nn.Module | None = None,
        criterion: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        """Resume from ``state`` (from :meth:`state_dict`) in an AutoH3 built with the same
        arguments over the same dataset, before its first :meth:`get_loader`: the run goes
        on at the saved epoch with the draws, windows and decisions it would have had
        without the break (the model's own state is the caller's to load). An AutoH3 that
        builds its profiler (``profile=True``, no ``profiler=``) resumes the saved daemon
        run (``H3Profiler(run_id=...)``; a ``run_id`` in ``profiler_kwargs`` takes
        precedence), so the daemon holds one run with every epoch and its whole energy. A
        run its client ended (``finish()``, or a process that died of an exception) takes
        no more data: the resumed part then streams to a new run, with a warning.

        Args:
            state: From :meth:`state_dict`.
            model: The model being trained (its state loaded). The learning floor and the
                windowed test's training loss judge the probe samples by the model as it is
                at an epoch's start, the model of the last training step; without it the
                first resumed epoch judges the floor by the tracked losses, as a run's
                first thermodynamic epoch before any step does.
            criterion: The criterion the run trains with (cross-entropy if None), for the
                same probe.

        Raises:
            ValueError: The state is for a dataset of another size (from the tracker).
        """
        self.loss_tracker.load_state_dict(state["loss_tracker"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.controller.load_state_dict(state["controller"])
        self.epoch = int(state["epoch"])
        self.phase = str(state["phase"])
        self.samples_backpropagated = int(state["samples_backpropagated"])
        self.samples_skipped = int(state["samples_skipped"])
        self._window_step = int(state["window_step"])
        self._window_loss = state["window_loss"]
        self._window_settings = {
            (label, float(k), float(u)) for label, k, u in state["window_settings"]
        }
        self._j_per_step = state["j_per_step"]
        run_id = state.get("run_id")  # None in states saved before it was kept
        if run_id is not None and self.profile and self.profiler is None:
            self._saved_run_id = str(run_id)
            self.profiler_kwargs.setdefault("run_id", self._saved_run_id)
        if state["fitted"] and model is not None:
            self._fitting = (model, criterion or torch.nn.functional.cross_entropy)


def _as_is(batch: Any) -> Any:
    """A loader's ``collate_fn`` for batches collated already (:class:`_Items`)."""
    return batch


class _Items(Dataset[Any]):
    """Per-sample fetching for a windowed epoch over a dataset that is not tensor-backed, or
    given a ``collate_fn``: a batch of indices is fetched item by item and collated by
    ``collate`` (the loader over it must not collate again: :func:`_as_is`)."""

    def __init__(self, dataset: Dataset[Any], collate: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: torch.Tensor) -> Any:
        return self.collate([self.dataset[int(i)] for i in index])
