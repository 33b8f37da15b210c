"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[H3Callback()])`` profiles training.

What it records, per rank (every process of a distributed ``Trainer`` joins one run):

- **the loss of every optimizer step**: the ``Trainer`` hands callbacks only the loss
  averaged over ``logging_steps``, so the callback reads the model's own output instead: a
  forward hook takes ``outputs.loss`` of each training forward (no device sync; a model
  that returns a loss when given ``labels``, as every ``...ForXxx`` head does), and each
  step logs the loss the ``Trainer`` itself logs for it: the sum of its micro-batch losses
  when the model was given ``num_items_in_batch`` (each micro-batch's loss is then already
  divided by the whole accumulated batch's item count; times the world size when
  ``average_tokens_across_devices`` counts the items of every rank), their mean otherwise.
  A model that returns no loss (a custom ``compute_loss``) falls back to the logged loss:
  set ``logging_steps=1`` to get every step that way. ``every_step=False`` always uses
  the logged loss.
- each epoch's evaluation: ``eval_loss`` as the epoch's ``val_loss``, ``eval_accuracy``
  as its ``accuracy``, the other ``eval_*`` figures under ``metrics``. With
  ``eval_strategy="steps"`` the epoch gets the figures of the last evaluation run during
  it (an epoch without one gets none). Without evaluation the epoch is still recorded
  (its time ends its energy window). A run resumed mid-epoch labels its batches with the
  epoch they belong to (``int(state.epoch)``) and stores that epoch when it ends.

The run opens in ``on_train_begin`` and finishes in ``on_train_end``; the results are then
in ``callback.results`` and appended to ``trainer.state.log_history`` as ``h3_*`` keys.
The ``Trainer`` has no exception hook: an uncaught exception marks the run failed at
interpreter exit; code that catches it calls ``callback.stop("failed")``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from h3client.integrations._common import open_profiler
from h3client.profiler import H3Profiler

if TYPE_CHECKING:
    _Base = Any
else:
    from transformers import TrainerCallback as _Base

logger = logging.getLogger(__name__)

_RESULT_KEYS = ("total_energy_j", "info_gain_bits", "efficiency_bits_per_j", "energy_source")


def _output_loss(output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss if hasattr(loss, "detach") else None


class H3Callback(_Base):  # type: ignore[misc]
    """A ``transformers.TrainerCallback`` streaming training to h3d through H3Profiler.

    Args:
        every_step: Log every optimizer step's loss from the model's outputs (see the
            module docstring); False: only the losses the ``Trainer`` logs.
        **profiler_kwargs: Passed to :class:`h3client.H3Profiler` (``name``, ``url``,
            ``config``, ``tags``, ``n_train``, ...). Rank and world size come from the
            ``TrainingArguments``.

    Example:
        >>> from h3client.integrations.transformers import H3Callback  # doctest: +SKIP
        >>> h3 = H3Callback(name="bert-tiny")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=ds, callbacks=[h3]).train()  # doctest: +SKIP
        >>> h3.results["efficiency_bits_per_j"]  # doctest: +SKIP
    """

    def __init__(self, *, every_step: bool = True, **profiler_kwargs: Any) -> None:
        self.every_step = every_step
        self.profiler_kwargs = profiler_kwargs
        self.profiler: H3Profiler | None = None
        self.results: dict[str, Any] | None = None
        self._hook: Any = None
        self._micro: list[Any] = []  # this step's micro-batch losses (detached tensors)
        self._micro_sum = False  # they were normalized by the whole batch's item count
        self._sum_scale = 1  # the Trainer's factor for items counted across ranks
        self._hooked_steps = 0
        self._epoch = 0
        self._epoch_open: int | None = None  # ended, waiting for its evaluation
        self._in_epoch = False  # between on_epoch_begin and on_epoch_end
        self._last_eval: dict[str, Any] | None = None  # the current epoch's last evaluation

    # --- the forward hook: every step's loss ------------------------------------------

    def _capture(self, module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training:
            loss = _output_loss(output)
            if loss is not None:
                self._micro.append(loss.detach())
                # The Trainer passes num_items_in_batch only to a model that takes loss
                # kwargs; the loss is then the micro-batch's share of the step's loss.
                self._micro_sum = kwargs.get("num_items_in_batch") is not None

    # --- Trainer events -----------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.profiler = open_profiler(
            self.profiler_kwargs, rank=args.process_index, world_size=args.world_size
        )
        self.results = None
        world = int(getattr(args, "world_size", 1) or 1)
        across = bool(getattr(args, "average_tokens_across_devices", False))
        self._sum_scale = world if across and world > 1 else 1
        model = kw.get("model")
        if self.every_step and model is not None:
            self._hook = model.register_forward_hook(self._capture, with_kwargs=True)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_epoch()
        # A run resumed mid-epoch (state.epoch 1.5) is in the epoch of index 1, not 2.
        self._epoch = int((state.epoch or 0.0) + 1e-9)
        self._in_epoch = True
        self._last_eval = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        prof, micro = self.profiler, self._micro
        if prof is None or not micro:
            return
        loss = micro[0] if len(micro) == 1 else sum(micro[1:], micro[0])
        if self._micro_sum:
            if self._sum_scale != 1:
                loss = loss * self._sum_scale
        elif len(micro) > 1:
            loss = loss / len(micro)
        self._micro = []
        self._hooked_steps += 1
        prof.log_batch(loss, epoch=self._epoch, step=state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        prof = self.profiler
        if prof is None or not logs or self._hooked_steps or "loss" not in logs:
            return
        prof.log_batch(float(logs["loss"]), epoch=self._epoch, step=state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._epoch_open = self._epoch  # evaluation, if any, follows this event
        self._in_epoch = False

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if self._epoch_open is not None:  # eval_strategy="epoch": it follows on_epoch_end
            self._close_epoch(metrics or {})
        elif self._in_epoch:  # eval_strategy="steps": kept until the epoch closes
            self._last_eval = dict(metrics or {})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_epoch()
        self.stop("finished")
        if self.results is not None:
            state.log_history.append(
                {f"h3_{k}": self.results[k] for k in _RESULT_KEYS if k in self.results}
            )

    # --- helpers -------------------------------------------------------------------------

    def _close_epoch(self, metrics: dict[str, Any] | None = None) -> None:
        prof, ep = self.profiler, self._epoch_open
        if prof is None or ep is None:
            return
        self._epoch_open = None
        if metrics is None:
            metrics = self._last_eval
        self._last_eval = None
        figures: dict[str, Any] = {}
        for key, value in (metrics or {}).items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix("eval_")
            figures["val_loss" if name == "loss" else name] = value
        prof.log_epoch(ep, accuracy=figures.pop("accuracy", None), **figures)

    def stop(self, status: str = "finished") -> dict[str, Any] | None:
        """Finish the run (idempotent); ``on_train_end`` calls it."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.profiler is not None and self.results is None:
            self.results = self.profiler.stop(status=status)
        return self.results
