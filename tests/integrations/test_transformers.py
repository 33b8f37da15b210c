"""The Hugging Face callback: a tiny BERT built from a config (no download) trains into h3d."""

from __future__ import annotations

import math
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

from h3client.integrations.transformers import H3Callback, model_normalises_loss  # noqa: E402


def tiny_gpt2(n: int) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """A one-layer GPT-2 (initialised from torch's global RNG) and ``n`` sequences of 12
    tokens whose first 0-7 labels are masked (-100): uneven token counts per sample."""
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    g = torch.Generator().manual_seed(3)
    data = []
    for _ in range(n):
        ids = torch.randint(0, 50, (12,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, 8, (1,), generator=g))] = -100
        data.append({"input_ids": ids, "labels": labels})
    return model, data


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


# --- gradient accumulation, resumption, step evaluations ------------------------------------


def tiny_args(out: Path, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        output_dir=str(out),
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return tf.TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("accumulation", [1, 4])
def test_accumulated_steps_store_the_loss_the_trainer_logs(
    daemon: Daemon, tmp_path: Path, accumulation: int
) -> None:
    # GPT-2 takes loss kwargs: the Trainer passes num_items_in_batch, so each micro-batch's
    # loss is its share of the step's loss, and the step's loss is their sum.
    torch.manual_seed(0)
    model, data = tiny_gpt2(32)
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=4,
        learning_rate=1e-3,
    )
    cb = H3Callback(name=f"ga{accumulation}", url=daemon.url, data_dir=daemon.data_dir)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    res = cb.results
    assert res is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        stored = c.series(res["run_id"], "loss", points=10_000)
    assert [v for _t, v in stored] == pytest.approx(logged, rel=1e-4)


class Linear(torch.nn.Module):
    """A model returning a dict with its loss; no loss kwargs, so no num_items_in_batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.lin(x)
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class Points(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_accumulation_without_loss_kwargs_stores_the_logged_loss(
    daemon: Daemon, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=4,
    )
    cb = H3Callback(name="ga-mean", url=daemon.url, data_dir=daemon.data_dir)
    trainer = tf.Trainer(model=Linear(), args=args, train_dataset=Points(32, 1), callbacks=[cb])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        stored = c.series(cb.results["run_id"], "loss", points=10_000)
    assert [v for _t, v in stored] == pytest.approx(logged, rel=1e-4)


def batch_epochs(daemon: Daemon, run_id: str, path: Path) -> list[tuple[int, int]]:
    """(epoch, step) of every stored batch."""
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rows = c.export_csv(run_id, path).read_text().splitlines()
    head = rows[0].split(",")
    e, s = head.index("epoch"), head.index("step")
    return [(int(r.split(",")[e]), int(r.split(",")[s])) for r in rows[1:]]


def test_resumed_mid_epoch_keeps_the_epoch_of_its_batches(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kw: dict[str, Any] = dict(
        per_device_train_batch_size=8,  # 32 points: 4 steps an epoch
        num_train_epochs=3,
        save_strategy="steps",
        save_steps=6,  # the checkpoint is at state.epoch 1.5
    )
    first = H3Callback(name="before", url=daemon.url, data_dir=daemon.data_dir)
    torch.manual_seed(0)
    tf.Trainer(
        model=Linear(),
        args=tiny_args(out, max_steps=6, **kw),
        train_dataset=Points(32, 1),
        callbacks=[first],
    ).train()
    second = H3Callback(name="resumed", url=daemon.url, data_dir=daemon.data_dir)
    torch.manual_seed(0)
    resumed = tf.Trainer(
        model=Linear(),
        args=tiny_args(out, **kw),
        train_dataset=Points(32, 1),
        callbacks=[second],
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert resumed.state.global_step == 12
    assert first.results is not None and second.results is not None
    assert batch_epochs(daemon, second.results["run_id"], tmp_path / "b.csv") == [
        (1, 7),
        (1, 8),
        (2, 9),
        (2, 10),
        (2, 11),
        (2, 12),
    ]
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        before = c.report(first.results["run_id"])
        after = c.report(second.results["run_id"])
    assert [e["epoch"] for e in before["epochs"]] == [0, 1]
    assert [e["epoch"] for e in after["epochs"]] == [1, 2]


# The Trainer also evaluates at the last step (12), whatever eval_steps.
@pytest.mark.parametrize(("eval_steps", "evaluated"), [(3, [3, 6, 12]), (5, [None, 5, 12])])
def test_step_evaluations_are_stored_on_their_epochs(
    daemon: Daemon, tmp_path: Path, eval_steps: int, evaluated: list[int | None]
) -> None:
    # 4 steps an epoch, 3 epochs: each epoch gets the last evaluation run during it.
    torch.manual_seed(0)
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=8,
        num_train_epochs=3,
        eval_strategy="steps",
        eval_steps=eval_steps,
    )
    cb = H3Callback(name=f"eval{eval_steps}", url=daemon.url, data_dir=daemon.data_dir)
    trainer = tf.Trainer(
        model=Linear(),
        args=args,
        train_dataset=Points(32, 1),
        eval_dataset=Points(16, 2),
        compute_metrics=accuracy,
        callbacks=[cb],
    )
    trainer.train()
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == sorted({*range(eval_steps, 13, eval_steps), 12})
    assert cb.results is not None
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        rep = c.report(cb.results["run_id"])
    assert [e["epoch"] for e in rep["epochs"]] == [0, 1, 2]
    for epoch, step in zip(rep["epochs"], evaluated, strict=True):
        if step is None:
            assert epoch.get("val_loss") is None and epoch.get("accuracy") is None
        else:
            assert epoch["val_loss"] == pytest.approx(evals[step]["eval_loss"])
            assert epoch["accuracy"] == pytest.approx(evals[step]["eval_accuracy"])


# --- heads that are given num_items_in_batch and drop it --------------------------------------


def tiny_bert(head: Any = None) -> Any:
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    return (head or tf.BertForSequenceClassification)(config)


@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # torch.compile's import
def test_which_models_divide_their_loss_by_num_items_in_batch() -> None:
    gpt2 = tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    lm = tf.GPT2LMHeadModel(gpt2)
    assert model_normalises_loss(lm) is True
    assert model_normalises_loss(torch.compile(lm)) is True  # judged by the original
    assert model_normalises_loss(tf.GPT2ForSequenceClassification(gpt2)) is False
    assert model_normalises_loss(tiny_bert()) is False
    assert model_normalises_loss(tiny_bert(tf.BertForTokenClassification)) is False
    assert model_normalises_loss(Linear()) is False  # computes its own mean

    class Named(Linear):
        def forward(self, x: Any, labels: Any = None, num_items_in_batch: Any = None) -> Any:
            return super().forward(x, labels)

    assert model_normalises_loss(Named()) is True  # takes it by name: uses it


@pytest.mark.parametrize("reduction", ["auto", "sum"])
def test_a_head_that_drops_num_items_in_batch_stores_its_mean_loss(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture, reduction: Any
) -> None:
    # BERT's forward takes **kwargs, so the Trainer passes num_items_in_batch, but the head
    # returns each micro-batch's mean cross-entropy: ln 2 at initialisation on 2 classes.
    # Its step loss is their mean, not their sum (the Trainer logs the sum, ~3 ln 2).
    torch.manual_seed(0)
    model = tiny_bert()
    micro: list[float] = []
    model.register_forward_hook(
        lambda m, _a, out: micro.append(out.loss.item()) if m.training else None
    )
    args = tiny_args(
        tmp_path / "out",
        per_device_train_batch_size=16,
        gradient_accumulation_steps=3,
        max_steps=3,
        learning_rate=1e-6,
    )
    cb = H3Callback(
        name=f"bert-ga3-{reduction}",
        url=daemon.url,
        data_dir=daemon.data_dir,
        loss_reduction=reduction,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(160, 1), callbacks=[cb])
    assert trainer.model_accepts_loss_kwargs  # the Trainer does pass num_items_in_batch
    with caplog.at_level("WARNING", logger="h3client.integrations.transformers"):
        trainer.train()
    assert cb.results is not None and len(micro) == 9
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        stored = [v for _t, v in c.series(cb.results["run_id"], "loss", points=10_000)]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if reduction == "sum":  # the override: as the Trainer logs it
        assert stored == pytest.approx(logged, rel=1e-4)
        return
    assert stored == pytest.approx([sum(micro[k : k + 3]) / 3 for k in (0, 3, 6)], rel=1e-5)
    assert stored == pytest.approx([math.log(2)] * 3, abs=0.02)
    assert logged == pytest.approx([3 * v for v in stored], rel=1e-3)  # upstream's figure
    assert sum("num_items_in_batch" in r.getMessage() for r in caplog.records) == 1


def test_loss_reduction_is_checked() -> None:
    with pytest.raises(ValueError, match="loss_reduction"):
        H3Callback(loss_reduction="median")  # type: ignore[arg-type]
