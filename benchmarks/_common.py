"""What every benchmark shares: a real daemon on a loopback port, the machine's description,
and mean ± std formatting."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# Where a run's report goes unless ``--out`` says otherwise: git-ignored, so that no run replaces
# a committed results file in benchmarks/results/ (publishing one is ``--out`` by hand).
LOCAL_RESULTS = REPO / "benchmarks" / "results" / "local"


def add_out(ap: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH`` for a script's report, by default ``benchmarks/results/local/NAME``."""
    ap.add_argument(
        "--out",
        type=Path,
        default=LOCAL_RESULTS / name,
        help=f"the report (default: benchmarks/results/local/{name}, git-ignored; "
        f"publish with --out benchmarks/results/{name})",
    )


def command(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line that ran, for a report's header: the script and every option whose
    value differs from its default (``--out`` and ``--help`` left out)."""
    words = [f"PYTHONPATH=. python benchmarks/{ap.prog}"]
    for action in ap._actions:
        if not action.option_strings or action.dest in ("out", "help"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true and its kin
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(words)


def write_report(out: Path, lines: Sequence[str]) -> None:
    """Write a report's lines to ``out`` (making its directory) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", flush=True)


@contextlib.contextmanager
def daemon(data_dir: Path, *, poll_s: float = 0.05, **env: str) -> Iterator[tuple[str, str]]:
    """A real ``h3d serve`` on a free loopback port; yields (url, token), stops it after.

    A benchmark stopped with SIGTERM (``kill``, ``timeout``) stops its daemon too: the signal
    is turned into ``SystemExit`` so that the ``finally`` below runs."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    full = {k: v for k, v in os.environ.items() if not k.startswith("H3D_")}
    full.update(PYTHONPATH=str(REPO), H3D_DATA_DIR=str(data_dir), H3D_LOG_LEVEL="WARNING", **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "h3d", "serve", "--port", "0"], env=full, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                url = json.loads((data_dir / "daemon.json").read_text())["url"]
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except (FileNotFoundError, ValueError, KeyError, httpx.HTTPError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the daemon did not start") from None
                time.sleep(poll_s)
        yield url, (data_dir / "token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def daemon_client(**env: str) -> Iterator[httpx.Client]:
    """A real daemon on a temporary data dir (see :func:`daemon`) and a keep-alive client of
    it that sends its token."""
    import tempfile

    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon(Path(tmp), **env) as (url, token),
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as http,
    ):
        yield http


def bytecode_cached_env(pycache: Path, **extra: str) -> dict[str, str]:
    """This environment for a child interpreter whose bytecode is cached in ``pycache``, as
    after ``pip install`` (warm it with one run first): this machine's environment sets
    PYTHONDONTWRITEBYTECODE, under which a checkout's modules are compiled again at every
    import, which a start-up or import time would then count."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(pycache), **extra}


def cold_start_s() -> float:
    """Seconds from spawning ``h3d serve`` to a healthy /healthz (polled every 5 ms)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with daemon(Path(tmp), poll_s=0.005):
            return time.perf_counter() - t0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def short_rev(rev: str = "HEAD", *, check: bool = True) -> str:
    """``git rev-parse --short rev`` in this repository (with ``check=False``: "" if git
    cannot say)."""
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=check, capture_output=True, text=True
    ).stdout.strip()


def extract(rev: str, dest: Path, *paths: str) -> Path:
    """The files under ``paths`` as of git revision ``rev``, written under ``dest`` (made):
    another version of a package to import beside this tree's, for a side-by-side run."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", rev, *paths], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def machine() -> str:
    return f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"


def mean_std(xs: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` of the finite values ("–" when there are none)."""
    vals = [x for x in xs if x == x and abs(x) != float("inf")]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"
