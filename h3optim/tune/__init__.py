"""``h3optim.tune``: which training settings buy the most bits per joule on *your* model.

A baseline, each technique alone, then the winners combined; every trial a run in the h3d
daemon (tags ``h3-tune``, ``tune:<session>``, ``technique:<name>``), its energy read back
like any user script's. See ``docs/tune.md``.
"""

from __future__ import annotations

from h3optim.tune._measure import PeakMemory, count_flops
from h3optim.tune._train import Outcome, checkpoint_largest, finish_pruning, prune_structured
from h3optim.tune.report import code_for, format_report, recommendation, summarize, verdicts
from h3optim.tune.runner import Trial, TuneResult, tune
from h3optim.tune.task import Task, accuracy, load_task
from h3optim.tune.techniques import Technique, TrialConfig, builtin_techniques

__all__ = [
    "Outcome",
    "PeakMemory",
    "Task",
    "Technique",
    "Trial",
    "TrialConfig",
    "TuneResult",
    "accuracy",
    "builtin_techniques",
    "checkpoint_largest",
    "code_for",
    "count_flops",
    "finish_pruning",
    "format_report",
    "load_task",
    "prune_structured",
    "recommendation",
    "summarize",
    "tune",
    "verdicts",
]
