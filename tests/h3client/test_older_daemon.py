"""A profiler upgraded while its daemon keeps running: the daemon of the revision before the
binary batches body (application/vnd.h3.columns) reads JSON only, and refuses that type.

The older daemon is real: its ``h3d`` and ``migrations`` are extracted from git (the test is
skipped in a checkout without that history) and served on loopback. The profiler's first
binary request is refused for its Content-Type; it is sent again as JSON at once, and every
request after it goes as JSON: every batch stored once, the run finished.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import torch

from h3client import H3Profiler
from h3client.client import Client
from tests.conftest import REPO, Daemon, daemon_env

#: The last revision whose daemon reads batches as JSON only.
JSON_ONLY_REV = "e917246"


@pytest.fixture
def older_daemon(tmp_path: Path) -> Daemon:
    have = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{JSON_ONLY_REV}^{{commit}}"],
        capture_output=True,
    )
    if have.returncode != 0:
        pytest.skip(f"this checkout lacks {JSON_ONLY_REV} (a shallow clone?)")
    tree = tmp_path / "older"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", JSON_ONLY_REV, "h3d", "migrations"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = daemon_env(tmp_path / "data", H3D_POWER_BACKENDS="constant:50", H3D_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = str(tree)
    d = Daemon(tmp_path / "data", env, tree=tree).start()
    yield d
    d.stop()


def test_a_daemon_that_reads_json_only_gets_json(
    older_daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = older_daemon
    with d.client() as api:  # it is the older daemon: the binary form is refused
        r = api.post(
            "/v1/runs/x/batches",
            content=b"{}\n",
            headers={"Content-Type": "application/vnd.h3.columns"},
        )
        assert r.status_code == 422 and "content_type" in r.json()["error"]["details"], r.text
    caplog.set_level(logging.INFO, logger="h3client")
    prof = H3Profiler("upgraded", url=d.url, data_dir=d.data_dir, max_batch=50)
    prof.start()
    for step in range(300):
        losses = torch.rand(8)
        prof.log_batch(losses.mean(), losses=losses, indices=torch.arange(8) + 8 * step)
        if step % 100 == 99:
            prof.flush()
    res = prof.stop()
    assert res["batches_posted"] == 300, res
    assert res["batches_spooled"] == res["batches_lost"] == res["batches_rejected"] == 0
    said = [r.getMessage() for r in caplog.records if "JSON batches only" in r.getMessage()]
    assert len(said) == 1, said  # found once: the requests after the first go as JSON
    with Client(d.url, data_dir=d.data_dir) as c:
        run = c.get_run(prof.run_id)
        assert run["status"] == "finished" and run["n_batches"] == 300
        samples = c.request("GET", f"/v1/runs/{prof.run_id}/samples.csv").text.splitlines()
    assert len(samples) == 1 + 300 * 8
    assert sorted(int(line.split(",")[2]) for line in samples[1:]) == list(range(2400))
