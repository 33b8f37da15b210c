"""Start-up cost: `h3d serve` to a healthy /healthz, and where its import time goes.

DESIGN.md §8: `h3d serve` to a healthy `/healthz` ≤ 0.5 s (autostart from a training script
waits for it), `import h3client` ≤ 50 ms over a bare interpreter (also measured, with the
sender's costs, by benchmarks/client_overhead.py).

Measured side by side in one run, in rotating order:

- process wall and CPU time, to the end of the imports (the interpreter's teardown is
  skipped), of a bare interpreter, of the libraries the daemon cannot serve without
  (fastapi, SQLAlchemy's ORM, uvicorn), of `import h3d.cli` (what every `h3d` command
  pays), of `import h3d.cli, h3d.app` (what `serve` imports before it binds) and of
  `import h3client`;
- spawn of a real `h3d serve` to a healthy /healthz, on a fresh data dir (the first
  autostart: the store is created) and again on that data dir (every later start: the
  store is at head), with the CPU time the daemon had used when it first answered;
- the same for the floor daemon (benchmarks/_floor_daemon.py, this tree only): fastapi,
  SQLAlchemy's ORM and uvicorn serving one ORM table, a sync /healthz and one POST route
  with a pydantic body, and nothing of h3d: what no daemon on these libraries can start
  under on this machine;
- a training script's autostart: ``H3Profiler(...)`` on a fresh data dir where no daemon
  runs: how long the constructor takes (the script's wait before its first step), and
  how long until its one batch is stored and the run finished.

``--large-store-rows N`` adds starts on a store of N power-sample rows (20 000 000 make
0.9 GB): each tree's own copy, started again after a clean stop (the stop left it as it
was) and after a write by another program (its modification time moved), in turn.

``--baseline DIR`` measures another checkout (e.g. ``git archive <commit> | tar -x -C DIR``)
in the same rounds, so before and after share the machine's load.

Children run with their bytecode cached (in a temporary ``PYTHONPYCACHEPREFIX``, warmed up
first), as after ``pip install``: this machine's environment sets PYTHONDONTWRITEBYTECODE,
which would otherwise recompile every module of a checkout on every start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    REPO,
    add_out,
    bytecode_cached_env,
    command,
    machine,
    write_report,
)

ARMS = {
    "bare interpreter (`python -c pass`)": "pass",
    "libraries only: `import fastapi, sqlalchemy.orm, uvicorn`": (
        "import fastapi, sqlalchemy.orm, uvicorn"
    ),
    "the same, no cyclic GC during the imports (as `h3d serve` and the floor daemon)": (
        "import gc; gc.disable(); import fastapi, sqlalchemy.orm, uvicorn"
    ),
    "`import h3d.cli` (every h3d command)": "import h3d.cli",
    "`import h3d.cli, h3d.app` (serve, before binding)": "import h3d.cli, h3d.app",
    "`import h3client` (every training script; budget +50 ms)": "import h3client",
}
BARE, LIBS = list(ARMS)[:2]
FLOOR = "floor daemon (no h3d)"
PACKAGES = ("fastapi", "pydantic", "sqlalchemy", "alembic", "uvicorn", "httpx", "psutil")
SERVE = ["-m", "h3d", "serve", "--port", "0"]
FLOOR_DAEMON = [str(REPO / "benchmarks" / "_floor_daemon.py")]
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def trees_of(baseline: Path | None) -> dict[str, Path]:
    """The checkouts to measure: ``--baseline``'s first, if given, then this tree."""
    here = {"this tree": REPO}
    return {"baseline": baseline.resolve(), **here} if baseline is not None else here


def child_env(tree: Path, pycache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in bytecode_cached_env(pycache).items() if not k.startswith("H3D_")}
    return {**env, "PYTHONPATH": str(tree), **extra}


def run_s(code: str, tree: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``python -c code``, ended by ``os._exit(0)``: the interpreter's
    teardown (~0.3 s of CPU after the daemon's imports) is not part of a start."""
    t0 = time.perf_counter()
    code = f"{code}\nimport os\nos._exit(0)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tree, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    assert status == 0, code
    return wall, usage.ru_utime + usage.ru_stime


def _healthy(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def spawn_to_healthy(
    tree: Path, env: dict[str, str], data_dir: Path, args: list[str] = SERVE
) -> tuple[float, float]:
    """(seconds from spawning ``h3d serve`` (or ``python *args``) to a 200 from /healthz, the
    daemon's CPU seconds then); /healthz polled every 5 ms with the standard library (a light
    poller), at the URL the daemon wrote to ``<data dir>/daemon.json``."""
    daemon_file = data_dir / "daemon.json"
    daemon_file.unlink(missing_ok=True)
    env = {**env, "H3D_DATA_DIR": str(data_dir), "H3D_LOG_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=tree)
    try:
        deadline = t0 + 60
        while True:
            try:
                url = json.loads(daemon_file.read_text())["url"]
                if _healthy(url):
                    wall = time.perf_counter() - t0
                    return wall, _cpu_s(proc.pid)
            except (FileNotFoundError, ValueError, KeyError):
                pass
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise SystemExit(f"the daemon in {tree} did not start")
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()


AUTOSTART = """
import json, sys, time
from h3client import H3Profiler
t0 = time.perf_counter()
p = H3Profiler("autostart", data_dir=sys.argv[1])
t1 = time.perf_counter()
p.log_batch(1.0)
while time.perf_counter() - t1 < 1.0:  # a second of training, on one core
    pass
p.log_batch(0.5)
r = p.stop()
t2 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t0, r["batches_posted"], p.run_id]))
"""


def autostart(
    tree: Path, env: dict[str, str], data_dir: Path
) -> tuple[float, float, float, float, float]:
    """A training script's ``H3Profiler(...)`` on ``data_dir``, where no daemon runs (it
    autostarts one), then a second of CPU work: (seconds the constructor took, seconds from
    it to the run's batches stored and the run finished, at ``stop()``, the share of the
    run's duration its energy covers, its share of the device's energy and its energy in
    joules, as the daemon reports them). The daemon is stopped after."""
    from h3client import Client

    env = {**env, "H3D_LOG_LEVEL": "WARNING", "H3D_PORT": "9"}  # nothing on the default port
    out = subprocess.run(
        [sys.executable, "-c", AUTOSTART, str(data_dir)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    construct, stored, posted, run_id = json.loads(out.splitlines()[-1])
    info = json.loads((data_dir / "daemon.json").read_text())
    try:
        with Client(info["url"], data_dir=data_dir) as c:
            energy = c.energy(run_id)
    finally:
        os.kill(info["pid"], 15)
    if posted != 2:
        raise SystemExit(f"the profiler in {tree} did not reach the daemon it started")
    (device,) = energy["by_device"]
    covered = device["covered_s"] / energy["duration_s"]
    share = energy["energy_j"] / device["device_energy_j"]
    return construct, stored, covered, share, energy["energy_j"]


def large_store(tree: Path, env: dict[str, str], data_dir: Path, rows: int) -> None:
    """A data dir whose store holds ``rows`` power samples of one device (made by a first
    start of ``tree``'s daemon, then filled with sqlite3 directly: 20 million take ~30 s)."""
    import sqlite3

    spawn_to_healthy(tree, env, data_dir)
    conn = sqlite3.connect(data_dir / "h3d.db")
    conn.execute(
        "INSERT INTO devices (id, node, name, kind, source, model, first_seen, last_seen) "
        "VALUES (1000, 'bench-node', 'bench-cpu', 'cpu', 'estimated', '', 0, 0)"
    )
    step = 500_000
    for start in range(0, rows, step):
        chunk = range(start, min(rows, start + step))
        conn.executemany(
            "INSERT INTO power_samples VALUES (1000, ?, 50.0, ?)",
            ((i * 0.1, i * 5.0) for i in chunk),
        )
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def heaviest_imports(code: str, tree: Path, env: dict[str, str]) -> list[tuple[str, float]]:
    """Cumulative import time (ms) of the big libraries, from one `-X importtime` run: each
    module is reported once, at its first import, with everything it pulled in."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cumulative: dict[str, float] = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) in PACKAGES + ("h3d.app", "h3d.cli"):
            cumulative[m.group(2)] = int(m.group(1)) / 1000.0
    return sorted(cumulative.items(), key=lambda kv: -kv[1])


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--starts", type=int, default=5, help="daemon starts per tree and store")
    ap.add_argument("--baseline", type=Path, help="another checkout, measured alongside")
    ap.add_argument(
        "--large-store-rows",
        type=int,
        default=0,
        help="also start on a store of this many power samples (20000000: 0.9 GB)",
    )
    add_out(ap, "startup.md")
    args = ap.parse_args()
    trees = trees_of(args.baseline)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pycache = Path(tmp) / "pycache"
        envs = {name: child_env(tree, pycache) for name, tree in trees.items()}
        keys = [(t, a) for t in trees for a in ARMS]
        for t, a in keys:  # warm-up: compile the bytecode once
            run_s(ARMS[a], trees[t], envs[t])
        wall: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
        cpu: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
        for i in range(args.repeats):
            k = i % len(keys)
            for t, a in keys[k:] + keys[:k]:  # rotate the order every round
                w, c = run_s(ARMS[a], trees[t], envs[t])
                wall[t, a].append(w)
                cpu[t, a].append(c)
        heavy = heaviest_imports("import h3d.cli, h3d.app", REPO, envs["this tree"])
        daemons = {t: (trees[t], envs[t], SERVE) for t in trees}
        daemons[FLOOR] = (REPO, envs["this tree"], FLOOR_DAEMON)
        starts: dict[tuple[str, str], list[tuple[float, float]]] = {
            (t, s): [] for t in daemons for s in ("fresh", "at head")
        }
        for t, (tree, env, cmd) in daemons.items():  # warm-up, also compiles what serving imports
            spawn_to_healthy(tree, env, Path(tmp) / f"warm-{len(t)}", cmd)
        for i in range(args.starts):
            order = list(daemons)
            for t in order[i % len(order) :] + order[: i % len(order)]:
                tree, env, cmd = daemons[t]
                d = Path(tmp) / f"{t}-{i}"
                starts[t, "fresh"].append(spawn_to_healthy(tree, env, d, cmd))
                starts[t, "at head"].append(spawn_to_healthy(tree, env, d, cmd))
        autostarts: dict[str, list[tuple[float, ...]]] = {t: [] for t in trees}
        for i in range(args.starts):
            order = list(trees)
            for t in order[i % len(order) :] + order[: i % len(order)]:
                d = Path(tmp) / f"autostart-{t}-{i}"
                autostarts[t].append(autostart(trees[t], envs[t], d))
        if args.large_store_rows:
            big = {t: Path(tmp) / f"large-{i}" for i, t in enumerate(trees)}
            first = next(iter(trees))
            large_store(trees[first], envs[first], big[first], args.large_store_rows)
            size_gb = (big[first] / "h3d.db").stat().st_size / 1e9
            for t in trees:
                if t != first:
                    big[t].mkdir(mode=0o700)
                    shutil.copyfile(big[first] / "h3d.db", big[t] / "h3d.db")  # not in memory
                spawn_to_healthy(trees[t], envs[t], big[t])  # its first start: a clean stop
            written, clean = "large: written since the last stop", "large: after a clean stop"
            for s in (written, clean):
                starts.update({(t, s): [] for t in trees})
            for i in range(args.starts):
                order = list(trees)
                for t in order[i % len(order) :] + order[: i % len(order)]:
                    starts[t, clean].append(spawn_to_healthy(trees[t], envs[t], big[t]))
                    os.utime(big[t] / "h3d.db")  # as a write by another program
                    starts[t, written].append(spawn_to_healthy(trees[t], envs[t], big[t]))
    load1 = os.getloadavg()[0]
    lines = [
        "# Start-up: `h3d serve` to healthy, and its imports",
        "",
        f"`{command(ap, args)}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}; load average "
        f"{load0:.1f} at the start, {load1:.1f} at the end (2 cores: a load above 2 means the "
        "processes waited for a core, and wall times grow with it; CPU times much less). "
        "Bytecode cached, as after `pip install`.",
        "",
        "| tree | process | median wall ms | over bare | median CPU ms | over bare |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for t in trees:
        bare_w = med_ms(wall[t, next(iter(ARMS))])
        bare_c = med_ms(cpu[t, next(iter(ARMS))])
        for a in ARMS:
            w, c = med_ms(wall[t, a]), med_ms(cpu[t, a])
            lines.append(
                f"| {t} | {a} | {w:.0f} | +{w - bare_w:.0f} | {c:.0f} | +{c - bare_c:.0f} |"
            )
    lines += [
        "",
        "Libraries `import h3d.cli, h3d.app` loads in this tree (`python -X importtime`, "
        "cumulative ms, one run; the first to import a shared dependency such as pydantic "
        "carries it):",
        "",
        "| module | ms |",
        "|---|---:|",
        *(f"| {pkg} | {ms:.0f} |" for pkg, ms in heavy),
        "",
        f"**Spawn to healthy `/healthz`** ({args.starts} starts of each; `h3d serve` with the "
        "estimated CPU backend; budget 0.5 s"
        + (
            f"; the large store: {args.large_store_rows:,} power samples, {size_gb:.2f} GB"
            if args.large_store_rows
            else ""
        )
        + "):",
        "",
        "| daemon | store | median s | min | max | daemon CPU s at healthy (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (t, s), xs in starts.items():
        ws = [w for w, _ in xs]
        cs = [c for _, c in xs]
        lines.append(
            f"| {t} | {s} | {statistics.median(ws):.2f} | {min(ws):.2f} | {max(ws):.2f} | "
            f"{statistics.median(cs):.2f} |"
        )
    lines += [
        "",
        f"**A training script's autostart** ({args.starts} of each, in turn): "
        "`H3Profiler(...)` on a fresh data dir where no daemon runs, which starts one; the "
        "constructor's time (what the script waits before its first step); then a second "
        "of CPU work and `stop()`, from the constructor to its batches stored and the run "
        "finished; the share of the run's duration its energy covers (readings on both "
        "sides), its share of the device's energy over it (the run's CPU share) and its "
        "energy:",
        "",
        "| tree | constructor, median ms | min | max | to stored, median s "
        "| energy covers, min | run's share, median | run's energy, median J |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, xs in autostarts.items():
        cs = [x[0] * 1000 for x in xs]
        lines.append(
            f"| {t} | {statistics.median(cs):.0f} | {min(cs):.0f} | {max(cs):.0f} | "
            f"{statistics.median(x[1] for x in xs):.2f} | {min(x[2] for x in xs):.1%} | "
            f"{statistics.median(x[3] for x in xs):.2f} | "
            f"{statistics.median(x[4] for x in xs):.2f} |"
        )
    here = "this tree"
    libs_s = (med_ms(cpu[here, LIBS]) - med_ms(cpu[here, BARE])) / 1000
    bare_s = med_ms(cpu[here, BARE]) / 1000
    med = {k: statistics.median(w for w, _ in xs) for k, xs in starts.items()}
    med_cpu = {k: statistics.median(c for _, c in xs) for k, xs in starts.items()}
    h3d_w, floor_w = med[here, "at head"], med[FLOOR, "at head"]
    h3d_c, floor_c = med_cpu[here, "at head"], med_cpu[FLOOR, "at head"]
    lines += [
        "",
        f"Store at head, medians: `h3d serve` answered its first /healthz {h3d_w:.2f} s after "
        f"its spawn, having used {h3d_c:.2f} s of CPU; the floor daemon {floor_w:.2f} s and "
        f"{floor_c:.2f} s (of which the interpreter {bare_s:.2f} s and the libraries' imports "
        f"+{libs_s:.2f} s). What h3d adds to the floor: {h3d_w - floor_w:+.2f} s wall, "
        f"{h3d_c - floor_c:+.2f} s of CPU. "
        + (
            f"The 0.5 s budget is {'below' if floor_w >= 0.5 else 'above'} the floor on this "
            "machine"
            + (
                ": no daemon on fastapi, SQLAlchemy's ORM and uvicorn answers truthfully "
                "sooner here."
                if floor_w >= 0.5
                else "."
            )
        ),
    ]
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
