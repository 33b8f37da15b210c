"""The framework callbacks: several eval sets, gradient accumulation, partial results."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from h3client import Client, H3Profiler
from tests.conftest import Daemon

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched: the models are built from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def stored_rows(daemon: Daemon, run_id: str, path: Path) -> list[dict[str, str]]:
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        text = c.export_csv(run_id, path).read_text()
    return list(csv.DictReader(text.splitlines()))


def a_rank_of_two(daemon: Daemon) -> tuple[dict[str, Any], H3Profiler]:
    """Profiler arguments for rank 0 of a two-rank run, and rank 1's profiler (still running)."""
    rid = uuid.uuid4().hex
    kw: dict[str, Any] = dict(url=daemon.url, data_dir=daemon.data_dir, run_id=rid, world_size=2)
    other = H3Profiler("ranks", rank=1, flush_interval_s=0.05, **kw)
    other.log_batch(1.0)
    return {"name": "ranks", "rank": 0, **kw}, other


# --- Hugging Face Trainer ---------------------------------------------------------------------


@pytest.fixture
def tfm() -> Any:
    return pytest.importorskip("transformers", reason="transformers is in the dev extra")


@pytest.mark.parametrize(("strategy", "epochs"), [("epoch", 2), ("steps", 2)])
def test_hf_every_eval_set_reaches_its_epoch(
    tfm: Any, daemon: Daemon, tmp_path: Path, strategy: str, epochs: int
) -> None:
    """Before: of an eval_dataset dict only the first set's figures (epoch) or the last
    set's (steps) were stored; the others were dropped."""
    from h3client.integrations.transformers import H3Callback
    from tests.integrations.test_transformers import Linear, Points, accuracy, tiny_args

    torch.manual_seed(0)
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=8,  # 32 points: 4 steps an epoch
        num_train_epochs=epochs,
        eval_strategy=strategy,
        eval_steps=4,  # "steps": at each epoch's last step
    )
    cb = H3Callback(name=f"sets-{strategy}", url=daemon.url, data_dir=daemon.data_dir)
    trainer = tfm.Trainer(
        model=Linear(),
        args=args,
        train_dataset=Points(32, 1),
        eval_dataset={"near": Points(16, 2), "far": Points(24, 3)},
        compute_metrics=accuracy,
        callbacks=[cb],
    )
    trainer.train()
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rep = c.report(cb.results["run_id"])
    assert [e["epoch"] for e in rep["epochs"]] == list(range(epochs))
    for epoch, step in zip(rep["epochs"], range(4, 4 * epochs + 1, 4), strict=True):
        for name in ("near", "far"):
            (logged,) = [
                h
                for h in trainer.state.log_history
                if h.get("step") == step and f"eval_{name}_loss" in h
            ]
            assert epoch["metrics"][f"{name}_loss"] == pytest.approx(logged[f"eval_{name}_loss"])
            assert epoch["metrics"][f"{name}_accuracy"] == pytest.approx(
                logged[f"eval_{name}_accuracy"]
            )
    assert rep["epochs"][0]["metrics"]["near_loss"] != rep["epochs"][0]["metrics"]["far_loss"]


@pytest.mark.parametrize("model", ["linear", "gpt2"])
def test_hf_logged_loss_with_accumulation_is_the_trainers(
    tfm: Any, daemon: Daemon, tmp_path: Path, model: str
) -> None:
    """every_step=False sends the Trainer's own loss of each logging window, not a sum over
    its micro-batches or its steps (a model that averages itself, and one the Trainer gives
    num_items_in_batch)."""
    from h3client.integrations.transformers import H3Callback
    from tests.integrations.test_transformers import Linear, Points, tiny_args, tiny_gpt2

    torch.manual_seed(0)
    data: Any
    if model == "linear":
        net: Any = Linear()
        data = Points(64, 1)
    else:
        net, data = tiny_gpt2(64)
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=6,
        logging_steps=2,
        learning_rate=1e-3,
    )
    cb = H3Callback(
        name=f"logged-{model}", url=daemon.url, data_dir=daemon.data_dir, every_step=False
    )
    trainer = tfm.Trainer(model=net, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [s for s, _ in logged] == [2, 4, 6]
    assert cb.results is not None
    rows = stored_rows(daemon, cb.results["run_id"], tmp_path / "b.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["loss"]) for r in rows] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_hf_partial_results_are_not_logged_as_final(
    tfm: Any, daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a rank whose run was still running (another rank training) appended its
    partial figures to log_history under the final h3_* names."""
    from h3client.integrations.transformers import H3Callback
    from tests.integrations.test_transformers import Linear, Points, tiny_args

    kw, other = a_rank_of_two(daemon)
    cb = H3Callback(**kw)

    class StopSoon(tfm.TrainerCallback):  # type: ignore[misc]
        """Stops rank 0 before H3Callback does, with a short deadline (its results stay)."""

        def on_train_end(self, *_a: Any, **_k: Any) -> None:
            assert cb.profiler is not None
            cb.profiler.stop(timeout_s=1.0)

    torch.manual_seed(0)
    args = tiny_args(tmp_path / "out", per_device_train_batch_size=8, max_steps=2)
    trainer = tfm.Trainer(
        model=Linear(), args=args, train_dataset=Points(32, 1), callbacks=[StopSoon(), cb]
    )
    with caplog.at_level("WARNING", logger="h3client.integrations.transformers"):
        trainer.train()
    other.stop()
    assert cb.results is not None and cb.results["partial"] is True
    (h3,) = [h for h in trainer.state.log_history if any(k.startswith("h3_") for k in h)]
    assert not any(k.startswith("h3_") and not k.startswith("h3_partial_") for k in h3)
    assert h3["h3_partial_total_energy_j"] == cb.results["total_energy_j"]
    assert any("partial" in r.getMessage() for r in caplog.records)


# --- Lightning --------------------------------------------------------------------------------


@pytest.fixture
def lit() -> Any:
    return pytest.importorskip("lightning.pytorch", reason="lightning is in the dev extra")


def lit_trainer(lit: Any, callbacks: list[Any], **kwargs: Any) -> Any:
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("logger", False)
    return lit.Trainer(
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_every_val_dataloader_reaches_its_epoch(
    lit: Any, daemon: Daemon, tmp_path: Path
) -> None:
    from torch.utils.data import DataLoader

    from h3client.integrations.lightning import H3Callback
    from tests.integrations.test_lightning import Digits, digits

    class TwoSets(Digits):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            x, y, _idx = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-two-sets", url=daemon.url, data_dir=daemon.data_dir)
    model = TwoSets()
    lit_trainer(lit, [cb], max_epochs=2).fit(
        model,
        DataLoader(train, batch_size=50),
        [DataLoader(val, batch_size=300), DataLoader(train, batch_size=200)],
    )
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rep = c.report(cb.results["run_id"])
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    for e in rep["epochs"]:
        figures = e["metrics"]
        a, b = figures["val_loss/dataloader_idx_0"], figures["val_loss/dataloader_idx_1"]
        assert a > 0 and b > 0 and a != b
    last = rep["epochs"][-1]["metrics"]
    assert last["val_loss/dataloader_idx_0"] == pytest.approx(
        float(model.trainer.callback_metrics["val_loss/dataloader_idx_0"])
    )


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_accumulated_batches_store_their_own_loss(
    lit: Any, daemon: Daemon, tmp_path: Path
) -> None:
    """Lightning divides the loss by accumulate_grad_batches (also in an epoch's shorter last
    window); each batch's stored loss is training_step's."""
    from torch.utils.data import DataLoader

    from h3client.integrations.lightning import H3Callback
    from tests.integrations.test_lightning import Digits, digits

    torch.manual_seed(0)
    train, val = digits(200)
    cb = H3Callback(name="lit-accum-loss", url=daemon.url, data_dir=daemon.data_dir)
    model = Digits()
    lit_trainer(lit, [cb], max_epochs=1, accumulate_grad_batches=3).fit(
        model, DataLoader(train, batch_size=25), DataLoader(val, batch_size=300)
    )
    assert cb.results is not None
    rows = stored_rows(daemon, cb.results["run_id"], tmp_path / "b.csv")
    assert [float(r["loss"]) for r in rows] == pytest.approx([s[1] for s in model.seen], rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_partial_results_are_not_logged_as_final(
    lit: Any, daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the loggers got a rank's partial figures under the final h3/* names."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from h3client.integrations.lightning import H3Callback
    from tests.integrations.test_lightning import Digits, digits

    kw, other = a_rank_of_two(daemon)
    cb = H3Callback(**kw)

    class StopSoon(lit.Callback):  # type: ignore[misc]
        """Stops rank 0 before H3Callback does, with a short deadline (its results stay)."""

        def on_fit_end(self, *_a: Any) -> None:
            assert cb.profiler is not None
            cb.profiler.stop(timeout_s=1.0)

    torch.manual_seed(0)
    train, val = digits(100)
    csv_logger = CSVLogger(tmp_path, name="lit")
    with caplog.at_level("WARNING", logger="h3client.integrations.lightning"):
        lit_trainer(
            lit, [StopSoon(), cb], max_epochs=1, logger=csv_logger, log_every_n_steps=1
        ).fit(Digits(), DataLoader(train, batch_size=50), DataLoader(val, batch_size=300))
    other.stop()
    assert cb.results is not None and cb.results["partial"] is True
    csv_logger.save()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        names = set(next(csv.reader(f)))
    assert "h3/partial_total_energy_j" in names
    assert not {"h3/total_energy_j", "h3/info_gain_bits", "h3/efficiency_bits_per_j"} & names
    assert any("partial" in r.getMessage() for r in caplog.records)
