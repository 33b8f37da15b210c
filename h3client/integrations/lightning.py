"""Lightning 2.x: ``Trainer(callbacks=[H3Callback()])`` profiles a fit with H3.

Works with ``import lightning`` and with ``import pytorch_lightning``: the callback's base
class comes from the package the program already imported (``lightning`` when neither was).

What it records, per rank (every rank of a DDP run joins one run):

- each training batch's loss: ``training_step``'s loss (the returned tensor, or its
  ``"loss"`` key), un-scaled from gradient accumulation, labelled with the optimizer step
  it contributes to (with ``accumulate_grad_batches=3``, batches 0-2 are step 1);
- per-sample losses when ``training_step`` returns them as ``"losses"`` (a 1-D tensor, not
  reduced), with their dataset indices as ``"indices"`` when it has them::

      def training_step(self, batch, batch_idx):
          x, y, idx = batch
          losses = F.cross_entropy(self(x), y, reduction="none")
          return {"loss": losses.mean(), "losses": losses.detach(), "indices": idx}

- once per training epoch, the epoch's logged metrics (``self.log(...)``, validation's
  included): ``val_loss`` goes to the epoch's ``val_loss``, the first of ``val_acc``,
  ``val_accuracy``, ``accuracy`` that was logged to its ``accuracy`` (the others stay
  under ``metrics``), everything else under ``metrics``. Validation figures go only with
  the epoch whose validation produced them: an epoch without a validation run (e.g.
  ``check_val_every_n_epoch=2``) has none. Once a validation run (the sanity check's
  included) has logged ``val_acc`` or ``val_accuracy``, a training-logged ``accuracy`` is
  never the epoch's accuracy, also on epochs without validation. A logged name that
  ``log_epoch`` reserves (``epoch``, ``phase``, or ``accuracy`` when another key supplied
  the accuracy) is kept as ``user_<name>`` under ``metrics``, with a one-time warning.
  Under DDP the epochs are logged by the global-zero rank only, with its figures: log
  epoch metrics with ``sync_dist=True`` to get the figures of every rank's shard.

The run opens in ``on_fit_start`` and closes in ``on_fit_end``; an exception during the
fit closes it as failed. The results (energy, bits/J, per epoch) are then in
``callback.results``, logged to the trainer's loggers as ``h3/...`` metrics
(``h3/partial_...`` when the results are partial: other ranks were still running), and the
report is ``callback.profiler.get_report()``. Under a strategy that runs the fit in processes
Lightning starts (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``), that is so only in the
callback's copies in those processes: in the calling process both stay None, and the run is
read from the daemon (docs/lightning.md).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from h3client.integrations._common import open_profiler
from h3client.profiler import H3Profiler

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Base = Any
elif "pytorch_lightning" in sys.modules and "lightning" not in sys.modules:
    from pytorch_lightning import Callback as _Base
else:
    try:
        from lightning.pytorch import Callback as _Base
    except ImportError:  # only the standalone package is installed
        from pytorch_lightning import Callback as _Base

_ACCURACY_KEYS = ("val_acc", "val_accuracy", "accuracy")
_VAL_ACCURACY_KEYS = frozenset(_ACCURACY_KEYS[:2])
# names log_epoch takes itself: a logged metric by one of these is renamed
_RESERVED = frozenset({"self", "epoch", "accuracy", "phase"})


def _scalar(v: Any) -> float | None:
    if hasattr(v, "numel"):
        return float(v.item()) if v.numel() == 1 else None
    return float(v) if isinstance(v, (int, float)) else None


class H3Callback(_Base):  # type: ignore[misc]
    """A Lightning ``Callback`` that streams the fit to h3d through :class:`H3Profiler`.

    Args:
        **profiler_kwargs: Passed to :class:`h3client.H3Profiler` (``name``, ``url``,
            ``config``, ``tags``, ``n_train``, ...). The rank and world size come from the
            trainer.

    Example:
        >>> from h3client.integrations.lightning import H3Callback  # doctest: +SKIP
        >>> h3 = H3Callback(name="mnist-lit", n_train=50_000)  # doctest: +SKIP
        >>> Trainer(max_epochs=3, callbacks=[h3]).fit(model, loader)  # doctest: +SKIP
        >>> h3.results["efficiency_bits_per_j"]  # doctest: +SKIP
    """

    def __init__(self, **profiler_kwargs: Any) -> None:
        super().__init__()
        self.profiler_kwargs = profiler_kwargs
        self.profiler: H3Profiler | None = None
        self.results: dict[str, Any] | None = None
        self._val_keys: set[str] = set()  # names any validation run produced
        self._val_metrics: dict[str, float] = {}  # this epoch's validation figures
        self._step = 0  # the optimizer step the current batch contributes to
        self._val_before: dict[str, Any] = {}
        self._warned: set[str] = set()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.profiler = open_profiler(
            self.profiler_kwargs, rank=trainer.global_rank, world_size=trainer.world_size
        )
        self.results = None
        self._val_keys, self._val_metrics, self._val_before = set(), {}, {}

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_before = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.profiler is None:
            return
        # the figures this validation run produced: Lightning stores a fresh value for
        # each name logged in it, the others are left from earlier
        before, self._val_before = self._val_before, {}
        for key, value in trainer.callback_metrics.items():
            if before.get(key) is value:
                continue
            self._val_keys.add(str(key))
            v = _scalar(value)
            # the sanity check's names tell which keys validation supplies (a training
            # `accuracy` is then not the epoch's accuracy from the first epoch on); its
            # figures belong to no epoch
            if v is not None and not trainer.sanity_checking:
                self._val_metrics[str(key)] = v

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        # The step this batch contributes to. Read at the batch's end, global_step has
        # moved on only on the batch that stepped, so with accumulate_grad_batches the
        # earlier micro-batches of step s would carry s - 1.
        self._step = trainer.global_step + 1

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        prof = self.profiler
        if prof is None or outputs is None:
            return
        extra: dict[str, Any] = {}
        if isinstance(outputs, dict):
            loss = outputs.get("loss")
            extra = {"losses": outputs.get("losses"), "indices": outputs.get("indices")}
        else:
            loss = outputs
        if loss is None:
            return
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it
        prof.log_batch(loss, epoch=trainer.current_epoch, step=self._step, **extra)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        prof = self.profiler
        val_metrics, self._val_metrics = self._val_metrics, {}
        # Under DDP each rank validates its own shard and holds its own figures unless they
        # were logged with sync_dist=True; the daemon would keep whichever rank's epoch came
        # first. Rank 0's are kept, as a torchrun script does; every rank's batches still
        # carry their epoch.
        if prof is None or not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {}
        for key, value in trainer.callback_metrics.items():
            if str(key) in self._val_keys:
                continue  # validation's: only those of this epoch's run, below
            v = _scalar(value)
            if v is not None:
                metrics[str(key)] = v
        metrics.update(val_metrics)
        # Once validation supplies the accuracy, a training-logged `accuracy` never is the
        # epoch's accuracy, also on an epoch without validation: one column, one meaning.
        from_val = bool(self._val_keys & _VAL_ACCURACY_KEYS)
        accuracy = next(
            (
                metrics.pop(k)
                for k in _ACCURACY_KEYS
                if k in metrics and (k in self._val_keys or not from_val)
            ),
            None,
        )
        for key in sorted(_RESERVED & metrics.keys()):
            new = f"user_{key}"
            while new in metrics:
                new = f"user_{new}"
            metrics[new] = metrics.pop(key)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "h3: the logged metric %r is stored as %r (log_epoch reserves the name)",
                    key,
                    new,
                )
        prof.log_epoch(trainer.current_epoch, accuracy=accuracy, **metrics)

    def _finish(self, trainer: Any, status: str) -> None:
        prof = self.profiler
        if prof is None or self.results is not None:
            return
        self.results = prof.stop(status=status)
        # Figures of a distributed run whose other ranks were still running when this one
        # stopped change once they end: they go to the loggers as h3/partial_*, never
        # under the final names.
        partial = bool(self.results.get("partial"))
        prefix = "h3/partial_" if partial else "h3/"
        scalars = {
            f"{prefix}{k}": float(v)
            for k, v in self.results.items()
            if k in ("total_energy_j", "info_gain_bits", "efficiency_bits_per_j")
            and isinstance(v, (int, float))
        }
        if scalars:
            for lg in getattr(trainer, "loggers", ()):
                lg.log_metrics(scalars, step=trainer.global_step)
        if partial:
            logger.warning(
                "h3: run %s was still running (other ranks) when this rank stopped: the "
                "figures logged as h3/partial_* are partial; the daemon has the final ones "
                "once every rank ends",
                prof.run_id,
            )
        logger.info("h3: run %s %s: %s", prof.run_id, status, scalars or "no energy figures")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, "finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, "failed")
