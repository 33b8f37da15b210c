"""What installs H3 matches the code: the wheel's packages, the Python floor, the README's
install lines, docker-compose.yml and the Dockerfile."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from h3d.cli import build_parser
from h3d.config import Settings
from h3d.middleware import host_allowed

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for top in ("h3d", "h3client", "h3optim"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    found |= {"h3d._migrations", "h3d._migrations.versions"}
    assert found == listed, (
        f"add to [tool.setuptools] packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    )


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_oldest_python_allowed_is_the_one_checked() -> None:
    """mypy and ruff check the oldest Python pip may install on: 3.10 was allowed while
    the daemon decoded batches with 3.11's ``a2b_base64(strict_mode=)`` (500 on every batch)."""
    meta = _pyproject()
    floor = meta["project"]["requires-python"].removeprefix(">=")
    assert meta["tool"]["mypy"]["python_version"] == floor
    assert meta["tool"]["ruff"]["target-version"] == "py" + floor.replace(".", "")
    assert f"Python ≥ {floor}" in (ROOT / "README.md").read_text()


def test_the_readme_install_line_covers_the_quick_start() -> None:
    """Every package the quick start imports comes with an extra the README's install names."""
    readme = (ROOT / "README.md").read_text()
    install = readme.split("Without `make`:", 1)[1].split("```", 2)[1]
    quick = readme.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    extras = _pyproject()["project"]["optional-dependencies"]
    named = {e for line in install.splitlines() for e in re.findall(r"\[([\w,]+)\]", line)}
    provided = {
        re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower()
        for group in named
        for e in group.split(",")
        for req in extras[e]
    }
    dist = {"sklearn": "scikit-learn", "torch": "torch"}
    imported = set(re.findall(r"^(?:from|import) (\w+)", quick, flags=re.M)) - {"h3client"}
    assert imported, "the quick start imports nothing?"
    missing = {dist.get(m, m) for m in imported} - provided
    assert not missing, f"the README's install lines leave out {sorted(missing)}"


def test_the_compose_file_runs_what_the_daemon_accepts() -> None:
    """docker-compose.yml and the Dockerfile against the code they run (CI has no Docker)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    h3d = compose["services"]["h3d"]
    # a run is followed (its share, its exit) only when the daemon sees its processes and
    # its client's host name is the daemon's own
    assert h3d["pid"] == "host" and h3d["uts"] == "host"
    settings = set(Settings.model_fields)
    for name in h3d["environment"]:
        assert name.startswith("H3D_") and name[4:].lower() in settings, name
    extras = _pyproject()["project"]["optional-dependencies"]
    installed = re.search(r'pip install [^\n]*"\.\[([\w,]+)\]"', dockerfile)
    assert installed, "the Dockerfile installs the project with its extras"
    wanted = set(installed.group(1).split(","))
    assert wanted <= set(extras)
    # the shared profile's PostgreSQL needs the driver in the image
    if "postgres" in compose["services"]:
        assert "postgres" in wanted
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.M)
    assert cmd
    argv = json.loads(cmd.group(1))
    assert argv[:2] == ["h3d", "serve"]
    args = build_parser().parse_args(argv[1:])  # SystemExit on a flag serve does not take
    # Prometheus scrapes the daemon by its service name: the Host header it sends must be
    # one the daemon accepts (its DNS-rebinding check answered every scrape 400 bad_host)
    prometheus = compose.get("configs", {}).get("prometheus")
    if prometheus is not None:
        served = Settings(
            host=args.host, allowed_hosts=h3d["environment"].get("H3D_ALLOWED_HOSTS", "")
        )
        allowed = frozenset(served.host_names)
        for job in yaml.safe_load(prometheus["content"])["scrape_configs"]:
            for target in (t for c in job["static_configs"] for t in c["targets"]):
                assert host_allowed(target.encode(), allowed), target
