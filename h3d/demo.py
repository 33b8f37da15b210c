"""``h3d demo``: start the daemon (embedded SQLite default), profile a real training run, report.

The training itself runs in a child interpreter (``python -m h3client._demo``): h3d does
not import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from h3d._http import DaemonClient, find_daemon, is_healthy
from h3d.cli import dashboard_link, print_report, private_data_dir
from h3d.config import Settings


def start_daemon(settings: Settings, *, timeout_s: float = 30.0) -> tuple[str, int | None]:
    """Return the URL of a healthy daemon for this data dir, starting one if needed."""
    url, problem = find_daemon(settings)
    if problem is None:
        print(f"using the running daemon at {url}")
        return url, None
    private_data_dir(settings)  # 0700, as the daemon keeps it; a file in its place: one line
    log = open(settings.data_dir / "h3d.log", "ab")  # noqa: SIM115  (handed to the child)
    since = log.seek(0, os.SEEK_END)  # what this start writes comes after
    # the settings the demo's own flags set, passed on (the variables the child inherits)
    cmd = [sys.executable, "-m", "h3d", "serve", "--data-dir", str(settings.data_dir)]
    cmd += ["--node", settings.node, "--log-level", settings.log_level]
    if settings.db_url:
        cmd += ["--db-url", settings.db_url]
    port_busy = False
    proc = subprocess.Popen(
        cmd + ["--port", str(settings.port)],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    print(f"starting h3d (pid {proc.pid}, log {settings.data_dir / 'h3d.log'})", end="", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = _last_error_line(settings.data_dir / "h3d.log", since)
            if why and "cannot listen on" not in why:  # not the port: the reason, as it is
                print()
                raise SystemExit(why)
            if port_busy:
                break
            port_busy = True  # the default port may be taken: try a free one
            proc = subprocess.Popen(
                cmd + ["--port", "0"], stdout=log, stderr=log, start_new_session=True
            )
        try:
            url = json.loads(settings.daemon_file.read_text())["url"]
            if is_healthy(url):
                print(f" ready at {url}")
                return url, proc.pid
        except (FileNotFoundError, ValueError, KeyError):
            pass
        print(".", end="", flush=True)
        time.sleep(0.3)
    print()
    raise SystemExit(f"h3d: the daemon did not become healthy; see {settings.data_dir / 'h3d.log'}")


def _last_error_line(log: Path, since: int) -> str | None:
    """The last ``h3d: ...`` line the daemon wrote to its log after offset ``since`` (its
    one-line reason to exit). (h3client's autostart reads the log the same way.)"""
    try:
        lines = log.read_bytes()[since:][-8192:].decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line for line in reversed(lines) if line.startswith("h3d: ")), None)


def missing_training_packages() -> list[str]:
    """What the demo's training needs and this environment lacks (h3d itself needs neither)."""
    from importlib.util import find_spec

    return [name for name in ("torch", "sklearn") if find_spec(name) is None]


def main(settings: Settings, *, epochs: int = 20, keep: bool = True) -> int:
    missing = missing_training_packages()
    if missing:  # before a daemon is started for nothing
        print(
            f"h3d demo trains a small network with PyTorch on scikit-learn's digits; not "
            f"installed here: {', '.join(missing)} (for example `pip install torch "
            "scikit-learn`; `make demo` in the repository installs them)",
            file=sys.stderr,
        )
        return 1
    url, pid = start_daemon(settings)
    env = {**os.environ, "H3D_URL": url, "H3D_DATA_DIR": str(settings.data_dir)}
    print(f"training an MLP on scikit-learn's digits for {epochs} epochs, streaming to h3d")
    out = subprocess.run(
        [sys.executable, "-m", "h3client._demo", "--epochs", str(epochs)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    run_id = None
    for line in out.stdout.splitlines():
        if line.startswith("RUN_ID="):
            run_id = line.split("=", 1)[1].strip()
        else:
            print(line)
    if out.returncode != 0 or run_id is None:
        print("h3d: the demo training failed", file=sys.stderr)
        return 1
    c = DaemonClient(settings, url)
    print()
    print_report(c.get(f"/v1/runs/{run_id}/report"))
    print()
    h3d = f"{sys.executable} -m h3d"
    if pid is not None and not keep:  # the link and `show` would need the daemon just stopped
        os.kill(pid, 15)
        where = f"--data-dir {settings.data_dir}"
        print(
            f"the daemon it started is stopped; the run is kept in {settings.data_dir}. To see "
            f"it, start one (`{h3d} serve {where} --port 0`), then `{h3d} show {run_id[:8]} "
            f"{where}` (or `{h3d} status {where}` for the dashboard link)"
        )
        return 0
    print(f"browse: {dashboard_link(settings, url, run_id)}")
    print(
        f"        (the dashboard; API docs at {url}/docs; or "
        f"`{h3d} show {run_id[:8]} --data-dir {settings.data_dir}`)"
    )
    if pid is not None:
        print(
            f"the daemon keeps running (pid {pid}); stop it with "
            f"`{h3d} stop --data-dir {settings.data_dir}`"
        )
    return 0
