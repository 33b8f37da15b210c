"""Start-up cost: `h3d serve` to a healthy /healthz, and where its import time goes.

DESIGN.md §8: `h3d serve` to a healthy `/healthz` ≤ 0.5 s (autostart from a training script
waits for it), `import h3client` ≤ 50 ms over a bare interpreter (also measured, with the
sender's costs, by benchmarks/client_overhead.py).

Measured side by side in one run, in rotating order:

- process wall and CPU time, to the end of the imports (the interpreter's teardown is
  skipped), of a bare interpreter, of the libraries the daemon cannot serve without
  (fastapi, SQLAlchemy's ORM, uvicorn, pydantic-settings: the floor), of `import h3d.cli`
  (what every `h3d` command pays), of `import h3d.cli, h3d.app` (what `serve` pays before
  it binds) and of `import h3client`;
- spawn of a real `h3d serve` to a healthy /healthz, on a fresh data dir (the first
  autostart: the store is created) and again on that data dir (every later start: the
  store is at head), with the CPU time the daemon had used when it first answered.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import REPO, machine

ARMS = {
    "bare interpreter (`python -c pass`)": "pass",
    "libraries only: `import fastapi, sqlalchemy.orm, uvicorn, pydantic_settings`": (
        "import fastapi, sqlalchemy.orm, uvicorn, pydantic_settings"
    ),
    "`import h3d.cli` (every h3d command)": "import h3d.cli",
    "`import h3d.cli, h3d.app` (serve, before binding)": "import h3d.cli, h3d.app",
    "`import h3client` (every training script; budget +50 ms)": "import h3client",
}
BARE, FLOOR = list(ARMS)[:2]
PACKAGES = ("fastapi", "sqlalchemy", "alembic", "uvicorn", "pydantic_settings", "httpx", "psutil")
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def child_env(tree: Path, pycache: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("H3D_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    return {**env, "PYTHONPATH": str(tree), "PYTHONPYCACHEPREFIX": str(pycache), **extra}


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


def spawn_to_healthy(tree: Path, env: dict[str, str], data_dir: Path) -> tuple[float, float]:
    """(seconds from spawning ``h3d serve`` to a 200 from /healthz, the daemon's CPU seconds
    then); /healthz polled every 5 ms with the standard library (a light poller)."""
    daemon_file = data_dir / "daemon.json"
    daemon_file.unlink(missing_ok=True)
    env = {**env, "H3D_DATA_DIR": str(data_dir), "H3D_LOG_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "h3d", "serve", "--port", "0"], env=env, cwd=tree
    )
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
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/startup.md"))
    args = ap.parse_args()
    trees = {"this tree": REPO}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
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
        starts: dict[tuple[str, str], list[tuple[float, float]]] = {
            (t, s): [] for t in trees for s in ("fresh", "at head")
        }
        for t in trees:  # warm-up start, also compiles what serving imports
            spawn_to_healthy(trees[t], envs[t], Path(tmp) / f"warm-{len(t)}")
        for i in range(args.starts):
            for t in list(trees)[i % 2 :] + list(trees)[: i % 2]:
                d = Path(tmp) / f"{t}-{i}"
                starts[t, "fresh"].append(spawn_to_healthy(trees[t], envs[t], d))
                starts[t, "at head"].append(spawn_to_healthy(trees[t], envs[t], d))
    load1 = os.getloadavg()[0]
    lines = [
        "# Start-up: `h3d serve` to healthy, and its imports",
        "",
        f"`PYTHONPATH=. python benchmarks/startup.py --repeats {args.repeats} --starts "
        f"{args.starts}{' --baseline ' + str(args.baseline) if args.baseline else ''}` on "
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
        f"**`h3d serve` spawn to healthy `/healthz`** ({args.starts} starts of each, estimated "
        "CPU backend; budget 0.5 s):",
        "",
        "| tree | store | median s | min | max | daemon CPU s at healthy (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (t, s), xs in starts.items():
        ws = [w for w, _ in xs]
        cs = [c for _, c in xs]
        lines.append(
            f"| {t} | {s} | {statistics.median(ws):.2f} | {min(ws):.2f} | {max(ws):.2f} | "
            f"{statistics.median(cs):.2f} |"
        )
    here = "this tree"
    floor_s = (med_ms(cpu[here, FLOOR]) - med_ms(cpu[here, BARE])) / 1000
    bare_s = med_ms(cpu[here, BARE]) / 1000
    at_head = statistics.median(c for _, c in starts[here, "at head"])
    lines += [
        "",
        f"In this tree the daemon answered its first /healthz having used {at_head:.2f} s of "
        f"CPU (store at head); the interpreter ({bare_s:.2f} s) and the libraries' own imports "
        f"(+{floor_s:.2f} s) are {(bare_s + floor_s) / at_head:.0%} of it. "
        + (
            "The 0.5 s budget is below that floor on this machine: no start that imports "
            "fastapi, SQLAlchemy's ORM, uvicorn and pydantic-settings before its first answer "
            "can meet it here."
            if bare_s + floor_s >= 0.5
            else "The floor is under the 0.5 s budget on this machine."
        ),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
