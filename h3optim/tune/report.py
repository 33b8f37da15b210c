"""The tuning report: figures with their noise, verdicts, the recommended config and its code."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from h3optim.tune.techniques import TrialConfig

if TYPE_CHECKING:
    from h3optim.tune.runner import TuneResult

BASELINE, COMBINED, FP32_INFERENCE = "baseline", "combined", "fp32_inference"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over repeats (``std`` None with one repeat)."""

    mean: float | None
    std: float | None
    n: int

    def fmt(self, digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
        if self.mean is None:
            return "-"
        sign = "+" if signed else ""
        m = f"{self.mean * scale:{sign}.{digits}g}"
        return m if self.std is None else f"{m} ± {self.std * scale:.2g}"


def stat(values: Iterable[float | None]) -> Stat:
    vs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vs:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else None, len(vs))


@dataclass(frozen=True)
class Row:
    """One technique's figures over its finished repeats."""

    technique: str
    kind: str
    n: int
    failed: int
    eta: Stat
    energy_j: Stat
    wall_s: Stat
    mem_rise_mb: Stat
    peak_mem_mb: Stat
    gflops: Stat
    metric: Stat
    metric_delta: Stat
    samples: Stat
    energy_source: str
    energy_measured: bool
    latency_ms: Stat
    energy_per_sample_mj: Stat


def summarize(result: TuneResult) -> list[Row]:
    """One row per technique tried, in the order first tried."""
    names = list(dict.fromkeys(t.technique for t in result.trials))
    base = {
        BASELINE: stat(t.outcome.metric for t in result.trials_of(BASELINE) if t.outcome),
        FP32_INFERENCE: stat(
            t.outcome.metric for t in result.trials_of(FP32_INFERENCE) if t.outcome
        ),
    }
    rows = []
    for name in names:
        done = [t.outcome for t in result.trials_of(name) if t.outcome is not None]
        all_ = [t for t in result.trials if t.technique == name]
        kind = all_[0].kind
        ref = base[FP32_INFERENCE if kind == "inference" else BASELINE]
        metric = stat(o.metric for o in done)
        delta = (
            Stat(None, None, 0)
            if metric.mean is None or ref.mean is None
            else Stat(
                metric.mean - ref.mean,
                None
                if metric.std is None and ref.std is None
                else math.hypot(metric.std or 0.0, ref.std or 0.0),
                metric.n,
            )
        )
        sources = sorted({o.energy_source for o in done}) or ["none"]
        rows.append(
            Row(
                technique=name,
                kind=kind,
                n=len(done),
                failed=len(all_) - len(done),
                eta=stat(o.eta_bits_per_j for o in done),
                energy_j=stat(o.energy_j for o in done),
                wall_s=stat(o.wall_s for o in done),
                mem_rise_mb=stat(o.mem_rise_bytes / 2**20 for o in done),
                peak_mem_mb=stat(o.peak_mem_bytes / 2**20 for o in done),
                gflops=stat(None if o.flops is None else o.flops / 1e9 for o in done),
                metric=metric,
                metric_delta=delta,
                samples=stat(o.samples for o in done),
                energy_source="+".join(sources),
                energy_measured=all(o.energy_measured for o in done) and bool(done),
                latency_ms=stat(o.extra.get("latency_ms_per_sample") for o in done),
                energy_per_sample_mj=stat(
                    None if o.energy_j is None else 1e3 * o.energy_j / max(o.samples, 1)
                    for o in done
                ),
            )
        )
    return rows


def verdicts(result: TuneResult) -> dict[str, tuple[str, str]]:
    """``{technique: (verdict, why)}``; verdicts: baseline, winner, no gain, refused, failed,
    unknown (no energy figure)."""
    rows = {r.technique: r for r in summarize(result)}
    out: dict[str, tuple[str, str]] = {}
    tol = result.tolerance
    for name, r in rows.items():
        if name in (BASELINE, FP32_INFERENCE):
            out[name] = ("baseline", "the reference")
            continue
        if r.n == 0:
            out[name] = ("failed", "no trial finished")
            continue
        ref = rows.get(FP32_INFERENCE if r.kind == "inference" else BASELINE)
        if ref is None or ref.n == 0:
            out[name] = ("unknown", "no finished baseline to compare with")
            continue
        d = r.metric_delta.mean or 0.0
        # "more than the tolerance below": a drop of exactly the tolerance (0.94 against
        # 0.95 with 0.01, one sample in a hundred) differs from it by float rounding alone
        # (0.94 - 0.95 = -0.010000000000000009), a slack far below any real difference
        slack = 1e-9 * max(1.0, abs(tol), abs(r.metric.mean or 0.0), abs(ref.metric.mean or 0.0))
        if d < -tol - slack:
            out[name] = (
                "refused",
                f"{result.metric_name} {d:+.4f} is more than the tolerance {tol:g} below "
                "the baseline",
            )
            continue
        if r.kind == "inference":
            a, b = r.energy_per_sample_mj.mean, ref.energy_per_sample_mj.mean
            if a is None or b is None:
                out[name] = ("unknown", "no energy measured")
            elif a < b:
                out[name] = ("winner", f"{b / a:.2f}× less energy per inference")
            else:
                out[name] = ("no gain", f"{a / b:.2f}× the energy per inference")
            continue
        a, b = r.eta.mean, ref.eta.mean
        done = [t.outcome for t in result.trials_of(name) if t.outcome is not None]
        if done and all(o.extra.get("early_stop_triggered") is False for o in done):
            out[name] = (
                "no gain",
                "the diminishing-returns point was not reached within the budget: it trained "
                "as the baseline did",
            )
        elif a is None or b is None:
            out[name] = ("unknown", "no η (energy or loss curve missing)")
        elif a > b:
            noisy = (r.eta.std or 0.0) + (ref.eta.std or 0.0) > a - b
            out[name] = ("winner", f"η ×{a / b:.2f}" + (" (within noise)" if noisy else ""))
        else:
            out[name] = ("no gain", f"η ×{a / b:.2f}")
    return out


def _rank_key(r: Row) -> float:
    return -(r.eta.mean if r.eta.mean is not None else -math.inf)


def _training_settings(result: TuneResult, name: str) -> dict[str, Any]:
    return next((dict(t.settings) for t in result.trials if t.technique == name), {})


def recommendation(result: TuneResult) -> dict[str, Any]:
    """The recommended configuration (JSON-ready): techniques, settings, measured gains,
    what was refused and why, and the code that applies it."""
    rows = {r.technique: r for r in summarize(result)}
    v = verdicts(result)
    refused = {n: why for n, (verdict, why) in v.items() if verdict == "refused"}
    singles = [
        n
        for n, (verdict, _) in v.items()
        if verdict == "winner" and rows[n].kind == "training" and n != COMBINED
    ]
    singles.sort(key=lambda n: _rank_key(rows[n]))
    pick: list[str] = []
    settings: dict[str, Any] = {}
    why = "no technique beat the baseline within the tolerance: keep the baseline"
    comb = v.get(COMBINED)
    best_single = singles[0] if singles else None
    if (
        comb is not None
        and comb[0] == "winner"
        and (best_single is None or _rank_key(rows[COMBINED]) <= _rank_key(rows[best_single]))
    ):
        pick, settings = list(result.combination), _training_settings(result, COMBINED)
        why = f"the verified combination ({comb[1]})"
    elif best_single is not None:
        pick, settings = [best_single], _training_settings(result, best_single)
        why = f"the best single technique ({v[best_single][1]})"
        if comb is not None:
            why += f"; the combination was not recommended: {comb[0]} ({comb[1]})"
    measured: dict[str, Any] = {}
    if pick:
        r, b = rows[COMBINED if len(pick) > 1 else pick[0]], rows[BASELINE]
        measured = {
            "eta_ratio": _ratio(r.eta.mean, b.eta.mean),
            "energy_ratio": _ratio(r.energy_j.mean, b.energy_j.mean),
            "time_ratio": _ratio(r.wall_s.mean, b.wall_s.mean),
            "metric_delta": r.metric_delta.mean,
        }
    inference = {
        n: why_
        for n, (verdict, why_) in v.items()
        if rows[n].kind == "inference" and verdict == "winner"
    }
    return {
        "session": result.session,
        "task": result.task,
        "techniques": pick,
        "settings": settings,
        "why": why,
        "measured_vs_baseline": measured,
        "refused": refused,
        "inference": inference,
        "code": code_for(settings, result.device),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def code_for(settings: dict[str, Any], device: str = "cpu") -> str:
    """The few lines that apply ``settings`` to an ordinary training loop."""
    cfg = TrialConfig().merged(settings)
    dev = device.split(":")[0]
    lines: list[str] = []
    if not cfg.changes():
        return "# no change: train as the baseline does"
    if cfg.flush_denormal:
        lines.append("from h3optim.denormals import set_flush_denormal")
        lines.append(
            "set_flush_denormal(True)  # CPU: subnormals as zero, on every intra-op thread"
        )
    if cfg.channels_last:
        lines.append("model = model.to(memory_format=torch.channels_last)  # inputs too")
    if cfg.checkpoint_blocks:
        lines.append("from h3optim.tune import checkpoint_largest")
        lines.append(f"checkpoint_largest(model, {cfg.checkpoint_blocks})")
    if cfg.compile:
        lines.append("model = torch.compile(model)")
    if cfg.lr_scale != 1.0:
        lines.append(f"for g in optimizer.param_groups: g['lr'] *= {cfg.lr_scale:.4g}")
    if cfg.batch_size or cfg.num_workers or cfg.pin_memory:
        bs = cfg.batch_size or "batch_size"
        lines.append(
            f"loader = DataLoader(train_data, batch_size={bs}, shuffle=True, "
            f"num_workers={cfg.num_workers}, pin_memory={cfg.pin_memory})"
        )
    if cfg.h3_preset:
        lines.append(f"setup = h3optim.{cfg.h3_preset}(model.parameters(), train_data)")
        lines.append(
            "# each epoch: phase, sampler = setup.get_sampler(epoch, epochs); "
            "setup.loss_tracker.update(idx, per_sample_losses)"
        )
    if cfg.amp == "fp16":
        lines.append("scaler = torch.amp.GradScaler('cuda')")
    if cfg.amp:
        dtype = "bfloat16" if cfg.amp == "bf16" else "float16"
        lines.append(f"with torch.autocast('{dev}', dtype=torch.{dtype}):")
        lines.append("    out = model(x)")
        lines.append("loss = criterion(out.float(), y)")
    if cfg.accum_steps > 1:
        lines.append(
            f"# {cfg.accum_steps} micro-batches per batch: x.tensor_split({cfg.accum_steps}), "
            f"backward on loss * len(chunk) / len(x) each, one optimizer.step()"
        )
    if cfg.prune_amount:
        lines.append("from h3optim.tune import finish_pruning, prune_structured")
        lines.append(
            f"# after {cfg.prune_at:.0%} of training: prune_structured(model, "
            f"{cfg.prune_amount:g}); fine-tune; then finish_pruning(model)"
        )
    if cfg.early_stop:
        lines.append(
            "# log an epoch per segment with H3Profiler.log_epoch; stop once the daemon's "
            "report shows the diminishing-returns point (h3-report prints it)"
        )
    return "\n".join(lines)


def _mb(s: Stat) -> str:
    return s.fmt(3)


def _observed(result: TuneResult) -> list[str]:
    """Per-session facts the table cannot show: compile time, early stops, pruning."""
    lines = []
    for name in dict.fromkeys(t.technique for t in result.trials):
        done = [t.outcome for t in result.trials_of(name) if t.outcome is not None]
        first = [o.extra["first_step_s"] for o in done if o.extra.get("first_step_s") is not None]
        if first:
            lines.append(
                f"{name}: first step (compiling) {', '.join(f'{v:.2f}' for v in first)} s; "
                "time and energy include it"
            )
        trig = [o.extra for o in done if "early_stop_triggered" in o.extra]
        if trig:
            hits = [e["stopped_after_segment"] for e in trig if e["early_stop_triggered"]]
            lines.append(
                f"{name}: diminishing-returns point reached in {len(hits)} of {len(trig)} "
                "repeats" + (f" (after segment {', '.join(map(str, hits))})" if hits else "")
            )
        pruned = [o.extra["pruned_weight_frac"] for o in done if "pruned_weight_frac" in o.extra]
        if pruned:
            lines.append(
                f"{name}: {statistics.fmean(pruned):.0%} of the pruned layers' weights zero "
                "(dense FLOPs unchanged)"
            )
    return lines


def _estimated(r: Row) -> bool:
    """Whether a row's energy is (in part) a model: not every trial measured, for a reason
    other than trials of source none (no energy at all); ``mixed`` beside none may be."""
    sources = set(r.energy_source.split("+"))
    if "none" not in sources:
        return not r.energy_measured
    return bool(sources & {"estimated", "mixed"})


def _provenance(rows: list[Row]) -> str:
    """The energy sources, an estimate labelled as one; source ``none`` (no energy at all,
    e.g. no daemon answered) is unknown, not an estimate."""
    done = [r for r in rows if r.n]
    sources = sorted({s for r in done for s in r.energy_source.split("+")})
    known = [s for s in sources if s != "none"]
    if not known:
        return "Energy provenance: unknown (no energy measured)"
    estimated = any(_estimated(r) for r in done)
    return (
        f"Energy provenance: {', '.join(known)}"
        + (" (ESTIMATED or partly estimated: a model, not a measurement)" if estimated else "")
        + ("; unknown (no energy measured) for trials of source none" if "none" in sources else "")
    )


def format_report(result: TuneResult) -> str:
    """The session's report as Markdown: ranked table, skipped techniques, recommendation."""
    rows = summarize(result)
    v = verdicts(result)
    train = sorted((r for r in rows if r.kind == "training"), key=_rank_key)
    infer = [r for r in rows if r.kind == "inference"]
    m = result.metric_name
    head = (
        f"h3-tune session `{result.session}` — task `{result.task}` on {result.device}, "
        f"budget {result.budget_steps} baseline steps, {result.repeats} repeat(s), "
        f"tolerance {result.tolerance:g} {m}"
        + (" — INTERRUPTED (finished trials only)" if result.interrupted else "")
    )
    noise = (
        "mean ± std over repeats"
        if result.repeats > 1
        else "one repeat: no noise estimate, differences may be the machine's noise"
    )
    out = [head, "", f"Training, ranked by bits per joule ({noise}):", ""]
    out.append(
        "| # | technique | η bits/J | energy J | time s | mem rise MB | GFLOP | "
        f"{m} | Δ {m} | samples | verdict |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(train, 1):
        verdict, why = v.get(r.technique, ("", ""))
        failed = f", {r.failed} failed" if r.failed else ""
        out.append(
            f"| {i} | {r.technique} | {r.eta.fmt()} | {r.energy_j.fmt()} | {r.wall_s.fmt()} | "
            f"{_mb(r.mem_rise_mb)} | {r.gflops.fmt()} | {r.metric.fmt(4)} | "
            f"{r.metric_delta.fmt(2, signed=True)} | {r.samples.fmt(4)} | "
            f"{verdict}{': ' + why if verdict not in ('baseline', '') else ''}{failed} |"
        )
    out += [
        "",
        _provenance(rows),
        "Memory: "
        + (
            "CUDA allocator peak"
            if result.device.startswith("cuda")
            else "process RSS (+ workers) sampled every 5 ms; 'rise' is the peak above the RSS "
            "at the trial's start"
        ),
    ]
    if infer:
        out += ["", "Inference (the trained baseline model; not training):", ""]
        out.append(f"| technique | ms/sample | mJ/sample | time s | {m} | Δ {m} | verdict |")
        out.append("|---|---|---|---|---|---|---|")
        for r in infer:
            verdict, why = v.get(r.technique, ("", ""))
            out.append(
                f"| {r.technique} | {r.latency_ms.fmt()} | {r.energy_per_sample_mj.fmt()} | "
                f"{r.wall_s.fmt()} | {r.metric.fmt(4)} | {r.metric_delta.fmt(2, signed=True)} | "
                f"{verdict}{': ' + why if verdict != 'baseline' else ''} |"
            )
    if result.skipped:
        out += ["", "Not applicable here:"]
        out += [f"- {n}: {why}" for n, why in result.skipped.items()]
    failures = [t for t in result.trials if t.error]
    if failures:
        out += ["", "Failed trials:"]
        out += [f"- {t.technique} #{t.repeat}: {t.error}" for t in failures]
    if result.notes:
        out += ["", "How each was measured:"]
        out += [f"- {n}: {note}" for n, note in result.notes.items()]
    observed = _observed(result)
    if observed:
        out += ["", "Observed:"] + [f"- {line}" for line in observed]
    rec = recommendation(result)
    out += ["", f"Combination: {result.combination_note or '-'}"]
    if rec["refused"]:
        out += ["", "Refused (metric fell more than the tolerance below the baseline):"]
        out += [f"- {n}: {why}" for n, why in rec["refused"].items()]
    shown = {k: rec[k] for k in ("techniques", "settings", "why", "measured_vs_baseline")}
    out += [
        "",
        "Recommended configuration:",
        "",
        "```json",
        json.dumps(shown, indent=2, default=str, ensure_ascii=False),
        "```",
        "",
        "```python",
        rec["code"],
        "```",
        "",
        f"Runs in the daemon: tag `tune:{result.session}` "
        f"(`h3-report --tune {result.session}`, or the dashboard's tag filter).",
    ]
    return "\n".join(out)
