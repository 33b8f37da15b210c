"""``tune``: baseline, each technique alone, the greedy combination; every trial a daemon run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from h3optim.tune import _interrupt
from h3optim.tune._train import Outcome, Profiler, fits, quantize_int8, run_inference, run_trial
from h3optim.tune.task import Task
from h3optim.tune.techniques import Env, Technique, TrialConfig, builtin_techniques, probe_env

logger = logging.getLogger(__name__)

BASELINE = "baseline"
COMBINED = "combined"
FP32_INFERENCE = "fp32_inference"

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class Trial:
    """One finished trial (or one that failed, with its error)."""

    technique: str
    repeat: int
    settings: dict[str, Any]
    kind: str = "training"
    outcome: Outcome | None = None
    error: str | None = None


@dataclass
class TuneResult:
    """What a session measured and what it recommends (see :mod:`h3optim.tune.report`)."""

    session: str
    task: str
    budget_steps: int
    repeats: int
    tolerance: float
    metric_name: str
    device: str
    tags: list[str]
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    combination: list[str] = field(default_factory=list)
    combination_note: str = ""
    interrupted: bool = False
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    out_dir: str | None = None

    def trials_of(self, technique: str) -> list[Trial]:
        return [t for t in self.trials if t.technique == technique and t.outcome is not None]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuneResult:
        """Rebuild a session from its ``tune-<session>.json`` (e.g. to re-print its report).

        Raises:
            ValueError: ``data`` is not a session (not an object, ``trials`` not a list of
                objects).
        """
        if not isinstance(data, dict):
            raise ValueError(f"a session is a JSON object, not {type(data).__name__}")
        trials = data.get("trials", [])
        if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
            raise ValueError("'trials' is not a list of objects")
        fields = {f.name for f in dataclasses.fields(cls)} - {"trials"}
        result = cls(**{k: v for k, v in data.items() if k in fields})
        for t in trials:
            o = t.get("outcome")
            result.trials.append(
                Trial(
                    technique=t["technique"],
                    repeat=t["repeat"],
                    settings=t["settings"],
                    kind=t.get("kind", "training"),
                    outcome=None if o is None else Outcome(**o),
                    error=t.get("error"),
                )
            )
        return result

    def to_json(self) -> dict[str, Any]:
        from h3optim.tune.report import recommendation, summarize

        d = dataclasses.asdict(self)
        d["summary"] = [dataclasses.asdict(r) for r in summarize(self)]
        d["recommendation"] = recommendation(self)
        return d


class _DaemonRuns:
    """Trials as runs of the daemon, through ``h3client`` like any user script."""

    def __init__(
        self,
        url: str | None,
        token: str | None,
        data_dir: str | Path | None,
        autostart: bool,
    ) -> None:
        self.url, self.token, self.data_dir, self.autostart = url, token, data_dir, autostart

    def open(self, name: str, tags: list[str], config: dict[str, Any], n_train: int) -> Profiler:
        from h3client import H3Profiler

        return H3Profiler(
            name,
            url=self.url,
            token=self.token,
            data_dir=self.data_dir,
            tags=tags,
            config=config,
            n_train=n_train,
            autostart=self.autostart,
            flush_interval_s=0.5,
        )

    def stop_point(self, run_id: str) -> int | None:
        from h3client import Client
        from h3client._report import diminishing_returns

        with Client(self.url, self.token, data_dir=self.data_dir) as c:
            rep = c.report(run_id)
        point = diminishing_returns(rep["epochs"])
        return None if point is None else int(point["epoch"])


def _require_daemon(
    url: str | None, token: str | None, data_dir: str | Path | None, autostart: bool
) -> None:
    """Find the daemon the trials will use (starting one if ``autostart`` allows), or raise
    ConnectionError: without one, every trial would train for nothing, its energy unknown."""
    from h3client._config import resolve
    from h3client._daemon import ensure_daemon, is_healthy

    cfg = resolve(url, token, data_dir)
    found = ensure_daemon(cfg, autostart=autostart)
    if found is not None:
        _require_token(found, cfg.token, cfg.data_dir)
        return
    if is_healthy(cfg.url):
        where = (
            f"the daemon at {cfg.url} did not prove that it serves the data dir "
            f"{cfg.data_dir} (it does not hold its token)"
        )
    else:
        where = f"no h3d daemon answers at {cfg.url}"
    if autostart and not cfg.url_is_explicit:
        hint = f"none could be started for {cfg.data_dir} (see {cfg.data_dir / 'h3d.log'})"
    else:
        hint = f"start one (`h3d serve --data-dir {cfg.data_dir}`) or give its URL (--url)"
    raise ConnectionError(f"{where}; every trial is a run of the daemon, so none was run: {hint}")


def _require_token(url: str, token: str | None, data_dir: Path) -> None:
    """Raise ConnectionError if the daemon at ``url`` (one the caller named, say) refuses
    ``token``: every trial's run would be refused, each trained for nothing, its energy
    unknown. Any other failure is left to the trials to report."""
    from h3client import Client, H3ClientError, H3HTTPStatusError

    try:
        with Client(url, token, data_dir=data_dir) as c:
            c.list_runs(limit=1)
    except H3HTTPStatusError as exc:
        if exc.status_code != 401:
            return
        held = "no token" if token is None else "a token it does not hold"
        raise ConnectionError(
            f"the h3d daemon at {url} refuses the runs: it was given {held} (data dir "
            f"{data_dir}); every trial is a run of the daemon, so none was run: give its data "
            "dir (H3D_DATA_DIR) or its token (H3D_TOKEN)"
        ) from None
    except H3ClientError:
        return


def _print_progress(event: str, info: dict[str, Any]) -> None:
    if event == "start":
        msg = f"h3-tune session {info['session']}: {info['planned']} trials planned"
    elif event == "skip":
        msg = f"  skip {info['technique']}: {info['reason']}"
    elif event == "trial_start":
        msg = (
            f"[{info['index']}/{info['planned']}] {info['technique']} (repeat {info['repeat']}) ..."
        )
    elif event == "trial_end":
        o = info.get("outcome")
        if o is None:
            msg = f"    failed: {info.get('error')}"
        else:
            e = "-" if o.energy_j is None else f"{o.energy_j:.3g} J"
            eta = "-" if o.eta_bits_per_j is None else f"{o.eta_bits_per_j:.3g} bits/J"
            msg = f"    {o.wall_s:.2f} s, {e}, η {eta}, metric {o.metric:.4f}"
    elif event == "interrupted":
        msg = f"interrupted: {info['kept']} finished trials kept"
    elif event == "combine":
        msg = f"combination: {info['note']}"
    else:
        msg = f"{event}: {info}"
    print(msg, file=sys.stderr, flush=True)


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def _resolve(techniques: Iterable[str | Technique] | None) -> list[Technique]:
    known = builtin_techniques()
    if techniques is None:
        return list(known.values())
    out: list[Technique] = []
    for t in techniques:
        if isinstance(t, Technique):
            out.append(t)
        elif t in known:
            out.append(known[t])
        else:
            raise ValueError(f"unknown technique {t!r}; known: {', '.join(known)}")
    names = [t.name for t in out]
    if len(set(names)) != len(names) or {BASELINE, COMBINED, FP32_INFERENCE} & set(names):
        raise ValueError(f"technique names must be unique and not reserved: {names}")
    return out


def find_batch_size(task: Task, cap: int) -> tuple[int, str]:
    """The largest batch (doubling from the task's) that fits one training step, up to ``cap``."""
    best = task.batch_size
    bs = best * 2
    why = f"cap {cap} reached"
    while bs <= cap:
        reason = fits(task, bs)
        if reason is not None:
            why = f"batch {bs} did not fit ({reason.splitlines()[0][:80]})"
            break
        best, bs = bs, bs * 2
    return best, why


def _lr_scale(task: Task, bs: int) -> float:
    """Linear scaling for SGD, square-root scaling for adaptive optimizers (Adam & co)."""
    import torch

    probe = task.optimizer([nn.Parameter(torch.zeros(1))])
    ratio = bs / task.batch_size
    return ratio if isinstance(probe, torch.optim.SGD) else math.sqrt(ratio)


def _settings(
    tech: Technique, task: Task, env: Env, max_batch_size: int | None, notes: dict[str, str]
) -> dict[str, Any] | str:
    """The technique's settings, or the reason it does not apply."""
    reason = tech.applies(task, env)
    if reason is not None:
        return reason
    if tech.name == "batch_size" and not tech.settings:
        cap = max_batch_size or min(8 * task.batch_size, max(task.batch_size, task.n_train // 8))
        bs, why = find_batch_size(task, cap)
        if bs <= task.batch_size:
            return f"no batch larger than {task.batch_size} fits or is allowed ({why})"
        scale = _lr_scale(task, bs)
        notes["batch_size"] = (
            f"batch {bs} vs baseline {task.batch_size} ({why}; on the CPU memory does not bound "
            f"it, the cap does), LR ×{scale:.3g}"
        )
        return {"batch_size": bs, "lr_scale": scale}
    return tech.resolve(task, env)


def _conflicts(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in a.keys() & b.keys() if a[k] != b[k]]


def greedy_combination(
    order: Sequence[str],
    settings: dict[str, dict[str, Any]],
    techniques: dict[str, Technique],
) -> tuple[list[str], dict[str, Any], list[str]]:
    """Add winners best-first while they do not clash; returns (chosen, settings, left out)."""
    chosen: list[str] = []
    merged: dict[str, Any] = {}
    left: list[str] = []
    for name in order:
        t = techniques[name]
        clash = _conflicts(merged, settings[name])
        excluded = [c for c in chosen if c in t.excludes or name in techniques[c].excludes]
        if clash or excluded:
            left.append(f"{name} (clashes with {', '.join(excluded) or ', '.join(clash)})")
            continue
        chosen.append(name)
        merged.update(settings[name])
    return chosen, merged, left


def tune(
    task: Task,
    budget: int = 200,
    techniques: Iterable[str | Technique] | None = None,
    *,
    repeats: int = 1,
    tolerance: float = 0.01,
    segments: int = 6,
    combine: Sequence[str] | None = None,
    out: str | Path | None = None,
    session: str | None = None,
    url: str | None = None,
    token: str | None = None,
    data_dir: str | Path | None = None,
    autostart: bool = True,
    progress: Progress | None = _print_progress,
    seed: int = 0,
    inference_passes: int = 3,
    max_batch_size: int | None = None,
    count_flops: bool = True,
) -> TuneResult:
    """Measure which training settings buy the most bits per joule on ``task``.

    Runs a baseline, then every applicable technique alone, then the winners combined
    greedily; every trial is its own run in the h3d daemon, tagged ``h3-tune``,
    ``tune:<session>``, ``technique:<name>`` and ``repeat:<r>``. Repeats run round-robin
    (baseline, each technique, ...) so that a shared machine's drift spreads over all.

    Args:
        task: The model, data, loss, optimizer factory and metric.
        budget: Training steps of the baseline; every training trial sees the same number
            of samples (``budget × batch_size``) unless the technique's point is to see
            fewer (early stopping, H3's sampler).
        techniques: Names from :func:`builtin_techniques` or :class:`Technique` objects
            (default: all built-in ones).
        repeats: Trials per technique; each figure's noise is their standard deviation.
        tolerance: How far (in metric units) below the baseline a technique's mean metric may
            fall and still be recommended.
        segments: Each trial is logged to the daemon as this many epochs (η per segment;
            the early-stopping rule and H3's phases work on them).
        combine: Techniques to combine instead of the greedy choice of winners.
        out: Directory for ``tune-<session>.json`` (rewritten after every trial), and at
            the end ``tune-<session>-report.md`` and ``tune-<session>-config.json``.
        session: Session id (default: 8 random hex digits).
        url: Daemon URL (default: discovered as ``H3Profiler`` does).
        token: Daemon token (default: discovered).
        data_dir: Daemon data dir (default: discovered).
        autostart: Start a local daemon when none answers.
        progress: ``progress(event, info)``, called as trials start and end (default: a
            line per event on stderr; None: silent).
        seed: Data-order seed of repeat 0 (repeat r uses ``seed + r``).
        inference_passes: Passes over the validation data per inference trial.
        max_batch_size: Upper bound for the batch-size finder (default: 8 × the task's
            batch, at most an eighth of the training set).
        count_flops: Count each configuration's FLOPs per step with
            ``torch.utils.flop_counter`` (one extra step on a copy; its first use imports
            ``torch._dynamo``, seconds on a slow machine).

    Raises:
        ValueError: A bad argument (budget, repeats, tolerance, segments, technique, a
            session id that is not 1-64 of ``[A-Za-z0-9._-]``, or an ``out`` that is not
            a directory and cannot be made one).
        ConnectionError: No daemon answers (and none could be started, with
            ``autostart``): raised before the first trial, as every figure is the daemon's.

    Returns:
        The :class:`TuneResult`. On Ctrl-C (KeyboardInterrupt) the session stops cleanly:
        the interrupted trial's run is finished as ``failed``, every finished trial is kept
        and written, and the result comes back with ``interrupted=True``.

    Example:
        >>> result = tune(make_task(), budget=100, techniques=["amp_bf16", "early_stop"])  # doctest: +SKIP
        >>> print(format_report(result))  # doctest: +SKIP
    """
    if budget < 1:
        raise ValueError(f"Invalid budget: {budget}")
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats}")
    if not (math.isfinite(tolerance) and tolerance >= 0):  # NaN would refuse nothing
        raise ValueError(f"Invalid tolerance: {tolerance}")
    if segments < 1:
        raise ValueError(f"Invalid segments: {segments}")
    emit = progress or _noop
    techs = _resolve(techniques)
    by_name = {t.name: t for t in techs}
    if combine is not None:
        unknown = [c for c in combine if c not in by_name]
        if unknown:
            raise ValueError(f"combine names techniques not in this session: {unknown}")
        inference = [c for c in combine if by_name[c].kind == "inference"]
        if inference:  # measured on the trained baseline: nothing to train together
            raise ValueError(f"combine takes training techniques, not {inference} (inference)")
    session = session or uuid.uuid4().hex[:8]
    if not _SESSION_ID.fullmatch(session):  # it names files in ``out`` and a run tag
        raise ValueError(
            f"Invalid session id {session!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    out_dir = None if out is None else Path(out)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out {str(out)!r} is not a directory")  # before the daemon check
    _require_daemon(url, token, data_dir, autostart)
    if out_dir is not None:  # made once a daemon answers (none: nothing written), before trials
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot make the output directory {str(out)!r}: {exc}") from None
    runs = _DaemonRuns(url, token, data_dir, autostart)
    env = probe_env(task)
    result = TuneResult(
        session=session,
        task=task.name,
        budget_steps=budget,
        repeats=repeats,
        tolerance=tolerance,
        metric_name=task.metric_name,
        device=str(env.device),
        tags=["h3-tune", f"tune:{session}"],
        out_dir=None if out is None else str(out),
    )

    def save() -> None:
        if out_dir is not None:
            _write_json(out_dir / f"tune-{session}.json", result.to_json())

    budget_samples = budget * task.batch_size
    planned: list[tuple[str, dict[str, Any], str]] = []
    try:
        for t in techs:
            s = _settings(t, task, env, max_batch_size, result.notes)
            if isinstance(s, str):
                result.skipped[t.name] = s
                emit("skip", {"technique": t.name, "reason": s})
                continue
            if t.note and t.name not in result.notes:
                result.notes[t.name] = t.note
            planned.append((t.name, s, t.kind))
        save()
        n_inf = sum(1 for _n, _s, k in planned if k == "inference")
        per_repeat = 1 + len(planned) + (1 if n_inf else 0)
        total = per_repeat * repeats
        emit("start", {"session": session, "planned": total, "tags": result.tags})
        index = 0

        def one(name: str, settings: dict[str, Any], kind: str, r: int, model: Any = None) -> Any:
            nonlocal index
            index += 1
            emit(
                "trial_start",
                {"technique": name, "repeat": r, "index": index, "planned": total},
            )
            tags = [*result.tags, f"technique:{name}", f"repeat:{r}"]
            run_name = f"tune {session} {name} #{r}"
            _interrupt.check()  # between trials too
            trial = Trial(name, r, settings, kind)
            trained = None
            try:
                if kind == "inference":
                    m = model if name == FP32_INFERENCE else quantize_int8(model)
                    trial.outcome = run_inference(
                        task, m, runs, name=run_name, tags=tags, passes=inference_passes
                    )
                else:
                    cfg = TrialConfig().merged(settings)
                    trial.outcome, trained = run_trial(
                        task,
                        cfg,
                        runs,
                        name=run_name,
                        tags=tags,
                        budget_samples=budget_samples,
                        segments=segments,
                        seed=seed + r,
                        flops=count_flops,
                    )
            except Exception as exc:  # one technique failing (e.g. compile) ends only its trial
                logger.warning("h3-tune: %s failed: %r", name, exc)
                trial.error = f"{type(exc).__name__}: {exc}"[:500]
            result.trials.append(trial)
            save()
            emit(
                "trial_end",
                {"technique": name, "repeat": r, "outcome": trial.outcome, "error": trial.error},
            )
            return trained

        for r in range(repeats):
            base_model = one(BASELINE, {}, "training", r)
            for name, s, kind in planned:
                if kind == "training":
                    one(name, s, kind, r)
            if n_inf and base_model is not None:
                cpu_model = base_model.cpu()
                one(FP32_INFERENCE, {}, "inference", r, cpu_model)
                for name, s, kind in planned:
                    if kind == "inference":
                        one(name, s, kind, r, cpu_model)

        _interrupt.check()  # a Ctrl-C during the last trial's close
        from h3optim.tune.report import summarize, verdicts

        rows = {row.technique: row for row in summarize(result)}
        v = verdicts(result)
        settings_of = {n: s for n, s, k in planned if k == "training"}
        if combine is not None:
            named = [c for c in combine if c in settings_of]
            chosen, merged, left = greedy_combination(named, settings_of, by_name)
            # a named technique that does not apply here (bf16 on a CPU without it) ran no
            # trial: left out, with why
            left = [
                f"{c} (not applicable: {result.skipped.get(c, 'no trial')})"
                for c in combine
                if c not in settings_of
            ] + left
        else:
            winners = [n for n in settings_of if v.get(n, ("",))[0] == "winner"]
            winners.sort(key=lambda n: -(rows[n].eta.mean or 0.0))
            chosen, merged, left = greedy_combination(winners, settings_of, by_name)
        result.combination = chosen
        if len(chosen) >= 2:
            result.combination_note = f"combined {' + '.join(chosen)}" + (
                f"; left out {'; '.join(left)}" if left else ""
            )
            emit("combine", {"note": result.combination_note})
            total += repeats
            for r in range(repeats):
                one(COMBINED, merged, "training", r)
        elif combine is not None:  # the caller's names, not winners: say what became of them
            kept = f"one technique left ({chosen[0]}, trained alone above)" if chosen else ""
            result.combination_note = (
                f"--combine {', '.join(combine)}: {kept or 'no technique left'}"
                + (f"; left out {'; '.join(left)}" if left else "")
                + ": nothing to combine"
            )
        elif len(chosen) == 1:
            result.combination_note = (
                f"only {chosen[0]} won: it was verified alone, nothing to combine"
            )
        else:
            result.combination_note = "no technique beat the baseline within tolerance"
        emit("combine", {"note": result.combination_note})
    except KeyboardInterrupt:
        result.interrupted = True
        emit("interrupted", {"kept": sum(1 for t in result.trials if t.outcome is not None)})
    result.finished_at = time.time()
    save()
    if out_dir is not None:
        from h3optim.tune.report import format_report, recommendation

        (out_dir / f"tune-{session}-report.md").write_text(format_report(result) + "\n")
        _write_json(out_dir / f"tune-{session}-config.json", recommendation(result))
    return result


_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a Ctrl-C mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False, default=str))
    os.replace(tmp, path)


def _finite(o: Any) -> Any:
    """NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
