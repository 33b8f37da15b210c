"""The client sends its token only to a daemon that proved it holds it, and reads a token
only from a data dir that no other user could have written.

Anyone on the machine may listen on the port a client probes (the default 8421, or the
port a stopped daemon left in ``daemon.json``): such a listener, here a small HTTP server on
loopback that answers ``/healthz`` like an h3d, must never see the ``Authorization`` header,
nor any run data.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from h3client import H3ClientError, H3Profiler, _daemon
from h3client._config import resolve
from h3client._daemon import ensure_daemon, probe
from tests.conftest import IMPERSONATIONS, Daemon, Listener, data_dir_with_a_token, free_port


@pytest.fixture
def on_the_default_port(monkeypatch: pytest.MonkeyPatch) -> Callable[[Listener], None]:
    """Make a listener's port the one clients probe when a data dir names no daemon."""
    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)

    def use(listener: Listener) -> None:
        monkeypatch.setenv("H3D_PORT", str(listener.port))

    return use


@pytest.mark.parametrize("answer", IMPERSONATIONS, ids=["authorized", "silent", "guessed"])
def test_a_listener_that_cannot_prove_it_holds_the_token_never_gets_it(
    tmp_path: Path,
    on_the_default_port: Callable[[Listener], None],
    caplog: pytest.LogCaptureFixture,
    answer: dict[str, Any],
) -> None:
    mine = data_dir_with_a_token(tmp_path / "mine")
    with Listener(answer) as squatter:
        on_the_default_port(squatter)
        cfg = resolve(data_dir=mine)
        assert cfg.url == squatter.url and cfg.token == "the-victims-token"
        with caplog.at_level("WARNING", logger="h3client"):
            assert ensure_daemon(cfg, autostart=False) is None  # not this data dir's daemon
        # a daemon.json that names its port (left by a killed daemon) changes nothing
        (mine / "daemon.json").write_text(json.dumps({"url": squatter.url, "pid": 1}))
        cfg = resolve(data_dir=mine)
        assert cfg.url == squatter.url
        assert ensure_daemon(cfg, autostart=False) is None
    assert squatter.seen, "it was asked (/healthz), so it could have been told"
    assert squatter.tokens_seen == []
    assert all(r["path"].startswith("/healthz?nonce=") for r in squatter.seen)
    assert f"what answers at {squatter.url} did not prove" in caplog.text or (
        "refuses this data dir's token" in caplog.text
    )


def test_a_profiler_starts_its_own_daemon_rather_than_stream_to_the_listener(
    tmp_path: Path,
    on_the_default_port: Callable[[Listener], None],
    started_daemons: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = data_dir_with_a_token(tmp_path / "mine")
    secret = {"wandb_api_key": "abc123", "data": "/home/alice/private"}
    monkeypatch.setenv("H3D_POWER_BACKENDS", "constant:50")  # for the daemon it starts
    with Listener(IMPERSONATIONS[0]) as squatter:
        on_the_default_port(squatter)
        with H3Profiler("secret-experiment", data_dir=mine, config=secret) as prof:
            prof.log_batch(1.0)
        results = prof.results
    assert squatter.tokens_seen == []
    assert [r for r in squatter.seen if not r["path"].startswith("/healthz")] == []
    assert not any(b"secret-experiment" in r["body"] for r in squatter.seen)
    # the run went to the daemon the profiler started for its data dir
    assert results is not None and not results["offline"], results
    url = json.loads((mine / "daemon.json").read_text())["url"]
    assert url != squatter.url
    runs = httpx.get(
        f"{url}/v1/runs", headers={"Authorization": "Bearer the-victims-token"}, timeout=30
    ).json()
    assert [r["name"] for r in runs["data"]] == ["secret-experiment"]


def test_a_real_daemon_proves_it_holds_the_token_and_a_relay_does_not(daemon: Daemon) -> None:
    assert probe(daemon.url, daemon.token) == (True, True)
    assert probe(daemon.url, "another-data-dirs-token") == (True, False)
    assert probe(daemon.url, None) == (True, False)  # nothing to check it against
    body = httpx.get(f"{daemon.url}/healthz", params={"nonce": "n1"}).json()
    assert body["proof"] == _daemon.proof(daemon.token, daemon.port, "n1")
    assert body["authorized"] is False and body["status"] == "ok"  # the fields it had
    assert "proof" not in httpx.get(f"{daemon.url}/healthz").json()
    # Another program on another port that passes the nonce to the real daemon, and its
    # answer back, gets a proof for the daemon's port: not one for its own.
    with Listener(relay=daemon.url) as relay:
        assert probe(relay.url, daemon.token) == (True, False)
    assert relay.tokens_seen == []


@contextlib.contextmanager
def mode(path: Path, bits: int) -> Iterator[None]:
    old = path.stat().st_mode & 0o777
    path.chmod(bits)
    try:
        yield
    finally:
        path.chmod(old)


def test_the_client_refuses_a_token_another_user_could_have_written(tmp_path: Path) -> None:
    mine = data_dir_with_a_token(tmp_path / "shared" / "h3d-alice")
    assert resolve(data_dir=mine, url="http://127.0.0.1:1").token == "the-victims-token"
    # the data dir (as /tmp/h3d-$USER made by another user with umask 000), or the token,
    # writable by others: refused in one clear error, for the profiler too
    for path, bits in ((mine, 0o777), (mine, 0o770), (mine / "token", 0o622)):
        with mode(path, bits):
            with pytest.raises(H3ClientError, match="writable by users other than you") as e:
                resolve(data_dir=mine, url="http://127.0.0.1:1")
            assert str(mine) in str(e.value) and "mktemp -d" in str(e.value)
            with pytest.raises(H3ClientError, match="writable by users other than you"):
                H3Profiler("run", data_dir=mine, url="http://127.0.0.1:1", autostart=False)
    # a data dir with nothing in it yet, but writable by others: no spool goes there either
    empty = tmp_path / "shared" / "h3d-bob"
    empty.mkdir(mode=0o700)
    with mode(empty, 0o777), pytest.raises(H3ClientError):
        resolve(data_dir=empty, url="http://127.0.0.1:1")


@pytest.mark.skipif(os.getuid() != 0, reason="another user's files need root to make")
def test_the_client_refuses_a_data_dir_or_token_another_user_owns(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    mine = data_dir_with_a_token(tmp_path / "h3d-alice")
    for path in (mine / "token", mine):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        with pytest.raises(H3ClientError, match=f"owned by uid {nobody.pw_uid}, not by you"):
            resolve(data_dir=mine, url="http://127.0.0.1:1")


@pytest.mark.parametrize("answer", IMPERSONATIONS[:2], ids=["authorized", "silent"])
def test_an_offline_profiler_retries_only_the_proof_not_the_token(
    tmp_path: Path,
    on_the_default_port: Callable[[Listener], None],
    answer: dict[str, Any],
) -> None:
    # no daemon proved itself and none may be started: the profiler runs offline, and its
    # sender's retries ask the listener for a proof again, never send it the token or a run
    mine = data_dir_with_a_token(tmp_path / "mine")
    with Listener(answer) as squatter:
        on_the_default_port(squatter)
        prof = H3Profiler(
            "secret-experiment", data_dir=mine, autostart=False, flush_interval_s=0.05
        )
        for _ in range(20):
            prof.log_batch(1.0)
        prof.flush(1.5)  # past the first back-off (0.5 s): the sender tries again
        res = prof.stop(timeout_s=5)
    assert squatter.tokens_seen == []
    assert [r for r in squatter.seen if not r["path"].startswith("/healthz")] == []
    assert len(squatter.seen) >= 2, "the sender probes again on its back-off"
    assert res["offline"] and res["batches_spooled"] == 20 and res["batches_lost"] == 0
    assert (mine / "spool" / f"{prof.run_id}.jsonl").exists()


def test_an_offline_profiler_streams_once_its_data_dirs_daemon_answers_there(
    tmp_path: Path, daemon_factory: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the proof the sender waits for comes from the data dir's daemon, started later
    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    d = daemon_factory("later")
    port, data = d.port, d.data_dir
    d.stop()
    monkeypatch.setenv("H3D_PORT", str(port))
    (data / "daemon.json").unlink(missing_ok=True)
    prof = H3Profiler("late", data_dir=data, autostart=False, flush_interval_s=0.05)
    prof.log_batch(1.0)
    d.port = port
    d.start()
    for _ in range(4):
        prof.log_batch(1.0)
    res = prof.stop(timeout_s=30)
    assert not res["offline"] and res["batches_lost"] == 0, res
    run = httpx.get(
        f"{d.url}/v1/runs/{prof.run_id}", headers={"Authorization": f"Bearer {d.token}"}
    ).json()
    assert run["name"] == "late" and run["last_seq"] == 4, run


def test_a_client_checks_the_proof_of_a_discovered_url_before_sending_the_token(
    tmp_path: Path,
    on_the_default_port: Callable[[Listener], None],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from h3client import Client
    from h3client.report import main as h3_report

    mine = data_dir_with_a_token(tmp_path / "mine")
    with Listener(IMPERSONATIONS[0]) as squatter:
        on_the_default_port(squatter)
        with Client(data_dir=mine) as c, pytest.raises(H3ClientError) as e:
            c.list_runs()
        assert squatter.url in str(e.value) and "could not prove" in str(e.value)
        assert "\n" not in str(e.value)
        monkeypatch.setenv("H3D_DATA_DIR", str(mine))
        assert h3_report(["--run", "secret-experiment"]) == 1
        err = capsys.readouterr().err
        assert squatter.url in err and "could not prove" in err
    assert squatter.tokens_seen == []
    assert all(r["path"].startswith("/healthz?nonce=") for r in squatter.seen)


def test_a_client_uses_a_discovered_daemon_that_proves_itself(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from h3client import Client

    for name in ("H3D_URL", "H3D_TOKEN", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    with Client(data_dir=daemon.data_dir) as c:
        assert c.url == daemon.url and not c.config.url_is_explicit
        run = c.create_run(name="discovered")
        assert c.get_run(run["id"])["name"] == "discovered"


@pytest.mark.parametrize("bits", [0o777, 0o770])
def test_a_given_token_does_not_make_an_unsafe_data_dir_a_spool(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    bits: int,
) -> None:
    # with H3D_TOKEN, no token is read from the data dir; its spool is still refused there
    for name in ("H3D_URL", "H3D_HOST", "H3D_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("H3D_TOKEN", "a-token-given")
    monkeypatch.setenv("H3D_PORT", str(free_port()))
    shared = data_dir_with_a_token(tmp_path / "shared" / "h3d-alice")
    (shared / "spool").mkdir(mode=0o700)  # made while it was safe: still no spool there now
    with mode(shared, bits):
        for autostart in (False, True):  # nor a daemon started for it
            with caplog.at_level("WARNING", logger="h3client"):
                prof = H3Profiler(
                    "run", data_dir=shared, url="http://127.0.0.1:9" if not autostart else None,
                    autostart=autostart, flush_interval_s=0.05,
                )  # fmt: skip
                for _ in range(5):
                    prof.log_batch(1.0)
                res = prof.stop(timeout_s=2)
            assert res["batches_lost"] == 5 and res["batches_spooled"] == 0, res
            assert list((shared / "spool").iterdir()) == []
            assert "writable by" in caplog.text and str(shared) in caplog.text
            assert "5 batches were lost" in caplog.text
            assert not (shared / "daemon.json").exists()
            caplog.clear()
