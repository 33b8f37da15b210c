"""H3Profiler against real daemons: resuming an ended run, run ids, the spool's counts and
races, SIGTERM, SLURM steps, several profilers in one launch, a rank's final figures."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from h3client import Client, H3ClientError, H3Profiler, replay_spool
from h3client._distributed import detect
from h3client._spool import already_done, batch_seqs
from tests.conftest import REPO, Daemon
from tests.h3client.test_profiler import crashed_run

NOWHERE = "http://127.0.0.1:9"


def wait_for(what: Any, timeout_s: float = 60.0) -> Any:
    """Poll ``what()`` until it returns something true (a condition, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"still not true after {timeout_s} s")


def run_of(d: Daemon, rid: str) -> dict[str, Any]:
    with Client(d.url, data_dir=d.data_dir) as c:
        return c.get_run(rid)


# --- resuming a run that already ended (spool bug 2) ------------------------------------------


@pytest.mark.parametrize("status", ["finished", "failed"])
def test_resuming_a_run_its_client_ended_is_refused_at_construction(
    daemon: Daemon, status: str
) -> None:
    """Before: accepted silently; every batch of the new session was then refused (409)."""
    first = H3Profiler("ended", url=daemon.url, data_dir=daemon.data_dir)
    for _ in range(3):
        first.log_batch(1.0)
    first.stop(status)
    threads = threading.active_count()
    with pytest.raises(H3ClientError, match=rf"already ended \({status}\).*no more data"):
        H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=first.run_id)
    assert threading.active_count() == threads  # no sender left behind
    run = run_of(daemon, str(first.run_id))
    assert run["status"] == status and run["n_batches"] == 3


def test_a_run_ended_offline_is_refused_by_its_spooled_status(tmp_path: Path) -> None:
    """Before: the resumed session's batches were "spooled", behind the first session's
    final status, where `h3d import` could never store them."""
    first = H3Profiler("ended-offline", url=NOWHERE, data_dir=tmp_path, autostart=False)
    for _ in range(3):
        first.log_batch(1.0)
    assert first.stop(timeout_s=5)["batches_spooled"] == 3
    with pytest.raises(H3ClientError, match=r"already ended \(finished\)"):
        H3Profiler(url=NOWHERE, data_dir=tmp_path, run_id=first.run_id, autostart=False)


def test_a_run_its_reaper_failed_is_still_resumed(daemon_factory: Any) -> None:
    d = daemon_factory("reaped", H3D_RUN_EXIT_GRACE_S="0.5", H3D_RUN_REAP_EVERY_S="0.2")
    rid = crashed_run(d.url, d.data_dir)  # 12 batches, then its process is gone
    wait_for(lambda: run_of(d, rid)["status"] == "failed")  # the reaper failed it
    prof = H3Profiler(url=d.url, data_dir=d.data_dir, run_id=rid)
    for _ in range(2):
        prof.log_batch(0.1)
    res = prof.stop()
    assert res["batches_posted"] == 2 and res["batches_rejected"] == 0
    run = run_of(d, rid)
    assert run["status"] == "finished" and run["n_batches"] == 14


# --- the run id's form (spool bug 5) -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["my-run/1", "xyz", "0" * 31, "0" * 33, "g" * 32, 123])
def test_a_run_id_the_daemon_refuses_is_a_value_error(tmp_path: Path, bad: Any) -> None:
    threads = threading.active_count()
    with pytest.raises(ValueError, match="run_id: 32 hex digits"):
        H3Profiler(url=NOWHERE, data_dir=tmp_path, run_id=bad, autostart=False)
    assert threading.active_count() == threads
    assert not (tmp_path / "spool").exists()


def test_a_uuid_with_dashes_in_upper_case_resumes_the_same_run(daemon: Daemon) -> None:
    """Before: the id was taken as typed: 404, a create refused (422), every batch refused."""
    rid = crashed_run(daemon.url, daemon.data_dir)
    prof = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=str(uuid.UUID(rid)).upper())
    assert prof.run_id == rid
    prof.log_batch(0.1)
    res = prof.stop()
    assert res["batches_posted"] == 1 and res["batches_rejected"] == 0
    run = run_of(daemon, rid)
    assert run["status"] == "finished" and run["n_batches"] == 13


def test_a_uuids_other_forms_name_the_same_id(tmp_path: Path) -> None:
    rid = uuid.uuid4().hex
    for form in (rid.upper(), f"{{{uuid.UUID(rid)}}}", f"urn:uuid:{uuid.UUID(rid)}"):
        with pytest.raises(H3ClientError, match=f"cannot resume run {rid}"):  # nothing spooled
            H3Profiler(url=NOWHERE, data_dir=tmp_path, run_id=form, autostart=False)


# --- what the warning says waits in the spool (spool bug 6) -----------------------------------


def test_the_warning_names_the_batches_the_spool_holds_after_a_second_outage(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: it named every batch spooled during the session, those already replayed too."""
    prof = H3Profiler("twice", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=0.05)
    spool = daemon.data_dir / "spool" / f"{prof.run_id}.jsonl"
    for _ in range(5):
        prof.log_batch(1.0)
    assert prof.flush(timeout_s=30)
    daemon.kill()
    for _ in range(20):
        prof.log_batch(1.0)
    assert prof.flush(timeout_s=30) and spool.exists()  # the first outage's, spooled
    daemon.start()  # same port: the sender replays the spool once its back-off has passed

    def replayed() -> bool:
        prof.log_batch(1.0)
        prof.flush(timeout_s=30)
        return not spool.exists()

    wait_for(replayed)
    daemon.kill()
    for _ in range(7):
        prof.log_batch(1.0)
    with caplog.at_level(logging.WARNING, logger="h3client"):
        res = prof.stop(timeout_s=5)
    held = sum(
        len(batch_seqs(op["body"]))
        for op in map(json.loads, spool.read_text().splitlines())
        if op["op"] == "batches"
    )
    assert held >= 7 and res["batches_spooled"] >= held + 20  # the first outage's: replayed
    said = re.search(r"ended with (\d+) batches and its final status in the spool", caplog.text)
    assert said is not None and int(said.group(1)) == held


# --- replay_spool and files that vanish (spool bug 9) -----------------------------------------


def test_replay_spool_and_a_resume_survive_a_spool_file_that_vanished(daemon: Daemon) -> None:
    """A file listed, then gone before its stat (another process replayed and deleted it):
    a dangling link is such a file for every call. Before: FileNotFoundError, out of
    replay_spool and so out of H3Profiler(run_id=...)."""
    rid = crashed_run(daemon.url, daemon.data_dir)
    spool = daemon.data_dir / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    (spool / f"{'f' * 32}.jsonl").symlink_to(spool / "gone.jsonl")
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert replay_spool(c, spool, run_id=rid)["failed"] == []
        assert replay_spool(c, spool)["files"] == 0
    prof = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=rid)
    prof.log_batch(0.1)
    assert prof.stop()["batches_posted"] == 1


# --- SIGTERM (dist bug 1) ----------------------------------------------------------------------

#: A process that logs 5 batches, prints its run id, and waits to be ended. argv: url, data
#: dir, what to do before the profiler starts ("none", "handler": a SIGTERM handler of its
#: own, which prints and exits 7) and after ("sleep", "fork": a forked child that prints its
#: pid and sleeps; then a line on stdin stops the run).
WAITING = (
    "import os, signal, sys, time\n"
    "from h3client import H3Profiler\n"
    "if sys.argv[3] == 'handler':\n"
    "    def mine(signum, frame):\n"
    "        print('mine', flush=True)\n"
    "        os._exit(7)\n"
    "    signal.signal(signal.SIGTERM, mine)\n"
    "p = H3Profiler('sigterm', url=sys.argv[1], data_dir=sys.argv[2], autostart=False)\n"
    "for _ in range(5):\n"
    "    p.log_batch(1.0)\n"
    "assert p.flush(timeout_s=60)\n"
    "print(p.run_id, flush=True)\n"
    "if sys.argv[4] == 'fork':\n"
    "    child = os.fork()\n"
    "    if child == 0:\n"
    "        print(os.getpid(), flush=True)  # running, its signal handling set up\n"
    "        time.sleep(120)\n"
    "        os._exit(0)\n"
    "    sys.stdin.readline()\n"
    "    _, how = os.waitpid(child, 0)\n"
    "    print(os.WTERMSIG(how) if os.WIFSIGNALED(how) else -1, flush=True)\n"
    "    print(p.stop()['batches_posted'], flush=True)\n"
    "else:\n"
    "    time.sleep(120)\n"
)


def waiting(d: Daemon, before: str, after: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WAITING, d.url, str(d.data_dir), before, after],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.fixture
def patient(daemon_factory: Any) -> Daemon:
    """A daemon that would fail a run whose process exited only after ten minutes."""
    return daemon_factory("patient", H3D_RUN_EXIT_GRACE_S="600")


def test_a_sigtermed_process_fails_its_run_and_dies_of_the_signal(patient: Daemon) -> None:
    """torchrun's SIGTERM to the ranks that survive a crashed one: before, the run stayed
    running (for an hour, for a rank of a distributed run)."""
    proc = waiting(patient, "none", "sleep")
    assert proc.stdout is not None
    rid = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    run = run_of(patient, rid)
    assert run["status"] == "failed" and run["n_batches"] == 5


def test_sigterm_chains_to_the_handler_the_process_had(patient: Daemon) -> None:
    proc = waiting(patient, "handler", "sleep")
    assert proc.stdout is not None
    rid = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7 and out.strip() == "mine", err
    assert run_of(patient, rid)["status"] == "failed"


def test_a_forked_child_sigtermed_does_not_end_its_parents_run(patient: Daemon) -> None:
    proc = waiting(patient, "none", "fork")
    assert proc.stdout is not None and proc.stdin is not None
    rid = proc.stdout.readline().strip()
    child = int(proc.stdout.readline())
    os.kill(child, signal.SIGTERM)
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == [str(int(signal.SIGTERM)), "5"]  # the child died of it, untouched
    assert run_of(patient, rid)["status"] == "finished"


# --- a process in a SLURM job that is no srun step (dist bug 2) --------------------------------

BATCH_SCRIPT = {"SLURM_JOB_ID": "4243", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}


def test_slurm_variables_are_a_rank_only_in_an_srun_step() -> None:
    env = {**BATCH_SCRIPT, "SLURM_LOCALID": "0"}
    assert detect(env) is None  # the batch script: no SLURM_STEP_ID
    for step in ("4294967291", "4294967290", "4294967292", "batch", "extern", "interactive"):
        assert detect({**env, "SLURM_STEP_ID": step}) is None, step
    info = detect({**env, "SLURM_STEP_ID": "3", "SLURM_PROCID": "1"})
    assert info is not None and (info.rank, info.world_size) == (1, 4)
    # srun -n 2 inside a 4-task job: the step's tasks
    info = detect({**env, "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "2"})
    assert info is not None and info.world_size == 2
    assert detect({**env, "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "1"}) is None


def test_a_batch_scripts_process_is_a_single_process_run(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: rank 0 of 4; the reaper failed the run since the other three never joined."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in BATCH_SCRIPT.items():
        monkeypatch.setenv(key, value)
    prof = H3Profiler("sbatch-single", url=daemon.url, data_dir=daemon.data_dir)
    assert prof.dist is None
    prof.log_batch(1.0)
    prof.stop()
    run = run_of(daemon, str(prof.run_id))
    assert run["status"] == "finished" and run["world_size"] is None


def test_a_requeued_job_and_another_step_under_a_fixed_rdzv_id_are_new_runs() -> None:
    step = {"SLURM_JOB_ID": "5151", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    first = detect(step)
    requeued = detect({**step, "SLURM_RESTART_COUNT": "1"})
    assert first is not None and requeued is not None
    assert first.job_key == "slurm:5151:0" and requeued.job_key != first.job_key
    rdzv = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "5151"}
    keys = {
        detect({**rdzv, **extra}).job_key  # type: ignore[union-attr]
        for extra in (
            {"SLURM_JOB_ID": "5151", "SLURM_STEP_ID": "0"},
            {"SLURM_JOB_ID": "5151", "SLURM_STEP_ID": "1"},
            {"SLURM_JOB_ID": "5151", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"},
        )
    }
    assert len(keys) == 3


# --- two profilers in one launch; a launch that reuses a finished run's id (dist bug 3) --------

#: One rank of a 2-rank launch (RANK, WORLD_SIZE and TORCHELASTIC_RUN_ID in its environment)
#: that runs two trials, each with its own H3Profiler of one name. argv: url, data dir.
TRIALS = (
    "import json, sys\n"
    "from h3client import H3ClientError, H3Profiler\n"
    "out = []\n"
    "for trial in range(2):\n"
    "    try:\n"
    "        p = H3Profiler('sweep', url=sys.argv[1], data_dir=sys.argv[2], autostart=False,\n"
    "                       config={'trial': trial}, flush_interval_s=0.05)\n"
    "    except H3ClientError as exc:\n"
    "        out.append(['error', str(exc)])\n"
    "        continue\n"
    "    for _ in range(10):\n"
    "        p.log_batch(1.0 + trial)\n"
    "    r = p.stop(timeout_s=60)\n"
    "    out.append([r['run_id'], r['batches_posted'], r['batches_rejected'], r['partial']])\n"
    "print(json.dumps(out), flush=True)\n"
)


def launch(d: Daemon, rdzv: str) -> tuple[list[Any], str]:
    """Both ranks of one launch at once; each rank's trials, and what they logged."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "H3D_")) and k not in ("RANK",)
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRIALS, d.url, str(d.data_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": rdzv},
        )  # fmt: skip
        for r in range(2)
    ]
    outs, errs = [], ""
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
        errs += err
    return outs, errs


def test_each_profiler_of_a_launch_has_its_own_run_and_a_finished_one_is_not_joined(
    daemon: Daemon,
) -> None:
    """Before: the second trial derived the first's id and silently "joined" its finished
    run (its batches acknowledged as duplicates, reported posted); a later launch with the
    same fixed --rdzv-id did the same with the first launch's runs."""
    (rank0, rank1), _ = launch(daemon, "fixed-100")
    assert [t[0] for t in rank0] == [t[0] for t in rank1]  # every rank in the trial's run
    assert rank0[0][0] != rank0[1][0]  # a run a trial
    assert all(t[1:] == [10, 0, False] for t in rank0 + rank1)
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        for trial, (rid, *_) in enumerate(rank0):
            run = c.get_run(rid)
            assert run["status"] == "finished" and run["n_batches"] == 20
            assert run["config"] == {"trial": trial} and run["world_size"] == 2
    # the same launch again: its profilers' ids are those of finished runs, which take no
    # more data: refused at construction, saying why
    (again0, again1), _err = launch(daemon, "fixed-100")
    for t in again0 + again1:
        assert t[0] == "error" and "already ended (finished)" in t[1] and "--rdzv-id" in t[1]
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert [c.get_run(t[0])["n_batches"] for t in rank0] == [20, 20]


def test_a_create_refused_because_the_run_ended_is_not_taken_for_done() -> None:
    """A rank joining a run that ended is answered 409 run_finished (a rank already in it,
    200): its batches would be stored nowhere, so the sender must not count it as done."""
    assert not already_done("create", "run_finished")
    assert already_done("create", "run_exists")  # a replayed or resumed create
    assert already_done("update", "run_finished") and already_done("update", "run_exists")
    assert not already_done("batches", "run_finished")


# --- a rank's results are the run's (dist bug 4) -----------------------------------------------


def _two_ranks_logged(daemon: Daemon, rid: str) -> list[H3Profiler]:
    """Both ranks of a 2-rank run ``rid``, each with 10 batches logged."""
    profs = [
        H3Profiler("ranks", url=daemon.url, data_dir=daemon.data_dir, run_id=rid, rank=r,
                   world_size=2, flush_interval_s=0.05)
        for r in range(2)
    ]  # fmt: skip
    for k in range(10):
        for p in profs:
            p.log_batch(2.0 - 0.1 * k)
    return profs


def test_a_ranks_stop_waits_for_the_run_to_end_and_says_when_it_did_not(daemon: Daemon) -> None:
    """Before: rank 0's stop() fetched the report of a run still running, unmarked."""
    rid = uuid.uuid4().hex
    profs = _two_ranks_logged(daemon, rid)
    early = profs[0].stop(timeout_s=1.0)  # rank 1 goes on: the run's figures are not final
    assert early["partial"] is True and early["status"] == "running"
    assert early["total_energy_j"] is not None  # the figures so far, marked as such
    assert profs[1].stop()["partial"] is False

    rid2 = uuid.uuid4().hex
    profs = _two_ranks_logged(daemon, rid2)
    got: dict[str, Any] = {}
    first = threading.Thread(target=lambda: got.update(profs[0].stop(timeout_s=60)))
    first.start()

    def rank0_done() -> bool:
        with Client(daemon.url, data_dir=daemon.data_dir) as c:
            return [r["status"] for r in c.report(rid2)["ranks"]][:1] == ["finished"]

    wait_for(rank0_done)  # rank 0 is in its stop(), after its end reached the daemon
    for _ in range(5):
        profs[1].log_batch(1.0)
    last = profs[1].stop()
    first.join(timeout=60)
    assert got["partial"] is False and got["status"] == "finished"
    assert last["partial"] is False and last["status"] == "finished"
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rep = c.report(rid2)
    assert rep["n_batches"] == 25
    # rank 0's figures are the finished run's: its window, which rank 1's end closed
    assert got["duration_s"] == pytest.approx(rep["duration_s"])
    assert got["duration_s"] == pytest.approx(last["duration_s"])
