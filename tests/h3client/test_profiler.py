"""H3Profiler against real daemons: training end to end, outages, offline runs, autostart."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from h3client import (
    Client,
    H3ClientError,
    H3ConnectionError,
    H3Profiler,
    H3RunNotFound,
    replay_spool,
)
from h3client._spool import batch_seqs
from tests.conftest import REPO, Daemon, daemon_env
from tests.h3client.conftest import FakeCudaTensor, FakeEvent
from tests.h3client.test_docs_client import stored_config


def digits_loop(prof: H3Profiler, epochs: int = 3) -> tuple[list[float], list[float]]:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    tr, te = torch.arange(0, 1500), torch.arange(1500, len(y))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    logged, accs = [], []
    for epoch in range(epochs):
        perm = tr[torch.randperm(len(tr))]
        for i in range(0, len(perm), 50):
            idx = perm[i : i + 50]
            losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            prof.log_batch(loss, losses=losses, indices=idx, epoch=epoch)
            logged.append(loss.item())
        with torch.no_grad():
            acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
        accs.append(acc)
        prof.log_epoch(epoch, accuracy=acc, phase="thermodynamic", keep_frac=1.0)
    return logged, accs


def test_a_real_training_loop_end_to_end(daemon: Daemon, tmp_path: Path) -> None:
    prof = H3Profiler(
        "digits", url=daemon.url, data_dir=daemon.data_dir, n_train=1500, config={"lr": 3e-3}
    )
    logged, accs = digits_loop(prof)
    res = prof.stop()
    assert res["batches_logged"] == res["batches_posted"] == len(logged) == 90
    assert res["batches_lost"] == res["batches_spooled"] == 0 and not res["offline"]
    assert res["energy_source"] == "estimated" and res["total_energy_j"] > 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(prof.run_id)
        assert run["status"] == "finished" and run["n_batches"] == 90 and run["n_epochs"] == 3
        assert run["config"]["lr"] == 3e-3 and run["n_train"] == 1500
        # the report agrees with the stored series
        series = c.series(prof.run_id, "loss", points=10_000)
        assert [round(v, 5) for _t, v in series] == [round(v, 5) for v in logged]
        k = max(1, min(50, len(logged) // 10))
        expected_bits = (logged[0] - sum(logged[-k:]) / k) / math.log(2)
        assert res["info_gain_bits"] == pytest.approx(expected_bits, rel=1e-4)
        assert res["efficiency_bits_per_j"] == pytest.approx(
            expected_bits / res["total_energy_j"], rel=1e-6
        )
        assert [e["accuracy"] for e in res["epochs"]] == pytest.approx(accs)
        assert res["epochs"][0]["metrics"] == {"keep_frac": 1.0}
    text = prof.get_report()
    assert "bits/J" in text and "ESTIMATED" in text and "epoch" in text
    out = prof.export_csv(tmp_path / "run.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seq"]) for r in rows] == list(range(90))
    with open(prof.export_samples_csv(tmp_path / "samples.csv"), newline="") as f:
        assert f.readline().strip() == "seq,epoch,index,loss"  # logged without per-sample
    with Client(daemon.url, data_dir=daemon.data_dir) as c, pytest.raises(H3RunNotFound):
        c.export_samples_csv("0" * 32, tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()  # an error answer writes no file
    kept = tmp_path / "kept.csv"
    kept.write_text("the user's file\n")
    with Client("http://127.0.0.1:9", data_dir=tmp_path) as c, pytest.raises(H3ConnectionError):
        c.export_samples_csv(str(prof.run_id), kept)  # no daemon there
    assert kept.read_text() == "the user's file\n"  # left as it was


def test_the_daemon_killed_twice_mid_stream_loses_nothing(daemon: Daemon) -> None:
    prof = H3Profiler(
        "outage", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=0.1, max_batch=1000
    )
    n = 20_000
    vec = [0.5] * 16

    def chaos() -> None:
        for _ in range(2):
            time.sleep(1.0)
            daemon.kill()  # SIGKILL: no goodbye
            time.sleep(0.5)
            daemon.start()

    killer = threading.Thread(target=chaos)
    killer.start()
    t0 = time.monotonic()
    for s in range(n):
        prof.log_batch(1.0 + 1.0 / (1 + s), losses=vec, indices=list(range(16)))
        if s % 400 == 399:
            time.sleep(0.03)  # a training loop takes time; spread the stream over the outages
    killer.join()
    res = prof.stop(timeout_s=60)
    assert time.monotonic() - t0 < 60
    assert res["batches_lost"] == 0 and res["flushed"]
    assert res["batches_spooled"] > 0  # the outages were real
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(prof.run_id)
        assert run["n_batches"] == n and run["last_seq"] == n - 1 and run["status"] == "finished"
        text = c.request("GET", f"/v1/runs/{prof.run_id}/export.csv").text.splitlines()
    seqs = [int(line.split(",")[0]) for line in text[1:]]
    assert seqs == list(range(n))  # each exactly once, in order
    assert not list((daemon.data_dir / "spool").glob("*.jsonl"))  # spool fully replayed


def test_offline_run_spools_and_is_complete_after_replay(
    tmp_path: Path, daemon_factory: Any
) -> None:
    data = tmp_path / "late"
    prof = H3Profiler(
        "offline", data_dir=data, autostart=False, url="http://127.0.0.1:9", flush_interval_s=0.05
    )
    for s in range(500):
        prof.log_batch(2.0 - s / 500, losses=[1.0, 2.0], epoch=s // 250)
    prof.log_epoch(0, accuracy=0.5)
    res = prof.stop()
    assert res["offline"] and res["batches_spooled"] == 500 and res["batches_lost"] == 0
    assert (data / "spool" / f"{prof.run_id}.jsonl").exists()
    # a daemon comes up on that data dir later; the spool is replayed
    d = Daemon(
        data, daemon_env(data, H3D_POWER_BACKENDS="constant:5", H3D_LOG_LEVEL="WARNING")
    ).start()
    try:
        with Client(d.url, data_dir=data) as c:
            summary = replay_spool(c, data / "spool")
            assert summary["failed"] == [] and summary["files"] == 1
            run = c.get_run(prof.run_id)
            assert run["n_batches"] == 500 and run["n_epochs"] == 1 and run["status"] == "finished"
            assert run["created_at"] == pytest.approx(prof._t_start)
            # replaying again changes nothing
            assert replay_spool(c, data / "spool")["files"] == 0
    finally:
        d.stop()


def test_the_spool_is_private_like_the_daemons_data_dir(tmp_path: Path) -> None:
    """The spool holds the run's config and losses beside the token: 0700 dirs, 0600 files
    (they were 0755 and 0644, against docs/daemon.md's Security)."""
    data = tmp_path / "private"
    prof = H3Profiler("private", data_dir=data, autostart=False, url="http://127.0.0.1:9")
    prof.log_batch(1.0)
    assert prof.stop(timeout_s=5)["batches_spooled"] == 1
    spool = data / "spool"
    assert [oct(p.stat().st_mode & 0o777) for p in (data, spool)] == ["0o700", "0o700"]
    assert {oct(f.stat().st_mode & 0o777) for f in spool.iterdir()} == {"0o600"}


def test_epochs_numbered_from_1_are_warned_once_and_offline_results_have_every_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``for epoch in range(1, 4)`` with ``log_epoch(epoch)``: the first epoch's batches
    were stored as epoch 0 silently (a phantom epoch in the report); now a warning says so,
    once. The offline results carry every key the online ones do (None)."""
    prof = H3Profiler("from-1", data_dir=tmp_path, autostart=False, url="http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="h3client"):
        for epoch in range(1, 4):
            for _ in range(3):
                prof.log_batch(1.0)
            prof.log_epoch(epoch, accuracy=0.5)
    warned = [
        r for r in caplog.records if "log_epoch(1) after batches logged as epoch 0" in r.message
    ]
    assert len(warned) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="h3client"):
        for epoch in range(4, 6):  # epoch= on both: nothing to say
            prof.log_batch(1.0, epoch=epoch)
            prof.log_epoch(epoch)
    assert "log_epoch(" not in caplog.text
    res = prof.stop(timeout_s=5)
    assert res["offline"] and res["stopping_point"] is None
    assert res["info_gain_total_bits"] is None


def test_a_final_status_the_disk_refused_is_not_said_to_be_in_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "full"
    data.mkdir()
    (data / "spool").write_text("")  # a file where the spool dir goes: every write fails
    prof = H3Profiler("full", data_dir=data, autostart=False, url="http://127.0.0.1:9")
    prof.log_batch(1.0)
    with caplog.at_level(logging.WARNING, logger="h3client"):
        res = prof.stop(timeout_s=2)
    assert res["batches_lost"] == 1 and res["batches_spooled"] == 0
    text = caplog.text
    assert "final status in the spool" not in text
    assert "reached neither the daemon nor the spool" in text


def test_resume_continues_the_sequence(daemon: Daemon) -> None:
    first = H3Profiler("resume", url=daemon.url, data_dir=daemon.data_dir)
    for _s in range(10):
        first.log_batch(1.0)
    first.flush()
    second = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=first.run_id)
    for _s in range(5):
        second.log_batch(0.5)
    res = second.stop()
    first._stopped = True  # the first process "died"
    assert res["batches_posted"] == 5
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(first.run_id)
    assert run["n_batches"] == 15 and run["last_seq"] == 14


#: A training process that logs 3 epochs of 4 batches, flushes them, and dies (os._exit: no
#: final status, as a crash or a SIGKILL). argv: url, data dir. Prints the run id.
CRASHED_RUN = (
    "import os, sys\n"
    "from h3client import H3Profiler\n"
    "p = H3Profiler('crashed', url=sys.argv[1], data_dir=sys.argv[2], autostart=False)\n"
    "for e in range(3):\n"
    "    for _ in range(4):\n"
    "        p.log_batch(1.0 / (e + 1))\n"
    "    p.log_epoch(accuracy=0.5 + e / 10)\n"
    "assert p.flush(timeout_s=60)\n"
    "print(p.run_id, flush=True)\n"
    "os._exit(1)\n"
)


def crashed_run(url: str, data_dir: Path) -> str:
    r = subprocess.run(
        [sys.executable, "-c", CRASHED_RUN, url, str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    return r.stdout.strip()


def test_a_resumed_run_continues_its_epochs_and_counts_only_its_own_batches(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the resumed profiler numbered its batches and epochs from epoch 0 again (its
    log_epoch, a duplicate of the stored epoch 0, was dropped), and its batches_logged
    counted the crashed session's 12 batches too (17 logged, 5 posted: "the batch
    accounting does not add up")."""
    rid = crashed_run(daemon.url, daemon.data_dir)
    with caplog.at_level(logging.INFO, logger="h3client"):
        prof = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=rid)
        for _ in range(5):
            prof.log_batch(0.2)
        assert prof.batches_logged == 5
        prof.log_epoch(accuracy=0.9)  # epoch 3's end
        res = prof.stop()
    assert res["batches_logged"] == res["batches_posted"] == 5
    assert res["batches_spooled"] == res["batches_rejected"] == res["batches_lost"] == 0
    assert "5 batches logged = 5 posted" in caplog.text and "does not add up" not in caplog.text
    out = tmp_path / "batches.csv"
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(rid)
        epochs = [(e["epoch"], e["accuracy"]) for e in c.report(rid)["epochs"]]
        c.export_csv(rid, out)
    assert run["n_batches"] == 17 and run["n_epochs"] == 4 and run["last_seq"] == 16
    assert epochs == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.9)]
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 5
    assert [int(r["seq"]) for r in rows] == list(range(17))


def test_an_epoch_number_the_run_holds_is_kept_as_first_logged(daemon: Daemon) -> None:
    """What docs/client.md says of a resumed run: log_epoch with the number of an epoch
    already stored is acknowledged as a duplicate and not stored (the first one stays)."""
    rid = crashed_run(daemon.url, daemon.data_dir)
    prof = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=rid)
    prof.log_epoch(1, accuracy=0.99)  # epoch 1 is stored: this one is not
    prof.log_epoch(3, accuracy=0.8)
    res = prof.stop()
    assert res["log_errors"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        epochs = [(e["epoch"], e["accuracy"]) for e in c.report(rid)["epochs"]]
    assert epochs == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]


def test_a_run_resumed_offline_continues_after_its_spooled_batches_and_epochs(
    tmp_path: Path,
) -> None:
    data, url = tmp_path / "offline", "http://127.0.0.1:9"
    rid = crashed_run(url, data)  # no daemon: all of it in the spool
    prof = H3Profiler(url=url, data_dir=data, run_id=rid, autostart=False)
    for _ in range(2):
        prof.log_batch(0.2)
    prof.log_epoch(accuracy=0.9)
    res = prof.stop()
    assert res["offline"] and res["batches_logged"] == res["batches_spooled"] == 2
    ops = [json.loads(line) for line in (data / "spool" / f"{rid}.jsonl").read_text().splitlines()]
    batches = [rows for op in ops if op["op"] == "batches" for rows in batch_rows(op["body"])]
    epochs = [e["epoch"] for op in ops if op["op"] == "epochs" for e in op["body"]["epochs"]]
    assert [b[0] for b in batches] == list(range(14))
    assert [b[1] for b in batches] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert epochs == [0, 1, 2, 3]


def batch_rows(body: dict[str, Any]) -> list[tuple[int, int | None]]:
    """(seq, epoch) of each batch of a batches body, in either form."""
    if "batches" in body:
        return [(b["seq"], b.get("epoch")) for b in body["batches"]]
    seqs = batch_seqs(body)
    return list(zip(seqs, body["columns"].get("epoch", [None] * len(seqs)), strict=True))


def test_context_manager_marks_a_crashed_run_failed(daemon: Daemon) -> None:
    with (
        pytest.raises(ZeroDivisionError),
        H3Profiler("crash", url=daemon.url, data_dir=daemon.data_dir) as prof,
    ):
        prof.log_batch(1.0)
        1 / 0  # noqa: B018
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert c.get_run(prof.run_id)["status"] == "failed"


def test_log_batch_never_raises(daemon: Daemon) -> None:
    prof = H3Profiler("junk", url=daemon.url, data_dir=daemon.data_dir)
    prof.log_batch(object())  # unreadable: counted, not raised
    prof.log_batch("not a number")
    prof.log_batch(float("nan"))
    prof.log_batch(1.0)
    res = prof.stop()
    assert res["log_errors"] == 2 and res["batches_posted"] == 2


def test_indices_without_losses_leave_their_batch_out_counted_and_the_others_stored(
    daemon: Daemon,
) -> None:
    """``indices`` name the per-sample losses; alone they pair with nothing. Whether a
    tensor (the fast path's form) or a list, such a batch is left out and counted rejected,
    and positional ``losses``/``indices`` are the keyword ones."""
    prof = H3Profiler(
        "lone-indices", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=3600
    )
    prof.log_batch(1.0, indices=torch.tensor([0, 1]))
    prof.log_batch(torch.tensor(0.5), indices=[2, 3])
    prof.log_batch(0.25, torch.tensor([1.0, 2.0]), torch.tensor([4, 5]))
    prof.log_batch(0.125)
    res = prof.stop()
    assert (res["batches_posted"], res["batches_rejected"], res["log_errors"]) == (2, 2, 0)
    with daemon.client() as api:
        run = api.get(f"/v1/runs/{prof.run_id}").json()
    assert run["n_batches"] == 2


def test_a_bool_loss_next_to_an_unreadable_batch_sinks_no_other_batch(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Before: the request fell back to one object per batch, wrote the bool loss as
    ``True`` (not JSON), and the daemon refused it whole: every batch in it rejected."""
    prof = H3Profiler("bool-loss", url=daemon.url, data_dir=daemon.data_dir, flush_interval_s=3600)
    prof.log_batch(1.5, losses=torch.tensor([1.0, 2.0]), indices=torch.tensor([0, 1]))
    prof.log_batch(torch.tensor(True), losses=torch.tensor([True, False]), indices=[2, 3])
    prof.log_batch(1.0, losses=torch.tensor([1.0, 2.0, 3.0]), indices=torch.tensor([4, 5]))
    prof.log_batch(torch.tensor(False))
    res = prof.stop()  # the four batches in one request
    assert res["batches_posted"] == 3 and res["batches_rejected"] == 1 and res["log_errors"] == 0
    out = tmp_path / "batches.csv"
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        c.export_csv(str(prof.run_id), out)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(int(r["seq"]), float(r["loss"])) for r in rows] == [(0, 1.5), (1, 1.0), (3, 0.0)]
    # alone in its request (the packed columns), a bool loss is stored as the same number
    prof = H3Profiler("bool-alone", url=daemon.url, data_dir=daemon.data_dir)
    prof.log_batch(torch.tensor(True))
    assert prof.stop()["batches_posted"] == 1
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert [v for _t, v in c.series(str(prof.run_id), "loss")] == [1.0]


def stored_sample_losses(daemon: Daemon, run_id: str, n: int) -> list[Any]:
    """Batches 0..n-1's (losses, indices) as a user reads them: the per-sample CSV export."""
    import csv
    import struct

    def f32(text: str) -> float:  # 9 digits name one float32 exactly: read it back as one
        return float(struct.unpack("f", struct.pack("f", float(text)))[0])

    out = daemon.data_dir / f"{run_id}-samples.csv"
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        c.export_samples_csv(run_id, out)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    by_seq: dict[int, tuple[list[float], list[int]]] = {k: ([], []) for k in range(n)}
    for r in rows:
        losses, indices = by_seq[int(r["seq"])]
        losses.append(f32(r["loss"]))
        indices.append(int(r["index"]))
    return [by_seq[k] for k in range(n)]


def test_what_is_stored_is_what_was_logged_though_the_tensors_change_afterwards(
    daemon: Daemon,
) -> None:
    """Buffers reused in place, graphs freed by backward(): the daemon gets the values as
    they were at each log_batch call."""
    prof = H3Profiler("in-place", url=daemon.url, data_dir=daemon.data_dir)
    torch.manual_seed(0)
    w = torch.randn(16, requires_grad=True)
    losses_buf, idx_buf = torch.empty(16), torch.empty(16, dtype=torch.int64)
    expected = []
    for k in range(200):
        losses = (w * (k + 1)) ** 2  # requires grad, non-leaf
        loss = losses.mean()
        losses_buf.copy_(losses.detach())
        torch.arange(16, out=idx_buf).add_(16 * k)
        prof.log_batch(loss, losses=losses_buf, indices=idx_buf)
        prof.log_batch(loss, losses=losses, indices=idx_buf)  # the graph itself
        expected += [(loss.item(), losses.tolist(), idx_buf.tolist())] * 2
        loss.backward()  # frees the graph
        with torch.no_grad():
            losses.mul_(0)  # after backward: the logged values must not change
            loss.fill_(-1.0)
        losses_buf.fill_(-1.0)  # the buffers are overwritten before the sender reads them
        idx_buf.fill_(-1)
    res = prof.stop()
    assert res["batches_posted"] == 400 and res["log_errors"] == 0 and res["batches_rejected"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        series = c.series(str(prof.run_id), "loss", points=10_000)
    assert [v for _t, v in series] == [e[0] for e in expected]  # float32, exactly
    stored = stored_sample_losses(daemon, str(prof.run_id), 400)
    assert [s[0] for s in stored] == [e[1] for e in expected]
    assert [s[1] for s in stored] == [e[2] for e in expected]


def test_a_calls_cuda_copies_share_one_event_per_device(
    daemon: Daemon, fake_cuda: list[FakeEvent]
) -> None:
    """The loss, the per-sample losses and the indices of one call are copied off the GPU
    without blocking; one event per device, recorded after its copies on its stream, is what
    the sender waits on (not one per tensor: each record is a driver call on the training
    thread)."""
    prof = H3Profiler("gpu", url=daemon.url, data_dir=daemon.data_dir)
    vec, idx = torch.tensor([0.5, 1.5, 2.5]), torch.tensor([7, 8, 9])
    prof.log_batch(
        FakeCudaTensor(torch.tensor(0.25)),
        losses=FakeCudaTensor(vec),
        indices=FakeCudaTensor(idx),
    )
    assert [e.stream for e in fake_cuda] == [("current stream of", "cuda:0")]
    prof.log_batch(  # a model split over two GPUs: one event on each
        FakeCudaTensor(torch.tensor(0.75), device="cuda:1"),
        losses=FakeCudaTensor(vec * 2, device="cuda:0"),
        indices=idx + 3,  # on the CPU: copied during the call, no event
    )
    assert [e.stream for e in fake_cuda[1:]] == [
        ("current stream of", "cuda:1"),
        ("current stream of", "cuda:0"),
    ]
    res = prof.stop()
    assert res["batches_posted"] == 2 and res["log_errors"] == 0
    assert all(e.synced for e in fake_cuda)  # the sender waited on them, not the loop
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert [v for _t, v in c.series(str(prof.run_id), "loss")] == [0.25, 0.75]
    stored = stored_sample_losses(daemon, str(prof.run_id), 2)
    assert stored == [([0.5, 1.5, 2.5], [7, 8, 9]), ([1.0, 3.0, 5.0], [10, 11, 12])]


def test_log_batch_queues_bytes_and_keeps_nothing_of_the_tensors(tmp_path: Path) -> None:
    """The inline fast path: what is queued is copies, not the tensors nor their graph."""
    import gc
    import weakref

    prof = H3Profiler(
        "offline", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
        flush_interval_s=3600, max_batch=10**6,
    )  # fmt: skip
    w = torch.randn(32, requires_grad=True)
    hidden = w * 3  # saved by the graph below
    losses = hidden**2
    idx = torch.arange(32)
    mean = losses.mean()
    # the worker's first pass (the run's create) done: it then sleeps until its hour-long
    # tick, and the queue below is read as log_batch left it
    assert prof.flush(timeout_s=10)
    prof.log_batch(mean, losses=losses, indices=idx)  # torch was imported before start()
    prof.log_batch(losses, losses=losses, indices=idx)  # a loss of 32 elements: unreadable
    assert prof._proc is not None
    (_seq, _t, loss, vec, ids, *_rest) = prof._proc.batches[0]
    assert type(loss) is float and loss == mean.item()  # a CPU loss is read with item()
    assert [type(x) for x in (vec, ids)] == [tuple] * 2
    assert vec[0] == losses.detach().numpy().tobytes() and ids[0] == idx.numpy().tobytes()
    unreadable = prof._proc.batches[1][2]  # queued as bytes; the sender rejects it
    assert type(unreadable) is tuple and unreadable[0] == vec[0]
    del mean
    kept = weakref.ref(hidden)
    del hidden, losses
    gc.collect()
    assert kept() is None
    res = prof.stop(timeout_s=10)
    assert res["batches_spooled"] == 1 and res["batches_rejected"] == 1
    assert res["log_errors"] == 0


def test_the_first_log_batch_of_a_fresh_process_takes_the_fast_path(tmp_path: Path) -> None:
    """torch imported before the profiler starts (a training script): the first loss logged
    is already read as its value, not copied the slow way."""
    code = (
        "import torch\n"
        "from h3client import H3Profiler\n"
        f"p = H3Profiler('x', url='http://127.0.0.1:9', data_dir={str(tmp_path)!r}, "
        "autostart=False, flush_interval_s=3600)\n"
        "assert p.flush(timeout_s=10)\n"  # the worker's first pass done: it sleeps now
        "w = torch.randn(4, requires_grad=True)\n"
        "p.log_batch((w * 2).mean())\n"
        "print(type(p._proc.batches[0][2]).__name__)\n"
        "p.stop(timeout_s=10)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["float"]


def test_autostart_launches_a_daemon_that_outlives_the_profiler(tmp_path: Path) -> None:
    """The constructor returns once the daemon it starts reads power, before it serves (the
    rest of its start, 0.5 to 1.3 s by host, overlaps the training), and the run's energy
    covers it from its start: the daemon's readings from before it served are the
    sampler's, and so are its busy CPU readings, from which the run's CPU share counts from
    its start. (A constructor that returned at once, with no readings before the daemon
    served, left the run's first ~0.5 s unread, short of the gap that reports it, and its
    CPU share counted from the wrong start: a 3 s run reported 9 J of 30.)"""
    data = tmp_path / "auto"
    code = (
        "import os, time\n"
        "from h3client import H3Profiler\n"
        "from h3d.attribution import busy_cpu_s\n"
        "p = H3Profiler('auto')\n"
        "returned = time.time()\n"
        "c0, b0 = sum(os.times()[:4]), busy_cpu_s()\n"
        "p.log_batch(1.0)\n"
        "end = time.monotonic() + 1.0\n"
        "while time.monotonic() < end: pass\n"
        "c1, b1 = sum(os.times()[:4]), busy_cpu_s()\n"
        "p.log_batch(0.5)\n"
        "print(p.stop()['batches_posted'], p.run_id, returned, (c1 - c0) / (b1 - b0))\n"
    )
    env = daemon_env(data, H3D_POWER_BACKENDS="constant:5", H3D_LOG_LEVEL="WARNING")
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    posted, run_id, returned, expected_share = r.stdout.split()
    assert posted == "2"
    import json

    info = json.loads((data / "daemon.json").read_text())
    try:
        assert float(returned) < info["started_at"]  # it served after the constructor returned
        with Client(info["url"], data_dir=data) as c:
            assert c.health() and c.get_run(run_id)["n_batches"] == 2
            energy = c.energy(run_id)
        assert energy["duration_s"] >= 1.0
        (device,) = energy["by_device"]
        assert device["covered_s"] == pytest.approx(energy["duration_s"]), energy
        assert device["gaps_s"] == 0
        # its share of the machine's busy CPU, as the script measured it beside the daemon
        share, want = energy["energy_j"] / device["device_energy_j"], float(expected_share)
        assert abs(share - min(1.0, want)) <= 0.2 * want + 0.05, (share, want)
    finally:
        import os
        import signal

        os.kill(info["pid"], signal.SIGTERM)


def test_profilers_that_start_together_start_one_daemon_between_them(tmp_path: Path) -> None:
    # torchrun's ranks, or scripts launched together, on a data dir no daemon serves yet:
    # before, each started a daemon, all but one exited at the data dir's lock, and their
    # profilers ran offline on the spool
    data = tmp_path / "together"
    code = (
        "import sys\n"
        "from h3client import H3Profiler\n"
        "p = H3Profiler('together-' + sys.argv[1])\n"
        "p.log_batch(1.0); p.log_batch(0.5)\n"
        "r = p.stop()\n"
        "print(r['batches_posted'], r['offline'])\n"
    )
    env = daemon_env(data, H3D_POWER_BACKENDS="constant:5", H3D_LOG_LEVEL="WARNING")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    import json
    import os
    import signal

    info = json.loads((data / "daemon.json").read_text())
    try:
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0 and out.split() == ["2", "False"], err
        with Client(info["url"], data_dir=data) as c:
            runs = c.list_runs()["data"]
        assert sorted(r["name"] for r in runs) == [f"together-{i}" for i in range(3)]
        assert all(r["n_batches"] == 2 for r in runs)
    finally:
        os.kill(info["pid"], signal.SIGTERM)


def test_import_is_light() -> None:
    code = "import sys, time; t=time.perf_counter(); import h3client; print(time.perf_counter()-t, 'torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1:] == ["False", "False"]  # no torch, no numpy: the time is in the benchmark


def test_a_full_disk_keeps_batches_in_memory_then_counts_and_reports_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "full"
    data.mkdir()
    (data / "spool").write_text("not a directory: every spool write fails, as on a full disk")
    prof = H3Profiler(
        "nowhere", data_dir=data, url="http://127.0.0.1:9", autostart=False, flush_interval_s=0.05
    )
    for _s in range(50):
        prof.log_batch(1.0)
    assert not prof.flush(0.3)  # no daemon, no disk: kept in memory, retried
    t0 = time.monotonic()
    res = prof.stop(timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0
    assert res["batches_lost"] == 50 and res["batches_spooled"] == 0 and res["offline"]
    assert "50 batches were lost" in caplog.text


def test_a_full_disk_that_frees_up_loses_nothing(tmp_path: Path) -> None:
    """Issue 11: 15 402 of 20 000 batches were dropped although the queue had room."""
    data = tmp_path / "full"
    data.mkdir()
    blocker = data / "spool"
    blocker.write_text("not a directory: every spool write fails, as on a full disk")
    prof = H3Profiler(
        "later", data_dir=data, url="http://127.0.0.1:9", autostart=False, flush_interval_s=0.05
    )
    for s in range(20_000):
        prof.log_batch(1.0 / (1 + s), losses=[0.5, 1.5], indices=[s, s + 1])
    assert not prof.flush(0.3)
    blocker.unlink()  # space again
    res = prof.stop(timeout_s=30)
    assert res["batches_lost"] == 0 and res["batches_spooled"] == 20_000 and res["flushed"]
    lines = (data / "spool" / f"{prof.run_id}.jsonl").read_text().splitlines()
    assert '"op": "create"' in lines[0] and '"op": "update"' in lines[-1]


def test_energy_tracker_keeps_the_published_api(daemon: Daemon) -> None:
    from h3client import EnergyTracker

    tracker = EnergyTracker(
        device="cpu", name="tracker", url=daemon.url, data_dir=daemon.data_dir, eta_interval_s=0.1
    )
    with pytest.raises(RuntimeError):
        tracker.get_current_stats()  # not started
    tracker.start()
    for s in range(50):
        tracker.log_loss(2.0 / (1 + s))
    stats = tracker.get_current_stats()
    assert stats["batches"] == 50 and stats["run_id"] == tracker.profiler.run_id
    res = tracker.stop()
    assert res["batches_posted"] == 50 and res["total_energy_j"] is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(res["run_id"])
        assert run["config"] == {} and "device:cpu" in run["tags"]  # the config as given


def test_replay_into_a_closed_run_keeps_the_spool(tmp_path: Path) -> None:
    """Batches for a run the daemon closed meanwhile (reaped: its process was gone) were never
    stored: the replay must say so and keep the file, not count the 409 as 'already done'."""
    data = tmp_path / "late"
    prof = H3Profiler(
        "closed", data_dir=data, autostart=False, url="http://127.0.0.1:9", flush_interval_s=0.05
    )
    for _s in range(20):
        prof.log_batch(1.0, epoch=0)
    res = prof.stop()
    assert res["batches_spooled"] == 20
    spool = data / "spool" / f"{prof.run_id}.jsonl"
    d = Daemon(
        data, daemon_env(data, H3D_POWER_BACKENDS="constant:5", H3D_LOG_LEVEL="WARNING")
    ).start()
    try:
        with Client(d.url, data_dir=data) as c:
            # the run exists and was closed before the spool came back
            c.request("POST", "/v1/runs", json_body={"id": prof.run_id, "name": "closed"})
            c.update_run(prof.run_id, status="failed")
            summary = replay_spool(c, data / "spool")
            assert summary["failed"] == [prof.run_id]
            assert spool.exists()  # kept: its batches are not stored anywhere
            assert c.get_run(prof.run_id)["n_batches"] == 0
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("url", "gzipped"),
    [
        ("http://127.0.0.1:8765", False),
        ("http://localhost:8765", False),
        ("http://[::1]:8765", False),
        ("http://gpu-node-3:8765", True),
        ("http://localhost.example.com:8765", True),
        ("http://127.0.0.2:8765/", False),
        ("https://user@10.0.0.7/h3", True),
    ],
)
def test_large_bodies_are_gzipped_only_to_another_machine(url: str, gzipped: bool) -> None:
    """gzip costs the sender ~30 ms of CPU per MB; on loopback it saves nothing."""
    import gzip
    import json

    import httpx

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"accepted": 1, "duplicates": 0})

    body = json.dumps({"batches": [{"seq": 0, "t": 1.0, "loss": 1.0, "losses": [0.5] * 2000}]})
    http = httpx.Client(base_url=url, transport=httpx.MockTransport(handler))
    with Client(url, token="t", http=http) as c:
        c.post_json("r", "batches", body)
    (req,) = seen
    assert (req.headers.get("content-encoding") == "gzip") is gzipped
    raw = gzip.decompress(req.content) if gzipped else req.content
    assert json.loads(raw) == json.loads(body)


def test_a_daemon_of_another_data_dir_is_not_taken_for_this_ones(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from h3client._config import ClientConfig, read_daemon_file, resolve
    from h3client._daemon import ensure_daemon, probe

    # what resolve() gives a data dir with no daemon.json: the default port, where here the
    # fixture's daemon (another data dir: a demo's, say) answers and refuses this one's token
    mine = tmp_path / "mine"
    cfg = ClientConfig(url=daemon.url, token=None, data_dir=mine, url_is_explicit=False)
    with caplog.at_level("WARNING", logger="h3client"):
        assert ensure_daemon(cfg, autostart=False) is None
    assert f"the daemon at {daemon.url} refuses this data dir's token" in caplog.text
    # an explicit URL is the caller's choice, token or not
    assert ensure_daemon(cfg._replace(url_is_explicit=True), autostart=False) == daemon.url
    url = ensure_daemon(cfg, autostart=True)  # this data dir gets a daemon of its own
    info = read_daemon_file(mine)
    try:
        assert url is not None and url != daemon.url and info is not None and info["url"] == url
        assert probe(url, (mine / "token").read_text().strip()) == (True, True)
        assert probe(url, daemon.token) == (True, False)
        found = resolve(data_dir=mine)  # and it is found through this data dir's daemon.json
        assert found.url == url and ensure_daemon(found, autostart=False) == url
    finally:
        from h3client import _daemon

        for proc in _daemon._started:  # the daemon ensure_daemon started, and only it
            proc.terminate()
            proc.wait(timeout=30)
        _daemon._started.clear()


def test_the_default_url_follows_the_daemons_host_and_port_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from h3client._config import resolve

    monkeypatch.delenv("H3D_URL", raising=False)
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "http://127.0.0.1:8421"),
        ({"H3D_PORT": "9000"}, "http://127.0.0.1:9000"),
        ({"H3D_HOST": "0.0.0.0", "H3D_PORT": "9001"}, "http://127.0.0.1:9001"),  # a wildcard bind
        ({"H3D_HOST": "10.0.0.5"}, "http://10.0.0.5:8421"),
        ({"H3D_HOST": "::1"}, "http://[::1]:8421"),
    ]
    for env, url in cases:
        for name in ("H3D_HOST", "H3D_PORT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert resolve(data_dir=tmp_path / "no-daemon-json").url == url, env


def test_another_programs_health_check_on_the_port_is_not_taken_for_a_daemon(
    tmp_path: Path,
) -> None:
    from h3client._config import ClientConfig
    from h3client._daemon import ensure_daemon, probe
    from tests.conftest import another_program_on_a_port

    with another_program_on_a_port() as port:
        url = f"http://127.0.0.1:{port}"
        assert probe(url) == (False, None)  # its /healthz says 200 "ok", but it is no h3d
        cfg = ClientConfig(url=url, token=None, data_dir=tmp_path / "mine", url_is_explicit=False)
        assert ensure_daemon(cfg, autostart=False) is None  # batches go to the spool, not there


def _nested(levels: int) -> dict[str, Any]:
    """A config ``levels`` levels deep as the daemon counts them: dicts inside dicts, the
    innermost empty (the config itself is level 1)."""
    config: dict[str, Any] = {}
    for _ in range(levels - 1):
        config = {"a": config}
    return config


@pytest.mark.parametrize(
    "config",
    [
        _nested(33),
        _nested(40),
        _nested(5000),  # deeper than json.dumps recurses: still a ValueError, not RecursionError
        {"a": [[_nested(31)]]},  # lists count as levels too
        {"a": (_nested(32),)},  # a tuple, as JSON writes it: a list
    ],
)
def test_a_config_nested_deeper_than_the_daemon_takes_is_refused_at_construction(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    threads = threading.active_count()
    with pytest.raises(ValueError, match="nested deeper than the daemon's 32 levels"):
        H3Profiler("deep", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
                   config=config)  # fmt: skip
    assert threading.active_count() == threads  # no sender left behind


def test_a_config_key_json_cannot_hold_is_a_value_error(tmp_path: Path) -> None:
    config: dict[Any, Any] = {(1, 2): "x"}  # json.dumps' default= converts values, not keys
    with pytest.raises(ValueError, match="H3Profiler config: keys must be"):
        H3Profiler("k", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
                   config=config)  # fmt: skip


def test_a_config_holding_a_lone_surrogate_is_a_value_error(tmp_path: Path) -> None:
    # valid JSON ("\\ud800" escaped) that the daemon refuses: no Unicode text
    for config in ({"s": "a\ud800"}, {"k\udfff": 1}, {"l": [{"s": "\ud83d"}]}):
        with pytest.raises(ValueError, match="lone surrogate"):
            H3Profiler("s", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
                       config=config)  # fmt: skip
    prof = H3Profiler("ok", data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False,
                      config={"s": "\U0001f600 \x00"})  # fmt: skip
    prof.stop()  # what JSON writes as a surrogate pair is fine, and a NUL (escaped)


def test_a_name_or_tag_the_daemon_refuses_is_refused_at_construction(tmp_path: Path) -> None:
    # the daemon answers these with a 422 (tests/h3d/test_api_inputs.py): refused at once,
    # not after a run whose create failed and whose every batch is rejected
    for kw, match in (
        ({"name": "   "}, "not a space"),
        ({"name": "a\x00b"}, "NUL"),
        ({"name": "a\ud800"}, "lone surrogate"),
        ({"name": "ok", "tags": ["t\x00"]}, "tags: holds a NUL"),
        ({"name": "ok", "tags": ["\udfff"]}, "tags: holds a lone surrogate"),
    ):
        with pytest.raises(ValueError, match=match):
            H3Profiler(data_dir=tmp_path, url="http://127.0.0.1:9", autostart=False, **kw)
    prof = H3Profiler(" spaced \U0001f600 ", data_dir=tmp_path, url="http://127.0.0.1:9",
                      autostart=False, tags=["caf\u00e9"])  # fmt: skip
    prof.stop()


def test_a_config_at_the_daemons_depth_and_size_limits_is_taken(daemon: Daemon) -> None:
    # 32 levels, and 64 KiB as the daemon measures it (compact JSON): 25 000 list items are
    # 50 KB that way, 75 KB with json.dumps' default ", " separators
    config = {"deep": _nested(31), "wide": [1] * 25_000}
    assert stored_config(daemon, config) == config


def test_a_spool_line_that_cannot_be_sent_is_kept_aside_and_the_rest_replayed(
    daemon: Any, tmp_path: Path
) -> None:
    """Lines a replay cannot send (a torn last line, a newer client's version or operation,
    not an operation, a NaN) are skipped: the rest is stored, and they are kept in a side
    file that no replay reads, never deleted with the spool."""
    spool = tmp_path / "spool"
    spool.mkdir()
    rid = uuid.uuid4().hex
    now = time.time()
    good = [
        {"v": 1, "op": "create", "run_id": rid, "body": {"id": rid, "name": "spooled"}},
        {"v": 1, "op": "epochs", "run_id": rid, "body": {"epochs": [{"epoch": 0, "t": now}]}},
    ]
    bad = [
        "[1]",
        json.dumps({"v": 1, "op": "frobnicate", "run_id": rid, "body": {}}),
        json.dumps({"v": 99, "op": "epochs", "run_id": rid, "body": {"epochs": []}}),
        json.dumps({"v": 1, "op": "epochs", "run_id": rid, "body": {"epochs": [{"t": math.nan}]}}),
        '{"v": 1, "op": "epo',  # torn by a crash
    ]
    path = spool / f"{rid}.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), bad[0], bad[1], json.dumps(good[1]), *bad[2:]]))
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        summary = replay_spool(c, spool)
        assert summary == {"files": 1, "operations": 2, "skipped_lines": 5, "failed": []}
        run = c.get_run(rid)
    assert run["name"] == "spooled" and run["n_epochs"] == 1
    assert not path.exists()
    side = spool / f"{rid}.jsonl.skipped"
    assert side.read_text().splitlines() == bad and side.stat().st_mode & 0o777 == 0o600


# --- resuming: the daemon follows the new process, and the resume point is never a guess -----


def test_a_resumed_run_is_followed_through_a_pause_longer_than_the_exit_grace(
    daemon_factory: Any,
) -> None:
    """The daemon kept following the dead first process: a pause of the resumed one (an
    evaluation, a checkpoint) longer than H3D_RUN_EXIT_GRACE_S got the run failed, and its
    later batches and final status were refused (409)."""
    d = daemon_factory("grace", H3D_RUN_EXIT_GRACE_S="1", H3D_RUN_REAP_EVERY_S="0.2")
    rid = crashed_run(d.url, d.data_dir)  # 12 batches, 3 epochs, then the process is gone
    prof = H3Profiler(url=d.url, data_dir=d.data_dir, run_id=rid, flush_interval_s=0.05)
    for _ in range(5):
        prof.log_batch(0.2)
    assert prof.flush(timeout_s=30)
    time.sleep(3)  # the pause: three times the exit grace
    for _ in range(5):
        prof.log_batch(0.1)
    prof.log_epoch(accuracy=0.9)
    res = prof.stop()
    assert res["batches_posted"] == 10 and res["batches_rejected"] == 0
    with Client(d.url, data_dir=d.data_dir) as c:
        run = c.get_run(rid)
    assert run["status"] == "finished" and run["n_batches"] == 22 and run["n_epochs"] == 4


def test_resuming_with_no_daemon_and_nothing_spooled_is_a_clear_error(daemon: Daemon) -> None:
    """With no daemon to say where the run stopped, the resumed profiler numbered from seq 0
    and epoch 0, silently: every batch and epoch it logged was a duplicate of a stored one,
    dropped at import."""
    rid = crashed_run(daemon.url, daemon.data_dir)  # all of it reached the daemon
    daemon.stop()
    threads = threading.active_count()
    with pytest.raises(H3ClientError, match=f"cannot resume run {rid}"):
        H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=rid, autostart=False)
    assert threading.active_count() == threads  # no sender left behind


#: CRASHED_RUN, but the daemon goes away after its 3 epochs: the test kills it, then sends a
#: line on stdin, and the process logs 4 more batches (spooled) before it dies.
CUT_OFF_RUN = (
    "import os, sys\n"
    "from h3client import H3Profiler\n"
    "p = H3Profiler('cut-off', url=sys.argv[1], data_dir=sys.argv[2], autostart=False,\n"
    "               flush_interval_s=0.05)\n"
    "for e in range(3):\n"
    "    for _ in range(4):\n"
    "        p.log_batch(1.0 / (e + 1))\n"
    "    p.log_epoch(accuracy=0.5 + e / 10)\n"
    "assert p.flush(timeout_s=60)\n"
    "print(p.run_id, flush=True)\n"
    "sys.stdin.readline()\n"
    "for _ in range(4):\n"
    "    p.log_batch(0.2)\n"
    "assert p.flush(timeout_s=60)\n"
    "os._exit(1)\n"
)


def test_a_run_resumed_offline_takes_its_epoch_from_its_spooled_batches(daemon: Daemon) -> None:
    """Its spool held batches of epoch 3 and no epoch: the resumed profiler counted epochs
    from 0 again, and its log_epoch() was a duplicate of the stored epoch 0."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CUT_OFF_RUN, daemon.url, str(daemon.data_dir)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    rid = proc.stdout.readline().strip()
    daemon.kill()
    _, err = proc.communicate("\n", timeout=120)  # its 4 last batches go to the spool
    assert proc.returncode == 1, err
    prof = H3Profiler(url=daemon.url, data_dir=daemon.data_dir, run_id=rid, autostart=False)
    for _ in range(2):
        prof.log_batch(0.1)
    prof.log_epoch(accuracy=0.9)
    assert prof.stop()["batches_spooled"] == 2
    daemon.start()
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert replay_spool(c, daemon.data_dir / "spool")["failed"] == []
        epochs = [(e["epoch"], e["accuracy"]) for e in c.report(rid)["epochs"]]
        run = c.get_run(rid)
    assert run["n_batches"] == 18 and run["last_seq"] == 17 and run["status"] == "finished"
    assert epochs == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.9)]


#: A process that spools 60 batches in two lines (no daemon) and dies. argv: url, data dir.
SPOOLED_AND_DEAD = (
    "import os, sys\n"
    "from h3client import H3Profiler\n"
    "p = H3Profiler('torn', url=sys.argv[1], data_dir=sys.argv[2], autostart=False)\n"
    "for half in range(2):\n"
    "    for _ in range(30):\n"
    "        p.log_batch(1.0)\n"
    "    assert p.flush(timeout_s=60)\n"
    "print(p.run_id, flush=True)\n"
    "os._exit(1)\n"
)


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    """A process killed while writing a spool line leaves it torn, with no newline: the next
    append was glued to it, and both were lost to the replay (`stop()` had counted the
    appended batches as spooled)."""
    data, url = tmp_path / "torn", "http://127.0.0.1:9"
    r = subprocess.run(
        [sys.executable, "-c", SPOOLED_AND_DEAD, url, str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    rid = r.stdout.strip()
    spool = data / "spool" / f"{rid}.jsonl"
    lines = spool.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""  # create, batches 0-29, batches 30-59
    torn = lines[2][: len(lines[2]) // 2]
    spool.write_bytes(b"\n".join(lines[:2]) + b"\n" + torn)  # killed in the middle of a write
    prof = H3Profiler(url=url, data_dir=data, run_id=rid, autostart=False)
    for _ in range(60):
        prof.log_batch(0.5)
    assert prof.stop()["batches_spooled"] == 60
    after = spool.read_bytes().split(b"\n")
    assert after[:3] == [*lines[:2], torn]  # the torn line stays alone, as it was
    ops = [json.loads(line) for line in after[3:] if line]
    seqs = [s for op in ops if op["op"] == "batches" for s in batch_seqs(op["body"])]
    assert seqs == list(range(30, 90)) and ops[-1]["op"] == "update"


def test_a_spool_holding_bytes_that_are_not_utf8_is_replayed_around_them(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A power loss can leave bytes that are not UTF-8 in a spool: resuming the run raised
    UnicodeDecodeError from the constructor (which never raises), and the sender's replay
    failed on them."""
    data = tmp_path / "offline"
    rid = crashed_run("http://127.0.0.1:9", data)  # all of it in the spool
    spool = data / "spool" / f"{rid}.jsonl"
    with spool.open("ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    prof = H3Profiler(url=daemon.url, token=daemon.token, data_dir=data, run_id=rid)
    for _ in range(2):
        prof.log_batch(0.2)
    res = prof.stop()
    assert res["batches_posted"] == 2 and not res["offline"]
    with Client(daemon.url, daemon.token) as c:
        run = c.get_run(rid)
    assert run["n_batches"] == 14 and run["n_epochs"] == 3 and run["last_seq"] == 13
    assert not spool.exists()
    assert (data / "spool" / f"{rid}.jsonl.skipped").read_bytes() == b"\xff\xfe\x00garbage\n"


def test_a_figure_no_float_holds_is_left_out_and_its_epoch_kept(daemon: Daemon) -> None:
    """``log_epoch(2, accuracy=0.7, huge=10**400)`` lost the whole epoch (float() raised
    OverflowError, which the per-figure check did not catch), and the next epoch's batches
    were filed under epoch 2. The figure is left out; the epoch and its others are kept."""
    prof = H3Profiler("overflow", url=daemon.url, data_dir=daemon.data_dir)
    for epoch in range(3):
        prof.log_batch(1.0 - 0.1 * epoch)
        prof.log_batch(0.9 - 0.1 * epoch)
        prof.log_epoch(epoch, accuracy=0.5 + 0.1 * epoch, huge=10**400 if epoch == 1 else 1.0)
    res = prof.stop()
    assert res["log_errors"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        epochs = c.report(prof.run_id)["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["accuracy"] for e in epochs] == pytest.approx([0.5, 0.6, 0.7])
    assert "huge" not in epochs[1]["metrics"] and epochs[2]["metrics"]["huge"] == 1.0
    assert all(e["loss"] is not None for e in epochs)  # each epoch has its own batches


FORKED_CHILDREN = r"""
import multiprocessing as mp, sys
from h3client import H3Profiler

url, data_dir = sys.argv[1], sys.argv[2]

def child(k):
    prof = H3Profiler(f"child-{k}", url=url, data_dir=data_dir)
    for i in range(50):
        prof.log_batch(1.0 / (i + 1))
    res = prof.stop(timeout_s=20)
    sys.exit(0 if res["batches_posted"] == 50 else 3)

parent = H3Profiler("parent", url=url, data_dir=data_dir)  # its sender starts loading httpx
procs = [mp.get_context("fork").Process(target=child, args=(k,)) for k in range(3)]
for p in procs:
    p.start()
for p in procs:
    p.join(60)
parent.stop()
print([p.exitcode for p in procs])
"""


def test_a_forked_child_right_after_a_profiler_started_sends_with_its_own(
    daemon: Daemon,
) -> None:
    """A multiprocessing child forked while the parent's sender was loading the HTTP stack
    inherited a module lock that thread held: the child's own profiler waited on that import
    for ever, sent nothing and its stop() took the whole timeout (3 runs in 4 on the
    auditor's 2-core host). Fork now waits for that first load to end."""
    out = subprocess.run(
        [sys.executable, "-c", FORKED_CHILDREN, daemon.url, str(daemon.data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0]", out.stdout + out.stderr[-2000:]
