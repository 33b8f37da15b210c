"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[H3Callback()])`` profiles training.

What it records, per rank (every process of a distributed ``Trainer`` joins one run):

- **the loss of every optimizer step**: the ``Trainer`` hands callbacks only the loss
  averaged over ``logging_steps``, so the callback reads the model's own output instead: a
  forward hook takes ``outputs.loss`` of each training forward (no device sync; a model
  that returns a loss when given ``labels``, as every ``...ForXxx`` head does), and each
  step logs the mean loss of its items: the sum of its micro-batch losses when the model
  divides its loss by the ``num_items_in_batch`` the ``Trainer`` passes (each micro-batch's
  loss is then its share of the step's; times the world size when
  ``average_tokens_across_devices`` counts the items of every rank), their mean otherwise.
  Being *given* ``num_items_in_batch`` is not enough: the ``Trainer`` passes it to every
  model whose ``forward`` takes ``**kwargs``, and many heads (BERT's among them) drop it
  and return the micro-batch's mean, which the ``Trainer`` then sums into a loss inflated
  by the accumulation steps (see :func:`model_normalises_loss`). A model that returns no
  loss (a custom ``compute_loss``) falls back to the logged loss: set ``logging_steps=1``
  to get every step that way. ``every_step=False`` always uses the logged loss.
- each epoch's evaluation: ``eval_loss`` as the epoch's ``val_loss``, ``eval_accuracy``
  as its ``accuracy``, the other ``eval_*`` figures under ``metrics``. With
  ``eval_strategy="steps"`` the epoch gets the figures of the last evaluation run during
  it (an epoch without one gets none). With a dict of eval sets, every set's figures
  (``eval_<set>_loss``, ...) go under ``metrics`` as ``<set>_loss``, ...; the epoch is
  then stored once the next epoch begins or training ends. Without evaluation the epoch
  is still recorded (its time ends its energy window). A run resumed mid-epoch labels its
  batches with the epoch they belong to (``int(state.epoch)``) and stores that epoch
  when it ends.

The run opens in ``on_train_begin`` and finishes in ``on_train_end``; the results are then
in ``callback.results`` and appended to ``trainer.state.log_history`` as ``h3_*`` keys
(``h3_partial_*`` when the results are partial: other ranks were still running).
The ``Trainer`` has no exception hook: an uncaught exception marks the run failed at
interpreter exit; code that catches it calls ``callback.stop("failed")``.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from typing import TYPE_CHECKING, Any, Literal

from h3client.integrations._common import open_profiler
from h3client.profiler import H3Profiler

if TYPE_CHECKING:
    _Base = Any
else:
    from transformers import TrainerCallback as _Base

logger = logging.getLogger(__name__)

_RESULT_KEYS = ("total_energy_j", "info_gain_bits", "efficiency_bits_per_j", "energy_source")


def model_normalises_loss(model: Any) -> bool | None:
    """Whether ``model`` divides its loss by the ``num_items_in_batch`` it is given.

    The ``Trainer`` passes ``num_items_in_batch`` to any model whose ``forward`` takes
    ``**kwargs``; whether the loss honours it is up to the model. A ``transformers`` head
    that honours it hands its kwargs to ``self.loss_function`` (4.46 and later: GPT-2's
    LM head, the ``...ForCausalLM`` heads), one that does not computes the loss itself
    (``CrossEntropyLoss()`` in BERT's heads) or calls ``self.loss_function`` without them
    (the generic ``...ForSequenceClassification``). So: a ``forward`` that names
    ``num_items_in_batch`` uses it; otherwise it does iff its source calls
    ``loss_function`` with ``**kwargs`` or ``num_items_in_batch=``. A PEFT wrapper is
    judged by its base model, as the ``Trainer`` does, a ``torch.compile``'d model by the
    original.

    Returns:
        True or False; None when the source of ``forward`` cannot be read.
    """
    base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if callable(getattr(base, "get_base_model", None)):  # PEFT's
        base = base.get_base_model()
    forward = getattr(type(base), "forward", None)
    if forward is None:
        return None
    try:
        if "num_items_in_batch" in inspect.signature(forward).parameters:
            return True
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, ValueError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "loss_function"
            and any(k.arg in (None, "num_items_in_batch") for k in node.keywords)
        ):
            return True
    return False


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
        loss_reduction: What the model's loss is when the ``Trainer`` passes it
            ``num_items_in_batch``: ``"sum"``, the micro-batch's share of the step's loss
            (summed over the step's micro-batches); ``"mean"``, the micro-batch's mean
            (averaged over them); ``"auto"`` (default) reads it from the model's
            ``forward`` (:func:`model_normalises_loss`; ``"sum"`` when that cannot tell).
        **profiler_kwargs: Passed to :class:`h3client.H3Profiler` (``name``, ``url``,
            ``config``, ``tags``, ``n_train``, ...). Rank and world size come from the
            ``TrainingArguments``.

    Example:
        >>> from h3client.integrations.transformers import H3Callback  # doctest: +SKIP
        >>> h3 = H3Callback(name="bert-tiny")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=ds, callbacks=[h3]).train()  # doctest: +SKIP
        >>> h3.results["efficiency_bits_per_j"]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        every_step: bool = True,
        loss_reduction: Literal["auto", "sum", "mean"] = "auto",
        **profiler_kwargs: Any,
    ) -> None:
        if loss_reduction not in ("auto", "sum", "mean"):
            raise ValueError(f"loss_reduction must be 'auto', 'sum' or 'mean': {loss_reduction!r}")
        self.every_step = every_step
        self.loss_reduction = loss_reduction
        self.profiler_kwargs = profiler_kwargs
        self.profiler: H3Profiler | None = None
        self.results: dict[str, Any] | None = None
        self._hook: Any = None
        self._micro: list[Any] = []  # this step's micro-batch losses (detached tensors)
        self._micro_sum = False  # they were normalized by the whole batch's item count
        self._normalises = True  # the model divides its loss by num_items_in_batch
        self._dropped_items = False  # it was given num_items_in_batch and ignored it
        self._warned_dropped = False
        self._sum_scale = 1  # the Trainer's factor for items counted across ranks
        self._hooked_steps = 0
        self._epoch = 0
        self._epoch_open: int | None = None  # ended, waiting for its evaluation
        self._in_epoch = False  # between on_epoch_begin and on_epoch_end
        self._last_eval: dict[str, Any] | None = None  # the current epoch's last evaluation
        self._last_eval_step: int | None = None  # the global step it ran at

    # --- the forward hook: every step's loss ------------------------------------------

    def _capture(self, module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training:
            loss = _output_loss(output)
            if loss is not None:
                self._micro.append(loss.detach())
                # The Trainer passes num_items_in_batch to a model that takes loss kwargs;
                # the loss is then the micro-batch's share of the step's loss if the model
                # divides by it, and the micro-batch's mean if it drops it.
                given = kwargs.get("num_items_in_batch") is not None
                self._micro_sum = given and self._normalises
                self._dropped_items = self._dropped_items or (given and not self._normalises)

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
        if self.loss_reduction == "auto":
            judged = None if model is None else model_normalises_loss(model)
            self._normalises = judged is not False  # unknown: as the Trainer assumes
        else:
            self._normalises = self.loss_reduction == "sum"
        self._dropped_items = self._warned_dropped = False
        if self.every_step and model is not None:
            self._hook = model.register_forward_hook(self._capture, with_kwargs=True)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_epoch()
        # A run resumed mid-epoch (state.epoch 1.5) is in the epoch of index 1, not 2.
        self._epoch = int((state.epoch or 0.0) + 1e-9)
        self._in_epoch = True
        self._last_eval = self._last_eval_step = None

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
        if self._dropped_items and not self._warned_dropped:
            self._warned_dropped = True
            logger.warning(
                "h3: %s is given num_items_in_batch but returns each micro-batch's mean "
                "loss: h3 stores the mean over the step's micro-batches; the Trainer's own "
                "logged loss is their sum (pass loss_reduction='sum' if the model does divide)",
                type(kw.get("model")).__name__ if kw.get("model") is not None else "the model",
            )
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
        if self._epoch_open is None and not self._in_epoch:
            return  # before training (eval_on_start): no epoch's
        # An evaluation on a dict of eval sets is one on_evaluate per set, at the same step,
        # each with its own names (eval_<set>_loss, ...): they make one evaluation together.
        figures = dict(metrics or {})
        if self._last_eval is not None and self._last_eval_step == state.global_step:
            self._last_eval.update(figures)
        else:
            self._last_eval = figures
        self._last_eval_step = state.global_step
        # eval_strategy="epoch": it follows on_epoch_end, and ends the epoch once complete:
        # at once for a single eval set (eval_runtime); a dict's sets close it at the next
        # epoch or the end of training, as the epoch without an evaluation. With
        # eval_strategy="steps" it is kept until the epoch closes.
        if self._epoch_open is not None and "eval_runtime" in figures:
            self._close_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close_epoch()
        self.stop("finished")
        res = self.results
        if res is None:
            return
        # Figures of a distributed run whose other ranks were still running when this one
        # stopped change once they end: they are logged under h3_partial_* names, never
        # under the final ones.
        prefix = "h3_partial_" if res.get("partial") else "h3_"
        state.log_history.append({f"{prefix}{k}": res[k] for k in _RESULT_KEYS if k in res})
        if res.get("partial"):
            logger.warning(
                "h3: run %s was still running (other ranks) when this rank stopped: its "
                "figures in log_history are partial (h3_partial_*); the daemon has the final "
                "ones once every rank ends",
                res.get("run_id"),
            )

    # --- helpers -------------------------------------------------------------------------

    def _close_epoch(self) -> None:
        prof, ep = self.profiler, self._epoch_open
        if prof is None or ep is None:
            return
        self._epoch_open = None
        metrics, self._last_eval, self._last_eval_step = self._last_eval, None, None
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
