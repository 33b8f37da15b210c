"""Where `h3d serve`'s start goes, step by step, in this tree and another, side by side.

benchmarks/startup.py times whole starts (spawn to a healthy /healthz): on a shared 2-core
host their medians move by tens of milliseconds from run to run, more than most start-up
changes save. This script times the steps of one start inside the daemon's own process,
where the host's noise is the steps' own: each child runs ``h3d serve --port 0`` on a store
at head, with a timer wrapped around each step ``cmd_serve`` takes, and exits once uvicorn
has started (the app's lifespan included: what stands between the spawn and the first
answer). Children of the two trees alternate, and the table gives each step's median over
the rounds, in milliseconds:

- settings: the flags and H3D_* variables validated (pydantic's import, ``h3d.config``);
- lock: the data dir made private and locked; early readings: the power backends built
  and their sampling thread started;
- engine: the store's engine (SQLAlchemy's import); fastapi: its import, with its models
  deferred; uvicorn: its import; app module: ``import h3d.app`` (the API's schemas, routes
  and the storage models);
- store checks: integrity, schema and a probe write; node lease: claimed in the store;
- create_app: the FastAPI app and its routes built; server start: uvicorn's start-up,
  the app's lifespan (store, devices, sampler, reaper, daemon.json) included.

``--baseline DIR``: another checkout (``git archive <commit> | tar -x -C DIR``). The steps are
found by name in each tree's ``h3d.cli``; a step a tree lacks is left out of its total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import add_out, command, machine, write_report
from benchmarks.startup import child_env, trees_of

# Run in the child, in the tree on its PYTHONPATH: time each step of `h3d serve`.
CHILD = r"""
import json, sys, time
clock = time.perf_counter
marks = [("start", clock())]

def mark(name):
    marks.append((name, clock()))

from h3d import cli
mark("import h3d.cli")

def timed(owner, name, label):
    fn = getattr(owner, name, None)
    if fn is None:
        return
    def wrapper(*a, **k):
        out = fn(*a, **k)
        mark(label)
        return out
    setattr(owner, name, wrapper)

for name, label in (
    ("_settings", "settings"),
    ("_lock_data_dir", "lock"),
    ("_early_readings", "early readings"),
    ("_engine", "engine"),
    ("_claim_node", "node lease"),
):
    timed(cli, name, label)

def after_fastapi():
    fastapi_import()
    mark("fastapi")
    import uvicorn
    mark("uvicorn")
    import h3d.app
    mark("app module")
    timed(h3d.app, "create_app", "create_app")
    from h3d.storage import migrate
    migrate_first = getattr(migrate, "check_integrity")
    def checks(*a, **k):
        marks.append(("(before store checks)", clock()))
        return migrate_first(*a, **k)
    migrate.check_integrity = checks
    timed(migrate, "probe_write", "store checks")
    started = uvicorn.Server.startup
    async def startup(self, sockets=None):
        await started(self, sockets=sockets)
        mark("server start")
        self.should_exit = True
    uvicorn.Server.startup = startup

fastapi_import = cli._import_fastapi_deferred
cli._import_fastapi_deferred = after_fastapi
cli.main(["serve", "--port", "0", "--log-level", "WARNING"])
steps = {}
for (_, t0), (name, t1) in zip(marks, marks[1:]):
    if not name.startswith("("):
        steps[name] = steps.get(name, 0.0) + 1000 * (t1 - t0)
steps["total"] = 1000 * (marks[-1][1] - marks[0][1])
print("STEPS " + json.dumps(steps))
"""

ORDER = [
    "import h3d.cli",
    "settings",
    "lock",
    "early readings",
    "engine",
    "fastapi",
    "uvicorn",
    "app module",
    "store checks",
    "node lease",
    "create_app",
    "server start",
    "total",
]


def one_start(tree: Path, env: dict[str, str], data_dir: Path) -> dict[str, float]:
    env = {**env, "H3D_DATA_DIR": str(data_dir), "H3D_POWER_BACKENDS": "estimated"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("STEPS ")), None)
    if line is None:
        raise SystemExit(f"a start in {tree} gave no timings:\n{r.stdout}\n{r.stderr}")
    steps: dict[str, float] = json.loads(line.removeprefix("STEPS "))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(prog="startup_phases.py", description=__doc__)
    ap.add_argument("--rounds", type=int, default=15, help="starts of each tree")
    ap.add_argument("--baseline", type=Path, help="another checkout, measured alongside")
    add_out(ap, "startup_phases.md")
    args = ap.parse_args()
    trees = trees_of(args.baseline)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pycache = Path(tmp) / "pycache"
        envs = {t: child_env(tree, pycache) for t, tree in trees.items()}
        dirs = {t: Path(tmp) / f"data-{i}" for i, t in enumerate(trees)}
        for t, tree in trees.items():  # bytecode compiled, the store made and at head
            one_start(tree, envs[t], dirs[t])
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        names = list(trees)
        for i in range(args.rounds):
            k = i % len(names)
            for t in names[k:] + names[:k]:
                runs[t].append(one_start(trees[t], envs[t], dirs[t]))
                print(f"round {i + 1}/{args.rounds}: {t} {runs[t][-1]['total']:.0f} ms", flush=True)
    load1 = os.getloadavg()[0]
    lines = [
        "# `h3d serve`'s start, step by step",
        "",
        f"`{command(ap, args)}` ({machine()}); load average {load0:.1f} at the start, "
        f"{load1:.1f} at the end. {args.rounds} starts of each tree on a store at head, in "
        "turn; each step's median over them, in ms of wall time inside the daemon's process "
        "(from the interpreter's first line of `h3d`, so the interpreter's own start is not "
        "in the total).",
        "",
        "| step | " + " | ".join(trees) + (" | change |" if len(trees) == 2 else ""),
        "|---|" + "---:|" * (len(trees) + (len(trees) == 2)),
    ]
    for step in ORDER:
        meds = [
            statistics.median(r[step] for r in runs[t]) if all(step in r for r in runs[t]) else None
            for t in trees
        ]
        cells = ["—" if m is None else f"{m:.1f}" for m in meds]
        if len(trees) == 2:
            a, b = meds
            cells.append("—" if a is None or b is None else f"{b - a:+.1f}")
        name = f"**{step}**" if step == "total" else step
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
