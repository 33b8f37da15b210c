"""The Hugging Face callback: a tiny BERT built from a config (no download) trains into h3d."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from h3client import Client
from tests.conftest import Daemon

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched: the model is built from a config
os.environ["TRANSFORMERS_OFFLINE"] = "1"
tf = pytest.importorskip("transformers", reason="transformers is in the dev extra")

from h3client.integrations.transformers import H3Callback  # noqa: E402


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Generated token ids; the label says whether token 7 occurs (learnable, not trivial)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 64, (n, 16), generator=g)
        marked = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(1, 16, (n,), generator=g)
        self.ids[marked, pos[marked]] = 7
        self.labels = marked.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(16, dtype=torch.long),
            "labels": self.labels[i],
        }


class Recording(tf.Trainer):  # type: ignore[misc]
    """Records the loss of every step the Trainer trains, independently of the callback."""

    seen: list[float]

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self.seen.append(float(loss))
        return loss


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def test_trainer_steps_and_epochs_are_stored(daemon: Daemon, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = tf.BertForSequenceClassification(config)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        logging_steps=4,  # the callback still gets every step's loss
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    cb = H3Callback(name="tiny-bert", url=daemon.url, data_dir=daemon.data_dir, n_train=160)
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=Tokens(160, seed=1),
        eval_dataset=Tokens(64, seed=2),
        compute_metrics=accuracy,
        callbacks=[cb],
    )
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 20  # 10 steps an epoch, 2 epochs
    res = cb.results
    assert res is not None and res["batches_logged"] == res["batches_posted"] == 20
    assert res["total_energy_j"] > 0
    assert any("h3_total_energy_j" in h for h in trainer.state.log_history)
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(res["run_id"])
        assert run["status"] == "finished" and run["n_batches"] == 20 and run["n_epochs"] == 2
        stored = c.series(run["id"], "loss", points=10_000)
        rep = c.report(run["id"])
    assert [v for _t, v in stored] == pytest.approx(trainer.seen, rel=1e-5)
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [e["val_loss"] for e in rep["epochs"]] == pytest.approx([h["eval_loss"] for h in evals])
    assert [e["accuracy"] for e in rep["epochs"]] == pytest.approx(
        [h["eval_accuracy"] for h in evals]
    )
