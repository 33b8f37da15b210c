"""``h3-tune path/to/file.py:make_task [--budget-steps N] [--repeats R] [--out DIR]``.

``h3-tune --report DIR/tune-<session>.json`` prints a saved session's report again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

from h3optim.tune._interrupt import deferred_sigint
from h3optim.tune.report import format_report
from h3optim.tune.runner import tune
from h3optim.tune.task import load_task
from h3optim.tune.techniques import builtin_techniques


def _tolerance(text: str) -> float:
    """``--tolerance``: a finite number >= 0. NaN compares as "within" for every drop, so a
    technique that lost accuracy would be recommended (and NaN is no JSON number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run a tuning session; exit 0, 2 on bad input, 1 when no daemon answers (nothing
    trained) or stdout closed early, 130 when interrupted (trials kept)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `h3-tune ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1


def _main(argv: Sequence[str] | None) -> int:
    names = list(builtin_techniques())
    p = argparse.ArgumentParser(
        prog="h3-tune",
        description="Measure which training settings buy the most bits per joule on your "
        "model: a baseline, each technique alone, the winners combined; every trial a run "
        "in the h3d daemon.",
    )
    p.add_argument(
        "task", nargs="?", help="path/to/file.py:factory (or module:factory) returning a Task"
    )
    p.add_argument("--report", metavar="JSON", help="print a saved session's report and exit")
    p.add_argument("--budget-steps", type=int, default=200, help="baseline training steps")
    p.add_argument("--repeats", type=int, default=1, help="trials per technique (noise)")
    p.add_argument("--out", default="h3-tune-out", help="directory for JSON and the report")
    p.add_argument(
        "--techniques",
        default=",".join(names),
        help=f"comma-separated subset of: {','.join(names)}",
    )
    p.add_argument("--combine", help="comma-separated techniques to combine (default: greedy)")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.01,
        help="allowed metric drop (a finite number >= 0)",
    )
    p.add_argument("--segments", type=_positive_int, default=6, help="epochs logged per trial")
    p.add_argument(
        "--session", help="session id: 1-64 of letters, digits, '.', '_', '-' (default: random)"
    )
    p.add_argument("--url", help="daemon URL (default: discovered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads before training")
    args = p.parse_args(argv)
    if args.report:
        from h3optim.tune.runner import TuneResult

        try:
            with open(args.report) as f:
                text = format_report(TuneResult.from_json(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"h3-tune: cannot read {args.report}: {exc}", file=sys.stderr)
            return 2
        print(text)  # outside: a closed stdout is not an unreadable file
        return 0
    if not args.task:
        p.error("give a task (path/to/file.py:factory) or --report JSON")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    techniques = [t for t in args.techniques.split(",") if t]
    try:
        task = load_task(args.task)
        with deferred_sigint():  # Ctrl-C stops at the next step, never swallowed
            result = tune(
                task,
                budget=args.budget_steps,
                techniques=techniques,
                repeats=args.repeats,
                tolerance=args.tolerance,
                segments=args.segments,
                combine=args.combine.split(",") if args.combine else None,
                out=args.out,
                session=args.session,
                url=args.url,
                seed=args.seed,
                count_flops=not args.no_flops,
            )
    except ValueError as exc:
        print(f"h3-tune: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # no daemon: tune() stopped before the first trial
        print(f"h3-tune: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output directory failed mid-session (disk full, removed)
        print(f"h3-tune: cannot write the session to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    print(f"\nwritten to {args.out}/tune-{result.session}*.json|md", file=sys.stderr)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
