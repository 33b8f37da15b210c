"""Every command a person types resolves a run the same way: full id, name, unique prefix."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from h3client import ThermoAuditLogger
from tests.conftest import REPO, Daemon, daemon_env

IDS = ("ab12" + "0" * 28, "ab34" + "1" * 28, "cd56" + "2" * 28)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon holding three runs, shared by this module's read-only tests."""
    data = tmp_path_factory.mktemp("refs")
    d = Daemon(data, daemon_env(data, H3D_POWER_BACKENDS="constant:50", H3D_LOG_LEVEL="WARNING"))
    d.start()
    _seed(d)
    yield d
    d.stop()


def _seed(daemon: Daemon) -> None:
    with daemon.client() as api:
        for i, (rid, name) in enumerate(zip(IDS, ("alpha", "beta", "beta"), strict=True)):
            r = api.post(
                "/v1/runs", json={"id": rid, "name": name, "created_at": time.time() - 100 + i}
            )
            assert r.status_code == 201, r.text
            now = time.time()
            batches = [{"seq": s, "t": now + s * 0.01, "loss": 2.0 - s * 0.01} for s in range(50)]
            api.post(f"/v1/runs/{rid}/batches", json={"batches": batches}).raise_for_status()
            api.post(
                f"/v1/runs/{rid}/epochs",
                json={"epochs": [{"epoch": 0, "t": now, "accuracy": 0.8 + i / 100}]},
            ).raise_for_status()
            api.patch(f"/v1/runs/{rid}", json={"status": "finished"}).raise_for_status()


def _cmd(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env=daemon_env(daemon.data_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_resolve_endpoint(daemon: Daemon) -> None:
    with daemon.client() as api:

        def ref(r: str) -> tuple[int, dict]:
            resp = api.get("/v1/runs/resolve", params={"ref": r})
            return resp.status_code, resp.json()

        assert ref(IDS[0]) == (200, ref("ab12")[1])  # full id and unique prefix agree
        assert ref("ab12")[1]["id"] == IDS[0]
        assert ref("alpha")[1]["id"] == IDS[0]
        assert ref("beta")[1]["id"] == IDS[2]  # the newest run of that name
        code, body = ref("ab")
        assert code == 409 and body["error"]["code"] == "ambiguous_run"
        assert {c["id"] for c in body["error"]["details"]["candidates"]} == {IDS[0], IDS[1]}
        assert "ab120000" in body["error"]["message"] and "alpha" in body["error"]["message"]
        code, body = ref("zz")
        assert code == 404 and body["error"]["code"] == "run_not_found"
        # the other endpoints stay strict on full ids
        assert api.get("/v1/runs/ab12").status_code == 404


def test_every_command_resolves_alike(daemon: Daemon) -> None:
    for args in (("-m", "h3d", "show"), ("-m", "h3client.report", "--run")):
        for ref in ("ab12", "alpha", IDS[0]):
            r = _cmd(daemon, *args, ref)
            assert r.returncode == 0, (args, ref, r.stderr)
            assert IDS[0] in r.stdout
        amb = _cmd(daemon, *args, "ab")
        assert amb.returncode != 0
        assert (
            "ambiguous_run" in amb.stderr and "ab120000" in amb.stderr and "ab341111" in amb.stderr
        )
    r = _cmd(daemon, "-m", "h3client.report", "--run", "cd56", "--baseline", "alpha")
    assert r.returncode == 0, r.stderr
    assert "Green Score vs alpha" in r.stdout
    # a run that logged no keep_frac is assessed too, and says why
    assert "assessment: conservative — no data selection was logged" in r.stdout
    ex = _cmd(daemon, "-m", "h3d", "export", "beta")
    assert ex.returncode == 0 and len(ex.stdout.splitlines()) == 51


def test_compare_audit_logs_and_runs(daemon: Daemon, tmp_path: Path) -> None:
    logs = []
    for name, energy, keep in (("base", 10.0, None), ("h3", 6.0, 0.5), ("edge", 4.0, 0.3)):
        log = ThermoAuditLogger(name, log_dir=tmp_path / name)
        for e in range(3):
            log.log_epoch(e, loss=1.0 / (e + 1), accuracy=0.9, energy_j=energy, keep_frac=keep)
        logs.append(str(log.get_path()))
    # CSV files only: no daemon needed (point the client at nothing)
    r = subprocess.run(
        [sys.executable, "-m", "h3client.report", "--compare", *logs],
        env={**daemon_env(tmp_path / "nodaemon"), "H3D_URL": "http://127.0.0.1:9"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and "baseline" in lines[1]
    assert "30" in lines[1] and "18" in lines[2] and "1.667" in lines[2]  # 30 J / 18 J
    assert "aggressive" in lines[3]
    # a mix of a CSV and run references
    r = _cmd(daemon, "-m", "h3client.report", "--compare", logs[0], "alpha", "cd56")
    assert r.returncode == 0, r.stderr
    assert IDS[0] in r.stdout and IDS[2] in r.stdout and Path(logs[0]).name in r.stdout
    missing = _cmd(daemon, "-m", "h3client.report", "--compare", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "no audit log" in missing.stderr


def test_a_refused_token_is_explained_not_just_a_401(daemon: Daemon, tmp_path: Path) -> None:
    other = tmp_path / "other"  # a data dir with no token of this daemon's
    r = subprocess.run(
        [sys.executable, "-m", "h3client.report", "--run", "alpha"],
        env=daemon_env(other, H3D_URL=daemon.url),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"the daemon at {daemon.url} refuses the token of data dir {other}" in r.stderr
    assert "H3D_TOKEN" in r.stderr


def test_a_name_that_is_another_runs_id_prefix_is_ambiguous(tmp_path: Path) -> None:
    """A run named ``27b67c60`` silently won over run ``27b67c602a1f…``: ``h3d show
    27b67c60`` showed another run than the id prefix names, with no hint."""
    from h3d.errors import AmbiguousRun
    from h3d.storage import migrate
    from h3d.storage import repository as repo
    from h3d.storage.engine import make_engine, make_sessionmaker, session_scope

    engine = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    migrate.upgrade(engine)
    prefixed, named, own = "27b67c60" + "a" * 24, "a49df5be" + "b" * 24, "ee11" + "c" * 28
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            for rid, name, t in ((prefixed, "first", 1.0), (named, "27b67c60", 2.0),
                                 (own, "ee11", 3.0)):  # fmt: skip
                repo.create_run(s, name=name, config={}, tags=[], pid=None, host=None,
                                n_train=None, now=t, run_id=rid)  # fmt: skip
        with session_scope(make_sessionmaker(engine)) as s:
            with pytest.raises(AmbiguousRun) as got:
                repo.resolve_run(s, ref="27b67c60")
            ids = [c["id"] for c in got.value.details["candidates"]]
            assert ids == [named, prefixed]  # the named run first, then the prefix's
            assert "27b67c60aaaa (first)" in got.value.message
            assert "a49df5bebbbb (27b67c60)" in got.value.message
            assert repo.resolve_run(s, ref="27b67c60a").id == prefixed  # more of the id
            assert repo.resolve_run(s, ref="ee11").id == own  # its own id's prefix: one run
            assert repo.resolve_run(s, ref="first").id == prefixed
    finally:
        engine.dispose()
