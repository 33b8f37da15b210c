"""The Lightning callback trains a real model with ``lightning`` from PyPI into a real daemon."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from h3client import Client
from h3d.storage import repository as repo
from h3d.storage.engine import make_engine, make_sessionmaker, session_scope
from tests.conftest import REPO, Daemon, torchrun

# lightning 2.6 still uses a torch pytree class that torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

L = pytest.importorskip("lightning.pytorch", reason="lightning is in the dev extra")

from h3client.integrations.lightning import H3Callback  # noqa: E402


def digits(n_train: int = 600) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    idx = torch.arange(len(y))
    return (
        TensorDataset(x[:n_train], y[:n_train], idx[:n_train]),
        TensorDataset(x[n_train : n_train + 300], y[n_train : n_train + 300], idx[:300]),
    )


class Digits(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.seen: list[tuple[int, float, list[float], list[int]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y, idx = batch
        losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
        loss = losses.mean()
        self.seen.append((self.current_epoch, loss.item(), losses.tolist(), idx.tolist()))
        return {"loss": loss, "losses": losses.detach(), "indices": idx}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _idx = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def quiet_trainer(cb: H3Callback, max_epochs: int = 3, **kwargs: Any) -> Any:
    kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def test_lightning_fit_is_stored_batch_for_batch(daemon: Daemon) -> None:
    torch.manual_seed(0)
    train, val = digits()
    model = Digits()
    cb = H3Callback(name="lit-digits", url=daemon.url, data_dir=daemon.data_dir, n_train=600)
    trainer = quiet_trainer(cb)
    trainer.fit(
        model, DataLoader(train, batch_size=50, shuffle=True), DataLoader(val, batch_size=300)
    )
    res = cb.results
    assert res is not None and res["batches_logged"] == res["batches_posted"] == 36
    assert res["total_energy_j"] > 0 and res["batches_lost"] == 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(cb.profiler.run_id)  # type: ignore[union-attr]
        assert run["status"] == "finished" and run["n_batches"] == 36 and run["n_epochs"] == 3
        stored = c.series(run["id"], "loss", points=10_000)
        assert [round(v, 5) for _t, v in stored] == [round(s[1], 5) for s in model.seen]
        rep = c.report(run["id"])
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1, 2]
    # per-sample losses and their indices went with the batches (read from the store)
    engine = make_engine(f"sqlite:///{daemon.data_dir / 'h3d.db'}")
    with session_scope(make_sessionmaker(engine)) as s:
        for seq in (0, 35):
            losses, indices = repo.sample_losses(s, run_id=run["id"], seq=seq)
            assert losses == pytest.approx(model.seen[seq][2], rel=1e-6)
            assert indices == model.seen[seq][3]
    engine.dispose()
    # validation metrics once per epoch, the accuracy where a user looks for it
    assert all(e["val_loss"] is not None and 0 <= e["accuracy"] <= 1 for e in rep["epochs"])
    assert rep["epochs"][-1]["val_loss"] < rep["epochs"][0]["val_loss"]


class Exploding(Digits):
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        if self.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_fit_marks_the_run_failed(daemon: Daemon) -> None:
    train, val = digits(200)
    cb = H3Callback(name="lit-fails", url=daemon.url, data_dir=daemon.data_dir)
    trainer = quiet_trainer(cb)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Exploding(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300))
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(cb.results["run_id"])
    assert run["status"] == "failed" and run["n_batches"] == 6 and run["n_epochs"] == 1


def test_import_h3client_imports_no_framework() -> None:
    code = (
        "import sys, h3client, h3client.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'torch') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_base_class_follows_the_package_the_program_imported() -> None:
    code = (
        "import pytorch_lightning as pl, sys\n"
        "from h3client.integrations.lightning import H3Callback\n"
        "assert issubclass(H3Callback, pl.Callback)\n"
        "assert 'lightning' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


class Colliding(Digits):
    """Logs names that ``log_epoch`` takes itself: ``accuracy`` besides ``val_acc``, and
    ``epoch``."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("accuracy", 0.25)
        self.log("epoch", float(self.current_epoch))


def test_logged_names_that_collide_with_log_epoch_do_not_crash_the_fit(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-collide", url=daemon.url, data_dir=daemon.data_dir)
    with caplog.at_level("WARNING", logger="h3client.integrations.lightning"):
        quiet_trainer(cb).fit(
            Colliding(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300)
        )
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        assert c.get_run(cb.results["run_id"])["status"] == "finished"
        rep = c.report(cb.results["run_id"])
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1, 2]
    for e in rep["epochs"]:
        assert e["accuracy"] != 0.25 and 0 <= e["accuracy"] <= 1  # val_acc comes first
        assert e["metrics"]["user_accuracy"] == 0.25
        assert e["metrics"]["user_epoch"] == e["epoch"]
    # one warning per renamed name, not one per epoch
    assert sum("stored as" in r.getMessage() for r in caplog.records) == 2


def test_an_epoch_without_validation_has_no_validation_figures(daemon: Daemon) -> None:
    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-val-every-2", url=daemon.url, data_dir=daemon.data_dir)
    trainer = quiet_trainer(cb, max_epochs=4, check_val_every_n_epoch=2)
    trainer.fit(Digits(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300))
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rep = c.report(cb.results["run_id"])
    epochs = rep["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    # validation runs after epochs 1 and 3 (check_val_every_n_epoch counts from 1)
    for e in (epochs[0], epochs[2]):
        assert e["val_loss"] is None and e["accuracy"] is None
        assert "val_acc" not in (e["metrics"] or {})
    for e in (epochs[1], epochs[3]):
        assert e["val_loss"] is not None and 0 <= e["accuracy"] <= 1
    assert epochs[1]["val_loss"] != epochs[3]["val_loss"]


def test_one_process_in_a_multi_task_slurm_allocation_is_a_single_run(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an `salloc -n 4` shell: SLURM says 4 tasks, the trainer runs one process
    salloc = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "interactive",  # Lightning leaves an interactive job alone
        "SLURM_NNODES": "1",
    }
    for k, v in salloc.items():
        monkeypatch.setenv(k, v)
    train, val = digits(200)
    cb = H3Callback(name="lit-salloc", url=daemon.url, data_dir=daemon.data_dir)
    trainer = quiet_trainer(cb, max_epochs=1)
    trainer.fit(Digits(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300))
    assert trainer.world_size == 1
    assert cb.profiler is not None and cb.profiler.dist is None
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(cb.results["run_id"])
    assert run["status"] == "finished" and run["world_size"] in (None, 1)
    assert run["n_batches"] == 4


class TrainAccuracy(Digits):
    """Logs a training-side ``accuracy``; validation supplies ``val_acc``."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        self.log("accuracy", 0.5)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("sanity_steps", [0, 1])
def test_a_training_accuracy_never_stands_in_for_the_validation_accuracy(
    daemon: Daemon, sanity_steps: int
) -> None:
    # Validation runs after epochs 1 and 3 only. Once it has supplied val_acc, the training
    # `accuracy` stays user_accuracy, also on the epochs without validation; with a sanity
    # check the callback knows that from the first epoch on.
    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-train-acc", url=daemon.url, data_dir=daemon.data_dir)
    trainer = quiet_trainer(
        cb, max_epochs=4, check_val_every_n_epoch=2, num_sanity_val_steps=sanity_steps
    )
    trainer.fit(TrainAccuracy(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300))
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        epochs = c.report(cb.results["run_id"])["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    later = epochs if sanity_steps else epochs[1:]
    for e in later:
        assert e["accuracy"] != 0.5 and e["metrics"]["user_accuracy"] == 0.5
    assert epochs[2]["accuracy"] is None and epochs[2]["val_loss"] is None
    assert all(0 <= e["accuracy"] <= 1 for e in (epochs[1], epochs[3]))
    # the sanity check's figures belong to no epoch
    assert epochs[0]["val_loss"] is None and "val_acc" not in (epochs[0]["metrics"] or {})


def test_every_micro_batch_carries_the_optimizer_step_it_contributes_to(
    daemon: Daemon, tmp_path: Path
) -> None:
    # 8 batches an epoch, accumulate 3: optimizer steps after batches 2, 5 and 7.
    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-accum-steps", url=daemon.url, data_dir=daemon.data_dir)
    trainer = quiet_trainer(cb, max_epochs=2, accumulate_grad_batches=3)
    trainer.fit(Digits(), DataLoader(train, batch_size=25), DataLoader(val, batch_size=300))
    assert trainer.global_step == 6 and cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        text = c.export_csv(cb.results["run_id"], tmp_path / "b.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [
        *((0, s) for s in (1, 1, 1, 2, 2, 2, 3, 3)),
        *((1, s) for s in (4, 4, 4, 5, 5, 5, 6, 6)),
    ]


DDP_SCRIPT = '''
import json, sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from h3client.integrations.lightning import H3Callback
from tests.integrations.test_lightning import Digits, digits

url, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])


class RankDigits(Digits):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_rank", float(self.global_rank))  # no sync_dist: each rank its own


class CountEpochs(L.Callback):
    """Counts this rank's log_epoch calls (the real ones still run)."""

    def __init__(self, h3):
        self.h3, self.n = h3, 0

    def on_train_start(self, trainer, pl_module):
        real = self.h3.profiler.log_epoch

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        self.h3.profiler.log_epoch = counted


torch.manual_seed(0)
train, val = digits(200)
h3 = H3Callback(name="lit-ddp-epochs", url=url, data_dir=data_dir)
count = CountEpochs(h3)
trainer = L.Trainer(
    max_epochs=2, strategy="ddp", devices=2, accelerator="cpu", callbacks=[h3, count],
    logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0,
)
trainer.fit(RankDigits(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=100))
out.joinpath(f"rank{trainer.global_rank}.json").write_text(
    json.dumps({"run_id": h3.results["run_id"], "epochs_logged": count.n})
)
'''


@pytest.mark.slow  # two Lightning processes under torchrun: about a minute on 2 loaded cores
def test_under_ddp_the_epochs_are_rank_zeros(daemon: Daemon, tmp_path: Path) -> None:
    # Each rank validates its own shard; unless every figure is logged with sync_dist=True
    # the ranks' epoch figures differ, and the daemon would keep whichever came first.
    script = tmp_path / "lit_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    ranks = torchrun(2, script, daemon.url, str(daemon.data_dir), out=out, env=daemon.env)
    assert [r["epochs_logged"] for r in ranks] == [2, 0]
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(ranks[0]["run_id"])
        rep = c.report(run["id"])
    assert run["status"] == "finished" and run["world_size"] == 2 and run["n_batches"] == 8
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    assert [e["metrics"]["val_rank"] for e in rep["epochs"]] == [0.0, 0.0]
