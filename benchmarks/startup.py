"""Start-up cost: `h3d serve` to a healthy /healthz, and where its import time goes.

DESIGN.md §8: `h3d serve` to a healthy `/healthz` ≤ 0.5 s (autostart from a training script
waits for it). `import h3client` is measured by benchmarks/client_overhead.py.

Measured side by side in one run: a bare interpreter (`python -c pass`), `import h3d.cli`
(what every `h3d` command pays) and `import h3d.app` (what `serve` pays before it binds),
each as process wall time, interleaved; then `python -X importtime` for the heaviest
top-level packages of `import h3d.app`; then spawn-to-healthy of a real `h3d serve`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import REPO, cold_start_s, machine

ARMS = {
    "bare interpreter (`python -c pass`)": "pass",
    "`import h3d.cli` (every h3d command)": "import h3d.cli",
    "`import h3d.app` (serve, before binding)": "import h3d.app",
}


def wall_s(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env())
    return time.perf_counter() - t0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


PACKAGES = ("fastapi", "sqlalchemy", "alembic", "uvicorn", "pydantic_settings", "httpx", "psutil")


def heaviest_imports(code: str) -> list[tuple[str, float]]:
    """Cumulative import time (ms) of the big libraries, from one `-X importtime` run: each
    module is reported once, at its first import, with everything it pulled in."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    cumulative: dict[str, float] = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) in PACKAGES + ("h3d.app",):
            cumulative[m.group(2)] = int(m.group(1)) / 1000.0
    return sorted(cumulative.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/startup.md"))
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in ARMS}
    for i in range(args.repeats):
        order = list(ARMS.items())
        k = i % len(order)
        for name, code in order[k:] + order[:k]:  # rotate the order every round
            times[name].append(wall_s(code))
    heavy = heaviest_imports("import h3d.app")
    starts = [cold_start_s() for _ in range(max(3, args.repeats // 2))]
    bare = statistics.median(times[next(iter(ARMS))])
    lines = [
        "# Start-up: `h3d serve` to healthy, and its imports",
        "",
        f"`PYTHONPATH=. python benchmarks/startup.py --repeats {args.repeats}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}; load average "
        f"{os.getloadavg()[0]:.1f} when it finished.",
        "",
        "| process | median wall ms | over the bare interpreter |",
        "|---|---:|---:|",
    ]
    for name, xs in times.items():
        med = statistics.median(xs)
        lines.append(f"| {name} | {med * 1000:.0f} | +{(med - bare) * 1000:.0f} ms |")
    lines += [
        "",
        "Libraries `import h3d.app` loads (`python -X importtime`, cumulative ms, one run; the "
        "first to import a shared dependency such as pydantic carries it):",
        "",
        "| module | ms |",
        "|---|---:|",
        *(f"| {pkg} | {ms:.0f} |" for pkg, ms in heavy),
        "",
        f"**`h3d serve` spawn to healthy `/healthz`** ({len(starts)} starts, fresh data dir, "
        f"estimated CPU backend): median {statistics.median(starts):.2f} s "
        f"(min {min(starts):.2f}, max {max(starts):.2f}); budget 0.5 s.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
