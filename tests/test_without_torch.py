"""`pip install h3` (no extras) gives a working daemon and client: neither imports torch
or numpy. Both run here in processes where importing either fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, daemon_env

BLOCK = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "numpy"):
                raise ImportError(f"{name} is blocked: h3d and h3client must not need it")
    sys.meta_path.insert(0, _Block())
    """
)


def test_daemon_and_client_run_without_torch_or_numpy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = daemon_env(data, H3D_POWER_BACKENDS="auto", H3D_LOG_LEVEL="WARNING")
    serve = BLOCK + "from h3d.cli import main\nraise SystemExit(main(['serve', '--port', '0']))"
    data.mkdir()
    log = data / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", serve], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                url = json.loads((data / "daemon.json").read_text())["url"]
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except (FileNotFoundError, ValueError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        client = BLOCK + textwrap.dedent(
            """
            from h3client import H3Profiler
            with H3Profiler("no-torch", autostart=False) as prof:
                for s in range(500):
                    prof.log_batch(2.0 / (1 + s / 100), losses=[1.0, 2.0], indices=[2 * s, 2 * s + 1])
                prof.log_epoch(0, accuracy=0.5)
            r = prof.results
            assert r["batches_posted"] == 500 and r["batches_lost"] == 0, r
            assert "torch" not in sys.modules and "numpy" not in sys.modules
            print("ok", prof.run_id)
            """
        )
        r = subprocess.run(
            [sys.executable, "-c", "import sys\n" + client],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# as Python reports a module that is not installed (BLOCK's ImportError reports a broken one)
ABSENT = textwrap.dedent(
    """
    import sys
    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Absent())
    """
)


def test_h3optim_without_torch_names_the_extra_to_install() -> None:
    code = ABSENT + textwrap.dedent(
        """
        import h3optim  # loads nothing yet

        try:
            from h3optim import AutoH3
        except ImportError as exc:
            print(exc)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and 'pip install "h3[optim]"' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "args", [["--help"], ["--report", "tune-x.json"], ["task.py:make_task"]], ids=str
)
def test_h3_tune_without_torch_says_what_is_missing_in_one_line(args: list[str]) -> None:
    """The script every install has (``[project.scripts]``), run as pip's wrapper runs it:
    it ended in a ModuleNotFoundError traceback, whatever its arguments."""
    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][
        "h3-tune"
    ].split(":")
    script = ABSENT + f"from {module} import {func}\nsys.exit({func}())"
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and not r.stdout, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        'h3-tune: h3optim needs PyTorch, which is not installed here: pip install "h3[optim]" '
        "(or install torch)"
    ]
