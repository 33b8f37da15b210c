"""``h3-report`` and the audit log: a CSV per run that people and tools can read.

    h3-report --run RUN [--baseline RUN]         a run from the daemon
    h3-report --h3-log FILE [--baseline-log F]   a ThermoAuditLogger CSV
    h3-report --compare A B C ...                runs and/or audit-log CSVs side by side
    h3-report --tune SESSION                     an h3-tune session, grouped by technique

RUN is a run id, a run name (the newest run of that name) or a unique id prefix, as in every
``h3d`` command; an ambiguous prefix lists its candidates.

The Green Score is the baseline's energy over this run's energy (> 1: this run used less),
shown only when final accuracies are within ``--tolerance`` points; otherwise the two runs
did not buy the same thing and the ratio would flatter the cheaper one.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from h3client._report import _f, format_report, shown

COLUMNS = (
    "epoch",
    "t",
    "phase",
    "loss",
    "val_loss",
    "accuracy",
    "energy_j",
    "eta_bits_per_j",
    "keep_frac",
    "uniform_mix",
    "samples",
    "extra",
)


class ThermoAuditLogger:
    """Append one CSV row per epoch: what the run did, what it cost, what it learned.

    Args:
        name: Run name; the file is ``<log_dir>/<name>-<timestamp>.csv`` (``-2``, ``-3``, ...
            before ``.csv`` when a logger of the same name took it in the same second).
        metadata: Free-form facts (data set, hardware) written as a header comment.
        config: Hyperparameters, written as a header comment.
        log_dir: Where the file goes (created if missing).
    """

    def __init__(
        self,
        name: str,
        metadata: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        *,
        log_dir: str | Path = "h3_audit_logs",
    ) -> None:
        self.name = name
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path, f = _new_file(directory, f"{name}-{stamp}")
        with f:
            f.write(f"# h3 audit log: {json.dumps({'name': name})}\n")
            f.write(f"# metadata: {json.dumps(metadata or {}, default=str)}\n")
            f.write(f"# config: {json.dumps(config or {}, default=str)}\n")
            csv.writer(f).writerow(COLUMNS)

    def log_epoch(
        self,
        epoch: int,
        *,
        loss: float | None = None,
        val_loss: float | None = None,
        accuracy: float | None = None,
        energy_j: float | None = None,
        eta_bits_per_j: float | None = None,
        phase: str | None = None,
        keep_frac: float | None = None,
        uniform_mix: float | None = None,
        samples: int | None = None,
        **extra: Any,
    ) -> None:
        """Append one epoch. Unknown keyword figures go to the ``extra`` JSON column."""
        row = [
            epoch,
            repr(time.time()),
            phase or "",
            *(
                "" if v is None else repr(float(v))
                for v in (loss, val_loss, accuracy, energy_j, eta_bits_per_j)
            ),
            *("" if v is None else repr(float(v)) for v in (keep_frac, uniform_mix)),
            "" if samples is None else int(samples),
            json.dumps(extra, default=str) if extra else "",
        ]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)

    def get_path(self) -> Path:
        return self.path


def _new_file(directory: Path, stem: str) -> tuple[Path, Any]:
    """``<stem>.csv``, or ``<stem>-2.csv``, ``-3``, ... when another logger (a seed sweep, a
    second rank) took the name in the same second: created, never truncated."""
    for k in itertools.count(1):
        path = directory / (f"{stem}.csv" if k == 1 else f"{stem}-{k}.csv")
        try:
            return path, open(path, "x", newline="")  # noqa: SIM115 (the caller closes it)
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class NotAnAuditLog(ValueError):
    """A file given as an audit log that is not one a :class:`ThermoAuditLogger` writes (no
    header row or not its columns, a cell that is not a number, bytes that are not text)."""


#: The columns a row's figures are read from: a file without them is not an audit log.
_NUMBERS = frozenset(COLUMNS) - {"epoch", "samples", "phase", "extra"}


def read_audit_log(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header: name/metadata/config, rows with numbers parsed) of an audit CSV.

    Raises:
        NotAnAuditLog: (a ``ValueError``) the file is not an audit log, saying why, with the
            file's name (and the row, for a bad cell): a CSV of other columns (an ``h3d
            export``), an empty file, a cell that is not a number, bytes that are not text.
        OSError: the file cannot be read.
    """
    header: dict[str, Any] = {}
    body: list[str] = []
    try:
        with open(path, newline="") as f:  # the encoding the logger wrote it in
            for line in f:
                if line.startswith("# "):
                    key, _, value = line[2:].partition(": ")
                    try:
                        header[key.strip()] = json.loads(value)
                    except ValueError:
                        header[key.strip()] = value.strip()
                else:
                    body.append(line)
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise NotAnAuditLog(
            f"{path} is not an H3 audit log: not {exc.encoding} text "
            f"(byte {byte:#04x} at offset {exc.start})"
        ) from None
    rows = []
    try:
        reader = csv.DictReader(body)
        if not reader.fieldnames:  # an empty file, or comments only
            raise NotAnAuditLog(f"{path} is not an H3 audit log: it has no header row")
        missing = [c for c in COLUMNS if c not in reader.fieldnames]
        if missing:
            raise NotAnAuditLog(
                f"{path} is not an H3 audit log: no {', '.join(missing)} column"
                f"{'s' if len(missing) > 1 else ''}"
            )
        for i, r in enumerate(reader, start=1):
            if None in r:  # more cells than the header names
                raise NotAnAuditLog(f"{path}, row {i}: more cells than the header has columns")
            rows.append(_parse_row(r, f"{path}, row {i}"))
    except csv.Error as exc:  # a NUL byte, an unterminated quote at the end
        raise NotAnAuditLog(f"{path} is not an H3 audit log: {exc}") from None
    return header, rows


def _parse_row(r: dict[str, str | None], where: str) -> dict[str, Any]:
    """One CSV row's figures; columns a later logger may add are kept as text."""
    row: dict[str, Any] = {}
    for k, v in r.items():
        try:
            if k == "phase":
                row[k] = v or None
            elif k == "extra":
                row[k] = json.loads(v) if v else {}
            elif k in ("epoch", "samples"):
                row[k] = int(v) if v else None
            elif k in _NUMBERS:
                row[k] = float(v) if v else None
            else:
                row[k] = v
        except ValueError:
            what = {"extra": "JSON", "epoch": "a whole number", "samples": "a whole number"}
            raise NotAnAuditLog(f"{where}: {k} {v!r} is not {what.get(k, 'a number')}") from None
    return row


def _log_name(header: dict[str, Any]) -> str:
    """The run name the log's ``# h3 audit log`` line holds, or ``?``."""
    info = header.get("h3 audit log")
    return str(info.get("name", "?")) if isinstance(info, dict) else "?"


def assess(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The heuristic assessment (starvation / aggressive / moderate / conservative) and why."""
    keeps = [r["keep_frac"] for r in rows if r.get("keep_frac") is not None]
    mixes = [r["uniform_mix"] for r in rows if r.get("uniform_mix") is not None]
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    if not keeps:
        return "conservative", "no data selection was logged (every sample every epoch)"
    mean_keep = sum(keeps) / len(keeps)
    min_mix = min(mixes) if mixes else 1.0
    scale = 100.0 if accs and max(accs) <= 1.0 else 1.0  # fractions or percentages
    fall = (max(accs) - accs[-1]) * scale if accs else 0.0
    dropped = fall > 1.0
    if (mean_keep < 0.3 or min_mix < 0.05) and dropped:
        return "starvation", (
            f"mean keep_frac {mean_keep:.2f}, min uniform_mix {min_mix:.2f}, and accuracy fell "
            f"{fall:.2f} points from its best: part of the data is being starved"
        )
    if mean_keep < 0.5:
        return "aggressive", f"mean keep_frac {mean_keep:.2f}: most samples are skipped each epoch"
    if mean_keep < 0.85:
        return "moderate", f"mean keep_frac {mean_keep:.2f}"
    return "conservative", f"mean keep_frac {mean_keep:.2f}: close to full-data training"


ADVICE = {
    "starvation": "raise uniform_mix (≥ 0.2) or keep_frac, or use mode='safe'",
    "aggressive": "check accuracy against a full-data baseline before keeping these settings",
    "moderate": "a reasonable trade-off; try mode='green' if accuracy holds",
    "conservative": "little energy saved: try mode='balanced' or a lower keep_frac",
}


def _summary_from_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    acc = next((r["accuracy"] for r in reversed(rows) if r.get("accuracy") is not None), None)
    energies = [r["energy_j"] for r in rows if r.get("energy_j") is not None]
    return {
        "epochs": len(rows),
        "final_accuracy": acc,
        "energy_j": sum(energies) if energies else None,
        "final_loss": next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None),
    }


def green_score(
    run: dict[str, Any], baseline: dict[str, Any], tolerance: float = 1.0
) -> tuple[float | None, str]:
    """(baseline energy / run energy, explanation); None when it cannot be fairly computed."""
    e, eb = run.get("energy_j"), baseline.get("energy_j")
    a, ab = run.get("final_accuracy"), baseline.get("final_accuracy")
    if not e or not eb:
        return None, "energy unknown for one of the runs"
    ratio = eb / e
    if a is None or ab is None:
        return ratio, "accuracy unknown: the ratio compares energy only"
    scale = 100.0 if max(a, ab) <= 1.0 else 1.0  # fractions or percentages
    gap = (a - ab) * scale
    if not abs(gap) <= tolerance:  # a NaN gap or tolerance compares nothing: not comparable
        return None, f"accuracies differ by {gap:+.2f} points (> {tolerance}): not comparable"
    return ratio, f"accuracy within {gap:+.2f} points of the baseline"


def explain_thermo_log(
    path: str | Path, baseline_path: str | Path | None = None, *, tolerance: float = 1.0
) -> str:
    """A plain-language reading of an audit log: metrics, phases, assessment, verdict.

    With ``baseline_path``, the Green Score against that log, shown only when the final
    accuracies are within ``tolerance`` points (as ``h3-report --tolerance``)."""
    header, rows = read_audit_log(path)
    s = _summary_from_rows(rows)
    kind, why = assess(rows)
    out = [
        f"H3 audit log {shown(Path(path).name)} ({shown(_log_name(header))})",
        f"  epochs {s['epochs']}, final accuracy {_f(s['final_accuracy'])}, "
        f"final loss {_f(s['final_loss'])}, energy {_f(s['energy_j'], ' J')}",
    ]
    phases: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        phases.setdefault(r.get("phase") or "-", []).append(r)
    for name, rs in phases.items():
        e = sum(r["energy_j"] or 0.0 for r in rs)
        out.append(f"  phase {shown(name):<15} {len(rs):>4} epochs  {_f(e, ' J')}")
    out.append(f"  assessment: {kind} — {why}")
    if baseline_path is not None:
        _bh, brows = read_audit_log(baseline_path)
        score, note = green_score(s, _summary_from_rows(brows), tolerance)
        out.append(f"  Green Score: {_f(score)} ({note})")
    out.append(f"  verdict: {ADVICE[kind]}")
    return "\n".join(out)


def _run_summary(rep: dict[str, Any]) -> dict[str, Any]:
    acc = next((e["accuracy"] for e in reversed(rep["epochs"]) if e["accuracy"] is not None), None)
    return {"energy_j": rep["energy"]["energy_j"], "final_accuracy": acc}


def _assessment_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "keep_frac": (e.get("metrics") or {}).get("keep_frac"),
            "uniform_mix": (e.get("metrics") or {}).get("uniform_mix"),
            "accuracy": e["accuracy"],
        }
        for e in rep["epochs"]
    ]


def _is_audit_log(ref: str) -> bool:
    """An argument of ``--compare`` names an audit log if it is a path (holds a separator:
    ``./beta``, ``logs/run.csv``) or a ``.csv`` file that exists; anything else is a run,
    resolved as every ``h3d`` command resolves it (a notes file named like a run in the
    current directory does not shadow the run)."""
    seps = [s for s in ("/", os.sep, os.altsep) if s]
    return any(s in ref for s in seps) or (ref.lower().endswith(".csv") and Path(ref).is_file())


def _compare_row(c: Any, ref: str) -> dict[str, Any]:
    """One row of ``--compare``: from an audit-log CSV, or from a run on the daemon."""
    if _is_audit_log(ref):
        if not Path(ref).is_file():
            raise FileNotFoundError(f"no audit log at {ref}")
        header, rows = read_audit_log(ref)
        s = _summary_from_rows(rows)
        # η = bits over joules, as a run's: each epoch's bits (η × energy) over the energy of
        # the epochs that have both; a mean of the epochs' η weighed a 10 J epoch as 1000 J
        both = [
            (r["eta_bits_per_j"], r["energy_j"])
            for r in rows
            if r.get("eta_bits_per_j") is not None and r.get("energy_j") is not None
        ]
        joules = sum(e for _eta, e in both)
        return {
            "source": Path(ref).name,
            "name": _log_name(header),
            "energy_j": s["energy_j"],
            "info_gain_bits": None,
            "eta_bits_per_j": sum(eta * e for eta, e in both) / joules if joules > 0 else None,
            "final_accuracy": s["final_accuracy"],
            "assessment": assess(rows)[0],
        }
    from h3client.errors import H3HTTPStatusError

    try:
        run = c.resolve_run(ref)
    except H3HTTPStatusError as exc:
        if exc.code == "run_not_found" and ref.lower().endswith(".csv"):
            raise FileNotFoundError(f"no audit log at {ref}, and no run of that name") from None
        raise
    rep = c.report(run["id"])
    return {
        "source": run["id"],
        "name": run["name"],
        "energy_j": rep["energy"]["energy_j"],
        "info_gain_bits": rep["eta"]["info_gain_bits"],
        "eta_bits_per_j": rep["eta"]["eta_bits_per_j"],
        "final_accuracy": _run_summary(rep)["final_accuracy"],
        "assessment": assess(_assessment_rows(rep))[0],
    }


def _print_compare(rows: list[dict[str, Any]], tolerance: float) -> None:
    print(
        f"{'run or log':<34} {'name':<20} {'energy J':>10} {'ΔI bits/sample':>14} {'η bits/J':>10} "
        f"{'acc':>7}  {'assessment':<12} Green Score vs first"
    )
    for i, r in enumerate(rows):
        score = "baseline" if i == 0 else _f(green_score(r, rows[0], tolerance)[0])
        print(
            f"{shown(r['source'])[:34]:<34} {shown(r['name'])[:20]:<20} {_f(r['energy_j']):>10} "
            f"{_f(r['info_gain_bits']):>14} {_f(r['eta_bits_per_j']):>10} "
            f"{_f(r['final_accuracy']):>7}  {r['assessment']:<12} {score}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    # A stdout whose codec cannot hold η or ΔI (a redirect on Windows, PYTHONIOENCODING=cp1252)
    # shows them as '?', not a UnicodeEncodeError traceback after half a report.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that left shows here, not as an error at exit
        return code
    except BrokenPipeError:  # `h3-report --run RUN | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1


def _tolerance(text: str) -> float:
    """``--tolerance``: a finite number of points >= 0. NaN compared as "within" for every
    pair of runs (a Green Score for a run 10 points worse), a negative one as within for none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _main(argv: Sequence[str] | None) -> int:
    from h3client._config import resolve
    from h3client.client import Client
    from h3client.errors import H3ClientError, H3HTTPStatusError

    p = argparse.ArgumentParser(prog="h3-report", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)  # one report at a time
    mode.add_argument("--run", help="a run: id, name (newest of that name) or unique id prefix")
    p.add_argument("--baseline", help="a baseline run (for the Green Score), named like --run")
    mode.add_argument("--h3-log", help="a ThermoAuditLogger CSV")
    p.add_argument("--baseline-log", help="a baseline audit CSV (for the Green Score)")
    mode.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_OR_CSV",
        help="runs and/or audit-log CSVs side by side (an audit log: a path with a '/', or an "
        "existing .csv file; anything else is a run)",
    )
    mode.add_argument("--tune", metavar="SESSION", help="an h3-tune session's runs, grouped")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1.0,
        help="accuracy points for the Green Score (a finite number >= 0; default 1)",
    )
    p.add_argument("--url", help="daemon URL (default: discovered)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    if args.baseline is not None and args.run is None:
        p.error("argument --baseline: only with --run")
    if args.baseline_log is not None and args.h3_log is None:
        p.error("argument --baseline-log: only with --h3-log")
    try:
        if args.h3_log:
            print(explain_thermo_log(args.h3_log, args.baseline_log, tolerance=args.tolerance))
            return 0
        if args.compare and all(_is_audit_log(r) for r in args.compare):
            rows = [_compare_row(None, r) for r in args.compare]  # no daemon needed
        else:
            with Client(args.url) as c:
                if args.tune:
                    from h3client._tune_report import print_tune_session

                    return print_tune_session(c, args.tune, as_json=args.json)
                if args.compare:
                    rows = [_compare_row(c, r) for r in args.compare]
                else:
                    return _report_run(c, args)
        if args.json:
            print(json.dumps({"runs": rows}, indent=2))
        else:
            _print_compare(rows, args.tolerance)
    except H3HTTPStatusError as exc:
        if exc.status_code != 401:
            print(f"h3-report: {shown(exc)}", file=sys.stderr)
        else:  # say whose token and what to do, not just "401"
            cfg = resolve(args.url)
            if cfg.token_is_explicit:  # the token was H3D_TOKEN's, not the data dir's
                why = (
                    "refuses the token in H3D_TOKEN; give that daemon's token there, or unset "
                    f"H3D_TOKEN to use the token of data dir {cfg.data_dir}"
                )
            else:
                why = (
                    f"refuses the token of data dir {cfg.data_dir}: it serves another data "
                    "dir; point H3D_DATA_DIR at that one, or give its token in H3D_TOKEN"
                )
            print(f"h3-report: the daemon at {cfg.url} {why}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # an OSError, but the reader left: main() stops quietly
        raise
    except (H3ClientError, OSError, NotAnAuditLog) as exc:
        print(f"h3-report: {shown(exc)}", file=sys.stderr)
        return 1
    return 0


def _report_run(c: Any, args: argparse.Namespace) -> int:
    rep = c.report(c.resolve_run(args.run)["id"])
    green: dict[str, Any] | None = None
    if args.baseline:
        base = c.report(c.resolve_run(args.baseline)["id"])
        score, note = green_score(_run_summary(rep), _run_summary(base), args.tolerance)
        green = {"baseline": base["run"], "tolerance": args.tolerance, "score": score, "note": note}
    if args.json:  # the Green Score asked for is in the JSON too
        print(json.dumps(rep if green is None else {**rep, "green_score": green}, indent=2))
        return 0
    print(format_report(rep))
    if green is not None:
        print(f"  Green Score vs {shown(args.baseline)}: {_f(green['score'])} ({green['note']})")
    # Every run is assessed: one that logged no keep_frac trained on all data each epoch.
    kind, why = assess(_assessment_rows(rep))
    print(f"  assessment: {kind} — {why}\n  verdict: {ADVICE[kind]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
