"""README.md's code runs as written: every Python block, then every `h3d`/`h3-report` line.

The blocks get a real daemon through the environment (``H3D_DATA_DIR``), the way a user's
shell would have one after ``h3d serve``; the blocks themselves are not edited.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, daemon_env

README = REPO / "README.md"
FRONT_PAGE_MAX_LINES = 150
COMMANDS = {"h3d": ["-m", "h3d"], "h3-report": ["-m", "h3client.report"]}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_front_page_is_short_and_links_exist() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= FRONT_PAGE_MAX_LINES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to missing {target}"


def test_readme_code_runs_as_written(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("H3D_DATA_DIR", str(daemon.data_dir))
    monkeypatch.delenv("H3D_URL", raising=False)
    monkeypatch.delenv("H3D_TOKEN", raising=False)
    py = blocks("python")
    assert py, "README.md has no python block"
    for i, code in enumerate(py):
        ns: dict[str, object] = {"__name__": f"readme_block_{i}"}
        exec(compile(code, f"README.md python block {i}", "exec"), ns)  # noqa: S102
        prof = ns.get("prof")
        if prof is not None:  # a profiled block: its run reached the daemon, complete
            results = prof.results  # type: ignore[attr-defined]
            assert results["batches_lost"] == 0 and results["batches_spooled"] == 0
            with daemon.client() as api:
                run = api.get(f"/v1/runs/{prof.run_id}").json()  # type: ignore[attr-defined]
            assert run["status"] == "finished" and run["n_batches"] == prof.batches_logged  # type: ignore[attr-defined]
    lines = [
        line.split("#", 1)[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.split(" ", 1)[0] in COMMANDS
    ]
    assert lines, "README.md shows no h3d command"
    for line in lines:
        argv = shlex.split(line)
        r = subprocess.run(
            [sys.executable, *COMMANDS[argv[0]], *argv[1:]],
            env=daemon_env(Path(daemon.data_dir)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, f"`{line}` failed:\n{r.stderr}"
        assert r.stdout.strip(), f"`{line}` printed nothing"
