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


def blocks(lang: str, page: Path = README) -> list[str]:
    """The code blocks of ``page`` fenced as ``lang``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def missing_links(page: Path) -> list[str]:
    """The relative links of ``page`` that name no file (taken from the page's folder)."""
    return [
        target
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
        if not target.startswith(("http://", "https://", "mailto:"))
        and not (page.parent / target).exists()
    ]


def run_as_users_shell(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a user's shell after ``h3d serve``: the daemon found through its
    data dir, no URL or token set."""
    monkeypatch.setenv("H3D_DATA_DIR", str(daemon.data_dir))
    monkeypatch.delenv("H3D_URL", raising=False)
    monkeypatch.delenv("H3D_TOKEN", raising=False)


def assert_delivered(results: dict[str, object]) -> None:
    """A profiled run's results: every batch it logged posted, none lost or spooled."""
    assert results["batches_lost"] == 0 and results["batches_spooled"] == 0, results
    assert results["batches_posted"] == results["batches_logged"], results
    assert isinstance(results["batches_logged"], int) and results["batches_logged"] > 0, results


def test_front_page_is_short_and_links_exist() -> None:
    assert len(README.read_text().splitlines()) <= FRONT_PAGE_MAX_LINES
    missing = missing_links(README)
    assert not missing, f"README links to missing {missing}"


def test_readme_code_runs_as_written(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    run_as_users_shell(daemon, monkeypatch)
    py = blocks("python")
    assert py, "README.md has no python block"
    for i, code in enumerate(py):
        ns: dict[str, object] = {"__name__": f"readme_block_{i}"}
        exec(compile(code, f"README.md python block {i}", "exec"), ns)  # noqa: S102
        prof = ns.get("prof")
        if prof is not None:  # a profiled block: its run reached the daemon, complete
            assert_delivered(prof.results)  # type: ignore[attr-defined]
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
