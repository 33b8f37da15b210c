"""The techniques the tuner tries: each one a change to a :class:`TrialConfig`.

A technique either applies here (and says which settings it changes) or gives the reason it
does not (fp16 without CUDA, ``channels_last`` on a model without convolutions, ...).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from h3optim.denormals import flush_denormal_enabled
from h3optim.tune.task import Task

PRESETS = ("h3_mnist_fast", "h3_cifar_safe", "h3_edge")


@dataclass(frozen=True)
class TrialConfig:
    """How one trial trains. The baseline is ``TrialConfig()``.

    Attributes:
        amp: Autocast dtype: ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with a GradScaler).
        compile: Train ``torch.compile(model)``; its compile time counts in the trial.
        channels_last: Model and 4-d inputs in ``torch.channels_last`` memory format.
        checkpoint_blocks: Recompute the activations of this many of the model's largest
            top-level blocks in the backward pass (``torch.utils.checkpoint``).
        accum_steps: Split each batch into this many micro-batches, one optimizer step per batch.
        batch_size: Batch size (None: the task's).
        lr_scale: Multiplies every param group's learning rate.
        num_workers: DataLoader worker processes.
        pin_memory: Pinned host memory (only with CUDA).
        early_stop: Stop at the daemon's diminishing-returns point.
        prune_amount: Fraction of output channels/units pruned (L2-structured) once
            ``prune_at`` of the budget is spent; the rest of the budget fine-tunes.
        prune_at: Budget fraction after which pruning happens.
        h3_preset: Draw samples with H3's sampler as this preset configures it.
        flush_denormal: Compute subnormal floats as zero on the CPU during the trial
            (on the training thread and its intra-op threads; see :mod:`h3optim.denormals`).
    """

    amp: Literal["bf16", "fp16"] | None = None
    compile: bool = False
    channels_last: bool = False
    checkpoint_blocks: int = 0
    accum_steps: int = 1
    batch_size: int | None = None
    lr_scale: float = 1.0
    num_workers: int = 0
    pin_memory: bool = False
    early_stop: bool = False
    prune_amount: float = 0.0
    prune_at: float = 0.75
    h3_preset: str | None = None
    flush_denormal: bool = False

    def changes(self) -> dict[str, Any]:
        """The settings that differ from the baseline's."""
        base = TrialConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        }

    def merged(self, other: dict[str, Any]) -> TrialConfig:
        return dataclasses.replace(self, **other)


@dataclass
class Env:
    """What the machine and the task offer; techniques decide applicability from it."""

    device: torch.device
    cpu_count: int
    has_conv2d: bool
    has_linear: bool
    n_blocks: int
    loss_has_reduction: bool
    input_dim: int
    compile_reason: str | None
    bf16_reason: str | None
    quant_reason: str | None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def probe_env(task: Task) -> Env:
    """Inspect the machine and the task's model once per session."""
    device = torch.device(task.device or "cpu")
    mods = list(task.model.modules())
    x0 = task.train_data[0][0]
    blocks = [c for c in task.model.children() if any(True for _ in c.parameters())]
    compile_reason: str | None = None
    if not hasattr(torch, "compile"):
        compile_reason = "this torch has no torch.compile"
    elif device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        compile_reason = "torch.compile on CPU needs a C++ compiler (none found)"
    bf16_reason: str | None = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        bf16_reason = "this GPU does not support bf16"
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    quant_reason: str | None = None
    if device.type != "cpu":
        quant_reason = "dynamic INT8 quantisation runs on the CPU only (model trains on the GPU)"
    elif not engines:
        quant_reason = "this torch build has no quantized engine"
    elif not any(isinstance(m, nn.Linear) for m in mods):
        quant_reason = "dynamic INT8 quantisation covers nn.Linear/LSTM; the model has none"
    return Env(
        device=device,
        cpu_count=os.cpu_count() or 1,
        has_conv2d=any(isinstance(m, nn.Conv2d) for m in mods),
        has_linear=any(isinstance(m, nn.Linear) for m in mods),
        n_blocks=len(blocks),
        loss_has_reduction=hasattr(task.loss, "reduction"),
        input_dim=torch.as_tensor(x0).dim() + 1,
        compile_reason=compile_reason,
        bf16_reason=bf16_reason,
        quant_reason=quant_reason,
    )


Settings = Callable[[Task, Env], dict[str, Any]]
Applies = Callable[[Task, Env], str | None]


def _always(task: Task, env: Env) -> str | None:
    return None


@dataclass(frozen=True)
class Technique:
    """One technique: a name, the settings it changes, and when it applies.

    Args:
        name: Short identifier (tags, reports, ``--techniques``).
        settings: ``settings(task, env) -> {TrialConfig field: value}``, or a plain dict.
        applies: ``applies(task, env) -> None`` when it applies, else the reason it does not.
        kind: ``"training"`` (a trial like the baseline) or ``"inference"`` (measured on
            the trained baseline model's inference).
        note: What a reader should know about how it is measured.
        excludes: Techniques it cannot be combined with.
    """

    name: str
    settings: Settings | dict[str, Any] = field(default_factory=dict)
    applies: Applies = _always
    kind: Literal["training", "inference"] = "training"
    note: str = ""
    excludes: tuple[str, ...] = ()

    def resolve(self, task: Task, env: Env) -> dict[str, Any]:
        s = self.settings
        return dict(s) if isinstance(s, dict) else s(task, env)


def _amp_bf16(task: Task, env: Env) -> str | None:
    return env.bf16_reason


def _amp_fp16(task: Task, env: Env) -> str | None:
    return None if env.is_cuda else "fp16 autocast needs CUDA (use amp_bf16 on the CPU)"


def _compile(task: Task, env: Env) -> str | None:
    return env.compile_reason


def _channels_last(task: Task, env: Env) -> str | None:
    if not env.has_conv2d:
        return "channels_last helps convolutions; the model has no nn.Conv2d"
    if env.input_dim != 4:
        return f"channels_last needs 4-d inputs (N, C, H, W); the inputs are {env.input_dim}-d"
    return None


def _checkpoint(task: Task, env: Env) -> str | None:
    if env.n_blocks < 2:
        return "gradient checkpointing needs at least two top-level blocks with parameters"
    return None


def _accum(task: Task, env: Env) -> str | None:
    if task.batch_size < 8:
        return f"batch size {task.batch_size} is too small to split into 4 micro-batches"
    return None


def _workers(task: Task, env: Env) -> str | None:
    if env.cpu_count < 2:
        return "one CPU: a worker process would only compete with training"
    return None


def _workers_settings(task: Task, env: Env) -> dict[str, Any]:
    return {"num_workers": min(2, env.cpu_count - 1), "pin_memory": env.is_cuda}


def _h3_sampler(task: Task, env: Env) -> str | None:
    if not env.loss_has_reduction:
        return "H3's sampler needs per-sample losses; the loss has no `reduction` attribute"
    return None


def _flush_denormal(task: Task, env: Env) -> str | None:
    if env.device.type != "cpu":
        return f"flush-to-zero changes CPU arithmetic; the model trains on {env.device.type}"
    if not torch.set_flush_denormal(flush_denormal_enabled()):  # a no-op that says if it can
        return "this CPU has no flush-to-zero mode"
    return None


def _prune(task: Task, env: Env) -> str | None:
    return None if env.has_conv2d or env.has_linear else "no nn.Conv2d or nn.Linear to prune"


def _int8(task: Task, env: Env) -> str | None:
    return env.quant_reason


def builtin_techniques() -> dict[str, Technique]:
    """The techniques ``tune`` tries by default, by name, in a fixed order."""
    ts = [
        Technique("amp_bf16", {"amp": "bf16"}, _amp_bf16, note="bf16 autocast (CPU or CUDA)"),
        Technique("amp_fp16", {"amp": "fp16"}, _amp_fp16, note="fp16 autocast + GradScaler"),
        Technique(
            "compile",
            {"compile": True},
            _compile,
            note="time and energy include compiling (the first steps)",
            excludes=("prune",),
        ),
        Technique("channels_last", {"channels_last": True}, _channels_last),
        Technique(
            "flush_denormal",
            {"flush_denormal": True},
            _flush_denormal,
            note="subnormal floats computed as zero on the CPU (training and intra-op threads)",
        ),
        Technique(
            "checkpointing",
            {"checkpoint_blocks": 2},
            _checkpoint,
            note="the 2 largest top-level blocks recompute their activations",
        ),
        Technique(
            "grad_accum",
            {"accum_steps": 4},
            _accum,
            note="4 micro-batches per step, same effective batch (a memory technique)",
        ),
        Technique(
            "batch_size",
            {},  # filled in by the runner's batch-size finder
            note="largest batch that fits (under the cap), LR scaled",
        ),
        Technique(
            "workers",
            _workers_settings,
            _workers,
            note="DataLoader workers (+ pinned memory on CUDA)",
        ),
        Technique(
            "early_stop",
            {"early_stop": True},
            note="stops when the daemon's per-segment η stays < 10 % of its peak",
        ),
        Technique(
            "prune",
            {"prune_amount": 0.3},
            _prune,
            note="30 % of channels L2-pruned after 75 % of the budget, then fine-tuned",
            excludes=("compile",),
        ),
        Technique(
            "h3_sampler",
            {"h3_preset": "h3_mnist_fast"},
            _h3_sampler,
            note="H3's information-weighted sampler as the h3_mnist_fast preset sets it",
        ),
        Technique(
            "int8_dynamic",
            {},
            _int8,
            kind="inference",
            note="inference latency and energy of the trained baseline, not training",
        ),
    ]
    return {t.name: t for t in ts}
