"""One trial: train a copy of the task's model under a :class:`TrialConfig`, as a daemon run."""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Sampler

from h3optim.denormals import flush_denormal_enabled, flushing_denormals
from h3optim.sampler import PhaseSchedule
from h3optim.tracking import IndexedDataset
from h3optim.tune import _interrupt
from h3optim.tune._measure import PeakMemory, count_flops
from h3optim.tune.task import Task
from h3optim.tune.techniques import TrialConfig


class Profiler(Protocol):
    """The part of ``h3client.H3Profiler`` a trial uses."""

    run_id: str | None

    def log_batch(self, loss: Any, *, epoch: int | None = None, phase: str | None = None) -> None:
        """Record a batch."""

    def log_epoch(
        self, epoch: int | None = None, *, accuracy: float | None = None, **metrics: Any
    ) -> None:
        """Record a segment."""

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Send what is queued."""

    def stop(self, status: str = "finished", timeout_s: float = 30.0) -> dict[str, Any]:
        """Finish the run and read its energy back."""


class Runs(Protocol):
    """Opens a trial's run and reads a run's report back from the daemon."""

    def open(self, name: str, tags: list[str], config: dict[str, Any], n_train: int) -> Profiler:
        """A started profiler for a new run."""

    def stop_point(self, run_id: str) -> int | None:
        """The daemon's diminishing-returns epoch for the run so far (None: not reached)."""


@dataclass
class Outcome:
    """What one trial measured."""

    run_id: str | None
    wall_s: float
    energy_j: float | None
    device_energy_j: float | None
    energy_source: str
    energy_measured: bool
    eta_bits_per_j: float | None
    info_gain_bits: float | None
    peak_mem_bytes: int
    mem_rise_bytes: int
    mem_source: str
    flops: int | None
    metric: float
    steps: int
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


class _Checkpointed(nn.Module):
    """Runs ``inner`` under activation checkpointing: recomputed in backward, not stored."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False)


def checkpoint_largest(model: nn.Module, k: int) -> list[str]:
    """Wrap the ``k`` top-level children with the most parameters; returns their names."""
    sizes = [
        (sum(p.numel() for p in c.parameters()), name)
        for name, c in model.named_children()
        if any(True for _ in c.parameters())
    ]
    chosen = [name for _, name in sorted(sizes, reverse=True)[:k]]
    for name in chosen:
        setattr(model, name, _Checkpointed(getattr(model, name)))
    return chosen


def prune_structured(model: nn.Module, amount: float) -> float:
    """L2-structured pruning of output channels/units in every conv and linear layer but the
    last linear (the classes); masks stay until :func:`finish_pruning`. Returns the fraction
    of those layers' weights now zero."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers and isinstance(layers[-1], nn.Linear):
        layers = layers[:-1]
    zero = total = 0
    for m in layers:
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)  # type: ignore[no-untyped-call]
        w = m.weight
        zero += int((w == 0).sum())
        total += w.numel()
    return zero / total if total else 0.0


def finish_pruning(model: nn.Module) -> None:
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")  # type: ignore[no-untyped-call]


def autocast_for(cfg: TrialConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.amp is None:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def per_sample_losses(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The loss of each sample, by switching the loss module's ``reduction`` to ``"none"``."""
    saved = loss.reduction  # type: ignore[attr-defined]
    loss.reduction = "none"  # type: ignore[attr-defined]
    try:
        losses = loss(out, y)
    finally:
        loss.reduction = saved  # type: ignore[attr-defined]
    return losses.reshape(len(y), -1).mean(1) if losses.dim() > 1 else losses


def segment_sizes(budget_samples: int, segments: int) -> list[int]:
    """``budget_samples`` split into ``segments`` near-equal parts (none empty)."""
    segments = max(1, min(segments, budget_samples))
    q, r = divmod(budget_samples, segments)
    return [q + (1 if i < r else 0) for i in range(segments)]


class _Plan(Sampler[list[int]]):
    """The trial's batches of indices, segment by segment; no batch straddles two segments.

    Uniform trials draw a seeded shuffle of the data, pass after pass. With an H3 preset,
    each segment is one of the preset's epochs: uniform in warmup and consolidation, and in
    the thermodynamic phase ``keep_frac`` of the segment's samples chosen by the sampler.
    """

    def __init__(
        self, n: int, sizes: list[int], batch_size: int, seed: int, setup: Any = None
    ) -> None:
        self.n, self.batch_size, self.seed, self.setup = n, batch_size, seed, setup
        self.sizes = list(sizes)
        if setup is not None:
            sched = PhaseSchedule(len(sizes))
            self.phases = [sched.phase(k) for k in range(len(sizes))]
            self.sizes = [
                max(1, round(s * setup.keep_frac)) if p == "thermodynamic" else s
                for s, p in zip(sizes, self.phases, strict=True)
            ]
        else:
            self.phases = ["uniform"] * len(sizes)

    def __len__(self) -> int:
        return sum(math.ceil(s / self.batch_size) for s in self.sizes)

    def _uniform(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        uniform = self._uniform()
        for k, size in enumerate(self.sizes):
            source: Iterator[int] = uniform
            if self.setup is not None and self.phases[k] == "thermodynamic":
                _phase, sampler = self.setup.get_sampler(k, len(self.sizes))
                source = _cycle(sampler)
            picked = [next(source) for _ in range(size)]
            for i in range(0, size, self.batch_size):
                yield picked[i : i + self.batch_size]


def _cycle(sampler: Any) -> Iterator[int]:
    while True:
        yield from iter(sampler)


def _preset(name: str, model: nn.Module, data: Any) -> Any:
    from h3optim import presets

    factory = getattr(presets, name, None)
    if factory is None:
        raise ValueError(f"unknown H3 preset {name!r}")
    return factory(model.parameters(), data)


def prepare_model(task: Task, cfg: TrialConfig) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh copy of the task's model, laid out and wrapped as ``cfg`` says."""
    device = torch.device(task.device or "cpu")
    model = copy.deepcopy(task.model).to(device)
    info: dict[str, Any] = {}
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.checkpoint_blocks:
        info["checkpointed_blocks"] = checkpoint_largest(model, cfg.checkpoint_blocks)
    return model, info


def _to(x: torch.Tensor, device: torch.device, cfg: TrialConfig) -> torch.Tensor:
    x = x.to(device, non_blocking=cfg.pin_memory)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def val_loader(task: Task) -> DataLoader[Any]:
    return DataLoader(task.val_data, batch_size=max(256, task.batch_size))


def run_trial(
    task: Task,
    cfg: TrialConfig,
    runs: Runs,
    *,
    name: str,
    tags: list[str],
    budget_samples: int,
    segments: int,
    seed: int,
    flops: bool = True,
) -> tuple[Outcome, nn.Module]:
    """Train one trial as its own daemon run and measure it; returns it and the trained model.

    The run's window (its energy, η and the reported wall time) covers training and the
    final evaluation of the metric. On an exception the run is finished as ``failed``.
    """
    device = torch.device(task.device or "cpu")
    torch.manual_seed(seed)
    model, extra = prepare_model(task, cfg)
    bs = cfg.batch_size or task.batch_size
    autocast = autocast_for(cfg, device)
    flops_step: int | None = None
    if flops:
        x0, y0 = _first_batch(task, bs, device, cfg)
        try:
            flops_step = count_flops(model, x0, y0, task.loss, autocast)
        except Exception as exc:  # FLOP counting must not cost the trial
            extra["flops_error"] = repr(exc)
        del x0, y0
    fwd: nn.Module = torch.compile(model) if cfg.compile else model  # type: ignore[assignment]
    opt = task.optimizer(model.parameters())
    for g in opt.param_groups:
        g["lr"] = g["lr"] * cfg.lr_scale
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    setup = _preset(cfg.h3_preset, model, task.train_data) if cfg.h3_preset else None
    sizes = segment_sizes(budget_samples, segments)
    plan = _Plan(task.n_train, sizes, bs, seed, setup)
    loader = DataLoader(
        IndexedDataset(task.train_data),
        batch_sampler=plan,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
    )
    prune_after = _segment_at(plan.sizes, cfg.prune_at) if cfg.prune_amount > 0 else -1
    config = {"task": task.name, "batch_size": bs, **cfg.changes(), "segments": len(sizes)}
    steps = samples = seg = seg_samples = 0
    seg_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
    metric: float | None = None
    stopped_at: int | None = None
    first_step_s: float | None = None
    flushing = flushing_denormals() if cfg.flush_denormal else contextlib.nullcontext()
    prof: Profiler | None = None
    try:
        with flushing, PeakMemory(device, children=cfg.num_workers > 0) as mem:
            # the run opens right before t0 and stops right after wall_s: its energy and
            # η cover the window wall_s times, not the memory sampler's set-up (a heap
            # trim, a thread) and tear-down around it
            prof = runs.open(name, tags, config, task.n_train)
            t0 = time.perf_counter()
            model.train()
            for x, y, idx in loader:
                x, y = _to(x, device, cfg), y.to(device, non_blocking=cfg.pin_memory)
                opt.zero_grad(set_to_none=True)
                chunks = max(1, min(cfg.accum_steps, len(y)))
                mean = torch.zeros((), device=device)
                for xc, yc, ic in zip(
                    x.tensor_split(chunks),
                    y.tensor_split(chunks),
                    idx.tensor_split(chunks),
                    strict=True,
                ):
                    with autocast():
                        out = fwd(xc)
                    out = out.float()
                    if setup is not None:
                        losses = per_sample_losses(task.loss, out, yc)
                        setup.loss_tracker.update(ic, losses.detach())
                        loss = losses.mean()
                    else:
                        loss = task.loss(out, yc)
                    part = loss * (len(yc) / len(y))
                    if scaler is not None:
                        scaler.scale(part).backward()  # type: ignore[no-untyped-call]
                    else:
                        part.backward()  # type: ignore[no-untyped-call]
                    mean += part.detach()
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                _interrupt.check()  # a Ctrl-C taken at a step boundary
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t0
                steps += 1
                samples += len(y)
                seg_samples += len(y)
                seg_loss += mean * len(y)
                prof.log_batch(mean, epoch=seg, phase=plan.phases[seg])
                if seg_samples < plan.sizes[seg]:
                    continue
                last = seg == len(plan.sizes) - 1
                if seg == prune_after:
                    extra["pruned_weight_frac"] = prune_structured(model, cfg.prune_amount)
                watch = cfg.early_stop and seg >= 2
                if last or watch:
                    metric = _evaluate(task, model)
                    model.train()
                _log_segment(
                    prof,
                    task,
                    seg,
                    float(seg_loss) / seg_samples,
                    plan.phases[seg],
                    seg_samples,
                    metric if (last or watch) else None,
                )
                if watch and not last:
                    prof.flush()
                    if runs.stop_point(str(prof.run_id)) is not None:
                        stopped_at = seg
                        break
                seg, seg_samples = seg + 1, 0
                seg_loss = torch.zeros((), device=device)
            if metric is None:  # the loader ran dry early (cannot happen with a valid plan)
                metric = _evaluate(task, model)
            wall_s = time.perf_counter() - t0
            res = prof.stop()
            extra["flush_denormal"] = flush_denormal_enabled()  # as the trial trained
    except BaseException:
        if prof is not None:
            prof.stop(status="failed")  # (a run stopped already stays as it was)
        raise
    finish_pruning(model)
    if cfg.compile:
        extra["first_step_s"] = first_step_s  # compile happens in the first step
    if cfg.early_stop:
        extra["early_stop_triggered"] = stopped_at is not None
        extra["stopped_after_segment"] = stopped_at
        extra["segments_planned"] = len(plan.sizes)
    flop_total = None if flops_step is None else round(flops_step * samples / bs)
    outcome = _outcome(prof, res, wall_s, mem, float(metric), flops=flop_total)
    outcome.steps, outcome.samples, outcome.extra = steps, samples, extra
    return outcome, model


def _outcome(
    prof: Profiler,
    res: dict[str, Any],
    wall_s: float,
    mem: PeakMemory,
    metric: float,
    *,
    flops: int | None = None,
) -> Outcome:
    """What the daemon said about the finished run, with the trial's own measurements."""
    return Outcome(
        run_id=prof.run_id,
        wall_s=wall_s,
        energy_j=res.get("total_energy_j"),
        device_energy_j=res.get("device_energy_j"),
        energy_source=str(res.get("energy_source", "none")),
        energy_measured=bool(res.get("energy_measured")),
        eta_bits_per_j=res.get("efficiency_bits_per_j"),
        info_gain_bits=res.get("info_gain_bits"),
        peak_mem_bytes=mem.peak_bytes,
        mem_rise_bytes=mem.rise_bytes,
        mem_source=mem.source,
        flops=flops,
        metric=metric,
        steps=0,
        samples=0,
    )


def _log_segment(
    prof: Profiler,
    task: Task,
    seg: int,
    loss: float,
    phase: str,
    n: int,
    metric: float | None,
) -> None:
    named: dict[str, Any] = {}
    acc = None
    if metric is not None:
        if task.metric_name == "accuracy":
            acc = metric
        else:
            named[task.metric_name] = metric
    prof.log_epoch(seg, accuracy=acc, loss=loss, phase=phase, samples=n, **named)


def _segment_at(sizes: list[int], frac: float) -> int:
    """The segment after which ``frac`` of the planned samples have been trained on."""
    total, acc = sum(sizes), 0
    for k, s in enumerate(sizes):
        acc += s
        if acc >= frac * total:
            return min(k, len(sizes) - 2) if len(sizes) > 1 else 0
    return len(sizes) - 1


def _evaluate(task: Task, model: nn.Module) -> float:
    with torch.no_grad():
        return float(task.metric(model, val_loader(task)))


def _first_batch(
    task: Task, bs: int, device: torch.device, cfg: TrialConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(bs, task.n_train)
    items = [task.train_data[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(it[0]) for it in items])
    y = torch.stack([torch.as_tensor(it[1]) for it in items])
    return _to(x, device, cfg), y.to(device)


def fits(task: Task, bs: int) -> str | None:
    """Try one training step at batch size ``bs``; None if it fits, else why not."""
    device = torch.device(task.device or "cpu")
    model, _ = prepare_model(task, TrialConfig())
    try:
        x, y = _first_batch_repeated(task, bs, device)
        model.train()
        task.loss(model(x), y).backward()  # type: ignore[no-untyped-call]
    except torch.OutOfMemoryError as exc:
        return f"out of memory: {exc}"
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower() or "can't allocate" in str(exc).lower():
            return f"out of memory: {exc}"
        raise
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return None


def _first_batch_repeated(
    task: Task, bs: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    n = task.n_train
    items = [task.train_data[i % n] for i in range(bs)]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
    y = torch.stack([torch.as_tensor(it[1]) for it in items]).to(device)
    return x, y


def quantize_int8(model: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` on nn.Linear (a copy of the model, CPU).

    torch 2.13 marks ``torch.ao.quantization`` deprecated in favour of torchao; it still
    works, and the warning is silenced here on purpose (torchao is not a dependency).
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        q: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )
    return q


def run_inference(
    task: Task,
    model: nn.Module,
    runs: Runs,
    *,
    name: str,
    tags: list[str],
    passes: int,
) -> Outcome:
    """Time ``passes`` passes of inference over the validation data as its own run."""
    loader = val_loader(task)
    config = {"task": task.name, "inference": True, "passes": passes}
    model.eval()
    samples = 0
    prof: Profiler | None = None
    try:
        with PeakMemory(torch.device("cpu")) as mem:
            prof = runs.open(name, tags, config, task.n_train)  # the window wall_s times
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(passes):
                    for batch in loader:
                        model(batch[0])
                        samples += len(batch[0])
            wall_s = time.perf_counter() - t0
            res = prof.stop()
    except BaseException:
        if prof is not None:
            prof.stop(status="failed")
        raise
    outcome = _outcome(prof, res, wall_s, mem, _evaluate(task, model))
    outcome.eta_bits_per_j = outcome.info_gain_bits = None  # inference learns nothing
    outcome.samples = samples
    outcome.extra = {"latency_ms_per_sample": 1e3 * wall_s / max(samples, 1)}
    return outcome
