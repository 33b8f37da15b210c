"""AutoH3 trains a real model on real data, offline and against a real daemon."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from h3client import Client
from h3optim import AutoH3, h3_mnist_fast


def digits() -> tuple[TensorDataset, DataLoader[Any]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return TensorDataset(x[tr], y[tr]), DataLoader(TensorDataset(x[te], y[te]), batch_size=512)


def digits_and_model() -> tuple[TensorDataset, DataLoader[Any], nn.Module]:
    torch.manual_seed(0)
    train_set, test = digits()
    return train_set, test, nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def flip_labels(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which labels were flipped, the labels with a seeded 20 % of them set to another class)."""
    g = torch.Generator().manual_seed(1)
    flipped = torch.rand(len(y), generator=g) < 0.2
    return flipped, torch.where(flipped, (y + torch.randint(1, 10, (len(y),), generator=g)) % 10, y)


def offline_auto(model: nn.Module, train_set: TensorDataset, epochs: int, **kw: Any) -> AutoH3:
    """AutoH3 without a daemon, training with Adam (lr 1e-3)."""
    return AutoH3(
        model.parameters(),
        train_set,
        total_epochs=epochs,
        profile=False,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        **kw,
    )


def train(auto: AutoH3, model: nn.Module, test: DataLoader[Any], epochs: int) -> list[float]:
    crit = nn.CrossEntropyLoss()
    accs = []
    for _ in range(epochs):
        for data, target, idx in auto.get_loader(batch_size=64):
            auto.training_step(model, data, target, crit, idx)
        accs.append(auto.evaluate_epoch(model, test))
    return accs


def test_autoh3_offline_trains_and_saves_backprop() -> None:
    train_set, test, model = digits_and_model()
    auto = AutoH3(
        model.parameters(), train_set, mode="green", total_epochs=10, profile=False, lr=1e-2
    )
    accs = train(auto, model, test, 10)
    res = auto.finish()
    assert max(accs) > 0.93
    assert res["samples_backpropagated"] < 10 * len(
        train_set
    )  # the thermodynamic phase skipped some
    assert "EtaController" in res["controller_report"]


def test_autoh3_against_a_real_daemon_stores_run_epochs_eta_and_decisions(daemon: Any) -> None:
    train_set, test, model = digits_and_model()
    auto = AutoH3(
        model.parameters(),
        train_set,
        mode="balanced",
        name="auto-digits",
        total_epochs=8,
        lr=1e-3,
        profiler_kwargs={"url": daemon.url, "data_dir": daemon.data_dir, "eta_interval_s": 0.2},
        learned_ratio=None,  # the sampled setting every thermodynamic epoch (no learning floor)
    )
    train(auto, model, test, 8)
    res = auto.finish()
    assert res["batches_lost"] == 0 and res["total_energy_j"] > 0
    with Client(daemon.url, data_dir=daemon.data_dir) as c:
        run = c.get_run(res["run_id"])
        assert (
            run["status"] == "finished"
            and run["n_epochs"] == 8
            and run["config"]["mode"] == "balanced"
            and run["config"]["flush_denormal"] is True
        )
        assert run["n_batches"] == res["batches_logged"]
        rep = c.report(res["run_id"])
    phases = [e["phase"] for e in rep["epochs"]]
    assert phases[0] == "warmup" and "thermodynamic" in phases and phases[-1] == "consolidation"
    thermo = [e for e in rep["epochs"] if e["phase"] == "thermodynamic"]
    assert all(e["metrics"]["keep_frac"] < 1.0 for e in thermo)
    assert rep["eta"]["eta_bits_per_j"] is not None and rep["eta"]["info_gain_bits"] > 0
    assert isinstance(res["controller_decisions"], list)


def test_preset_unpacks_and_samples_by_phase() -> None:
    train_set, _ = digits()
    model = nn.Linear(64, 10)
    setup = h3_mnist_fast(model.parameters(), train_set)
    optimizer, tracker, ds = setup
    assert len(ds) == len(train_set) and tracker.num_samples == len(ds)
    phase, sampler = setup.get_sampler(0, 10)
    assert phase == "warmup" and len(sampler) == len(ds)
    phase, sampler = setup.get_sampler(5, 10)
    assert phase == "thermodynamic" and len(sampler) == round(0.5 * len(ds))


def test_autoh3_windowed_ab_runs_inside_the_epoch_and_reports() -> None:
    train_set, test, model = digits_and_model()
    auto = offline_auto(
        model,
        train_set,
        6,
        mode="balanced",
        window_steps=2,
        probe_size=128,
        learned_ratio=None,  # windows from the first thermodynamic epoch (no learning floor)
    )
    assert isinstance(auto.optimizer, torch.optim.Adam)
    seen_windows = 0
    for _ in range(6):
        loader = auto.get_loader(batch_size=32)
        windows = auto._windows
        planned = windows.draws["A"][2].numel() if windows is not None else None
        trained = 0
        for data, target, idx in loader:
            assert isinstance(idx, torch.Tensor) and len(idx) == len(data) <= 32
            auto.training_step(model, data, target, nn.CrossEntropyLoss(), idx)
            trained += len(idx)
        if planned is not None:  # a testing epoch trains on exactly as many samples as A draws
            assert trained == planned
        seen_windows += auto.controller.window_testing or bool(auto.controller._windows)
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    c = auto.controller
    # the test decided within the thermodynamic phase: adopted a leaner setting or held
    changes = [d["change"] for d in c.decisions if d["change"] != "none"]
    assert changes and set(changes) <= {"keep_frac down", "hold fixed schedule"}
    assert "windowed A/B" in res["controller_report"]
    # the windows cost what A costs: thermodynamic epochs back-propagate < all samples
    assert res["samples_backpropagated"] < 6 * len(train_set)


def test_autoh3_windows_continue_across_epochs() -> None:
    # 15 steps per thermodynamic epoch and 10-step windows: windows run across epoch ends
    # and epochs start in a B window; the test must still gather its comparisons and decide
    train_set, test, model = digits_and_model()
    auto = offline_auto(
        model,
        train_set,
        10,
        window_steps=10,
        probe_size=128,
        learned_ratio=None,  # windows from the first thermodynamic epoch (no learning floor)
    )
    auto.controller.min_pairs = auto.controller.max_pairs = 3
    train(auto, model, test, 10)
    assert auto.controller.window_state == "held" or any(
        d["change"] == "keep_frac down" for d in auto.controller.decisions
    )


def test_autoh3_learning_floor_keeps_what_is_not_learned_yet() -> None:
    """Early in training most samples still teach: the thermodynamic epochs keep them all;
    as the model learns them the floor falls to the mode's setting. The floor judges the
    probe samples by the model as it is at the epoch's start, not by tracked losses as old
    as each sample's last sighting."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 12, mode="balanced")  # keep 0.6, uniform 0.3
    keeps, fresh = [], []
    crit = nn.CrossEntropyLoss()
    for _ in range(12):
        loader = auto.get_loader(batch_size=32)
        if auto.phase == "thermodynamic":
            assert auto._probe_batch is not None
            idx, x, y = auto._probe_batch
            with torch.no_grad():
                now = nn.functional.cross_entropy(model(x), y, reduction="none")
            fresh.append(auto.loss_tracker.unlearned_fraction(indices=idx, losses=now))
            expected = max(0.6, min(1.0, fresh[-1] / 0.7))
            assert auto.sampler.keep_frac == pytest.approx(expected)
            keeps.append(auto.sampler.keep_frac)
        for data, target, idx in loader:
            auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    assert keeps[0] > 0.6 and keeps[-1] < keeps[0]  # binding at first, then falling
    assert "learning floor" in res["controller_report"]


def test_autoh3_learning_floor_stands_down_once_labels_look_noisy() -> None:
    """With 20 % flipped labels the floor's share not learned yet counts the mislabeled
    samples: once the noise margin flags some, the thermodynamic epochs keep the mode's
    0.6 where a strict floor (0.05 × the first loss) would still keep every sample, and the
    report says why, once. On the clean labels it never stands down."""
    train_set, test, model = digits_and_model()
    x, y = train_set.tensors
    _, noisy = flip_labels(y)
    auto = offline_auto(model, TensorDataset(x, noisy), 12, mode="balanced", learned_ratio=0.05)
    crit = nn.CrossEntropyLoss()
    keeps: list[tuple[bool, float]] = []  # (labels looked noisy at the epoch's start, keep)
    for _ in range(12):
        looked_noisy = bool(auto.sampler.likely_mislabeled().any())
        loader = auto.get_loader(batch_size=32)
        if auto.phase == "thermodynamic":
            keeps.append((looked_noisy, auto.sampler.keep_frac))
        for data, target, idx in loader:
            auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    assert keeps[0] == (False, pytest.approx(1.0))  # the floor binds before any is flagged
    assert any(noisy for noisy, _ in keeps), keeps
    assert all(keep == pytest.approx(0.6) for noisy, keep in keeps if noisy), keeps
    off = [d for d in auto.controller.decisions if d["change"] == "learning floor off"]
    assert len(off) == 1 and "likely mislabeled" in off[0]["reason"]
    assert "learning floor off" in res["controller_report"]
    train_set, test, model = digits_and_model()
    clean = offline_auto(model, train_set, 12, mode="balanced", learned_ratio=0.05)
    train(clean, model, test, 12)
    changes = {d["change"] for d in clean.controller.decisions}
    assert "learning floor" in changes and "learning floor off" not in changes


def test_autoh3_learning_floor_off_or_outside_the_thermodynamic_phase() -> None:
    """No floor with ``learned_ratio=None``; no probe evaluation in warmup epochs."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 10, learned_ratio=None)
    train(auto, model, test, 3)
    assert not any(d["change"] == "learning floor" for d in auto.controller.decisions)
    # the thermodynamic epochs' probe still gives the starvation guard its training loss
    assert [h["train_loss"] is not None for h in auto.controller.history] == [False, True, True]
    auto = offline_auto(model, train_set, 10)
    train(auto, model, test, 1)  # the warmup epoch
    assert auto._probe_batch is None
    auto.get_loader(batch_size=64)  # the first thermodynamic epoch
    assert auto._probe_batch is not None


def test_autoh3_holds_the_fixed_schedule_when_the_run_is_too_short_for_a_test() -> None:
    # 6 epochs of 1 400 samples at batch 64: the four thermodynamic epochs hold about 56
    # steps, one 50-step window; a test needs 17. No window is drawn.
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 6, learned_ratio=None)
    windowed = 0
    crit = nn.CrossEntropyLoss()
    for _ in range(6):
        loader = auto.get_loader(batch_size=64)
        windowed += auto._windows is not None
        for data, target, idx in loader:
            auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    assert windowed == 0
    assert auto.controller.window_state == "held"
    assert "too short" in res["controller_report"]
    # the fixed schedule, held: the thermodynamic epochs keep balanced's 0.6
    assert res["samples_backpropagated"] < 6 * len(train_set)


def test_autoh3_weights_likely_flipped_labels_zero_and_the_rest_unbiased() -> None:
    train_set, test, model = digits_and_model()
    x, y = train_set.tensors
    flipped, noisy = flip_labels(y)
    auto = offline_auto(model, TensorDataset(x, noisy), 12)
    assert auto.sampler.unbiased and auto.sampler.noise_margin == 0.5  # the defaults
    train(auto, model, test, 12)
    flagged = auto.sampler.likely_mislabeled()
    precision = float(flipped[flagged].float().mean())
    recall = float(flagged[flipped].float().mean())
    assert precision > 0.9 and recall > 0.3, (precision, recall)
    probs = torch.full((len(y),), 0.5)
    w = auto.sampler.weights_from(probs, len(y) // 2)
    assert bool((w[flagged] == 0).all()) and bool((w[~flagged] == 1).all())
    assert auto.finish()["likely_mislabeled"] == int(flagged.sum())
    # on the clean labels, hardly any sample is set aside
    train_set, test, model = digits_and_model()
    clean = offline_auto(model, train_set, 12)
    train(clean, model, test, 12)
    assert float(clean.sampler.likely_mislabeled().float().mean()) < 0.01


def test_epochs_leave_out_the_drawn_samples_of_weight_zero() -> None:
    """With flipped labels, the likely mislabeled samples drawn (weight 0: nothing to a
    step's loss or gradient) are left out of their epochs and counted; every epoch trains
    on its draw less them."""
    train_set, test, model = digits_and_model()
    x, y = train_set.tensors
    _, noisy = flip_labels(y)
    auto = offline_auto(model, TensorDataset(x, noisy), 14, learned_ratio=None)
    crit = nn.CrossEntropyLoss()
    for _ in range(14):
        skipped = auto.samples_skipped
        trained = 0
        for data, target, idx in auto.get_loader(batch_size=64):
            assert bool((auto.sampler.weights(idx) != 0).all())  # nothing at weight 0 trains
            auto.training_step(model, data, target, crit, idx)
            trained += len(idx)
        assert trained + auto.samples_skipped - skipped == auto.sampler.num_kept
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    assert res["samples_skipped"] == auto.samples_skipped > 0
    assert res["samples_backpropagated"] + res["samples_skipped"] < 14 * len(y)


def test_windowed_draws_leave_out_the_samples_of_weight_zero() -> None:
    """A windowed epoch's A and B draws leave out their samples of weight 0 (here 20
    samples whose tracked loss rose from 1 to 3 nats); the epoch is as long as A's draw
    less them, which is what it counts as skipped."""
    from h3optim import EtaController, InformationWeightedSampler, LossTracker
    from h3optim.auto import _WindowedBatches

    tracker = LossTracker(200)
    tracker.update(torch.arange(200), torch.ones(200))
    for _ in range(50):
        tracker.update(torch.arange(20), torch.full((20,), 3.0))
    sampler = InformationWeightedSampler(200, tracker, unbiased=True, seed=3)
    flagged = sampler.likely_mislabeled()
    assert int(flagged.sum()) == 20
    controller = EtaController("balanced", total_epochs=10)
    controller.windowed = True
    sampler.set_fractions(controller.keep_frac, controller.uniform_mix)
    windows = _WindowedBatches(controller, sampler, 16, 3)
    assert windows.skipped > 0
    for _k, _u, idx, _w in windows.draws.values():
        assert not bool(flagged[idx].any())
    a_drawn = sampler.num_kept
    batches = list(windows)
    assert sum(len(b) for b in batches) == a_drawn - windows.skipped
    assert not bool(flagged[torch.cat(batches)].any())


def test_training_step_weights_each_loss_and_returns_a_detached_tensor() -> None:
    """The step minimises mean(w · loss) with the sampler's weights of the batch (a dot
    product with w / n), returns that loss without a host sync, and leaves the criterion's
    reduction as it was."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 10, learned_ratio=None)  # no floor: keep 0.6
    train(auto, model, test, 2)  # warmup, then a thermodynamic epoch: weights differ from 1
    data, target, idx = next(iter(auto.get_loader(batch_size=64)))
    assert auto.phase == "thermodynamic"
    w = auto.sampler.weights(idx)
    assert not bool((w == 1).all())
    with torch.no_grad():
        expected = (nn.functional.cross_entropy(model(data), target, reduction="none") * w).mean()
    crit = nn.CrossEntropyLoss()
    loss = auto.training_step(model, data, target, crit, idx)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert crit.reduction == "mean"


class _Recorder:
    """A profiler-like object (AutoH3's ``profiler=``) that keeps what it is given."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def log_batch(self, loss: Any, **kw: Any) -> None:
        self.batches.append({"loss": float(loss), **kw})

    def log_epoch(self, *args: Any, **kw: Any) -> None:
        pass

    def live_eta(self) -> None:
        return None

    def energy_j(self) -> None:
        return None

    def stop(self) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("per_sample", [False, True])
def test_autoh3_streams_mean_losses_and_per_sample_ones_only_when_asked(per_sample: bool) -> None:
    train_set, test, model = digits_and_model()
    rec = _Recorder()
    auto = offline_auto(model, train_set, 1, profiler=rec, log_per_sample=per_sample)
    train(auto, model, test, 1)
    assert len(rec.batches) == -(-len(train_set) // 64)  # the warmup epoch: every batch
    first = rec.batches[0]
    assert first["epoch"] == 0 and first["phase"] == "warmup" and first["loss"] > 0
    if per_sample:
        assert first["losses"].shape == (64,) and first["indices"].shape == (64,)
        assert first["loss"] == pytest.approx(float(first["losses"].mean()))
    else:
        assert "losses" not in first and "indices" not in first


def test_starvation_guard_tells_overfitting_by_the_training_loss() -> None:
    """A held-out loss that rises and swings is starvation only if the training samples'
    loss rose too; while that one falls the model overfits, and uniform_mix stays."""
    from h3optim import EtaController

    def run(train_losses: list[float]) -> EtaController:
        c = EtaController("green", total_epochs=60)
        while c.schedule.phase(c.epoch) != "thermodynamic":
            c.control_step()
            c.observe()
        for held_out, train_loss in zip(
            (1.0, 0.99, 0.98, 0.9, 1.2, 1.5), train_losses, strict=True
        ):
            c.control_step(train_loss=train_loss)
            c.observe(loss=held_out)
        return c

    overfit = run([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert overfit.uniform_mix == pytest.approx(0.2) and "starved" not in overfit.get_report()
    starved = run([1.0, 0.9, 0.8, 0.8, 0.9, 1.1])
    assert starved.uniform_mix == pytest.approx(0.3) and "starved" in starved.get_report()


def test_probe_is_evaluated_in_chunks_of_twice_the_batch_with_the_same_losses() -> None:
    """A 512-sample probe in one forward could exhaust a GPU that trains at batch 64: it is
    evaluated in chunks of 2 × the loader's batch size, with the losses of one pass."""
    train_set, test, model = digits_and_model()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    auto = offline_auto(model, train_set, 10)
    train(auto, model, test, 2)  # batch 64; the thermodynamic epoch measured the probe
    assert auto._probe_batch is not None
    idx, x, y = auto._probe_batch
    assert idx.numel() == 512
    seen.clear()
    _, chunked = auto._probe_losses(model, nn.CrossEntropyLoss())
    assert seen == [128, 128, 128, 128]
    with torch.no_grad():
        whole = nn.functional.cross_entropy(model.eval()(x), y, reduction="none")
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_evaluation_moves_batches_to_the_model_and_reads_the_device_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU test loader's batches go to the model's device (a model on a GPU met CPU
    tensors before), and the accuracy and loss are those of the whole test set."""
    import h3optim.auto as auto_mod

    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 2)
    moved: list[torch.device] = []

    def recording(batch: Any, device: torch.device) -> Any:
        moved.append(device)
        return auto_mod._each_tensor(batch, lambda t: t.to(device))

    monkeypatch.setattr(auto_mod, "_moved", recording)
    acc = auto.evaluate_epoch(model, test)
    assert moved == [torch.device("cpu")] * (2 * len(test))  # data and target of each batch
    x, y = test.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        out = model(x)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert auto.controller.history[-1]["loss"] == pytest.approx(
        float(nn.functional.cross_entropy(out, y)), rel=1e-5
    )


def test_training_step_moves_the_loaders_batches_to_the_model() -> None:
    """get_loader's batches are CPU tensors; a model elsewhere (a GPU; here the meta device,
    which computes shapes only) gets them moved, as evaluate_epoch's, so the documented loop
    runs unchanged on a GPU."""
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to("meta")
    auto = AutoH3(
        model.parameters(),
        TensorDataset(x, y),
        total_epochs=2,
        profile=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        flush_denormal=False,
    )
    data, target, idx = next(iter(auto.get_loader(batch_size=64)))
    assert data.device.type == "cpu"
    loss = auto.training_step(model, data, target, nn.CrossEntropyLoss(), idx)
    assert loss.device.type == "meta"


def test_probe_batches_follow_the_model_to_its_device() -> None:
    """The probe samples come from the dataset (on the CPU) and go where the model is, with
    a dict, list or tuple of tensors moved element by element."""
    from h3optim.auto import _moved

    meta = torch.device("meta")
    batch = {"x": torch.zeros(2, 3), "parts": [torch.ones(2), (torch.ones(1), "tag")]}
    moved = _moved(batch, meta)
    assert moved["x"].device == meta and moved["parts"][0].device == meta
    assert moved["parts"][1][0].device == meta and moved["parts"][1][1] == "tag"
    assert isinstance(moved["parts"][1], tuple) and batch["x"].device.type == "cpu"


def test_a_draw_whose_weights_are_all_zero_is_kept_whole() -> None:
    from h3optim import InformationWeightedSampler, LossTracker
    from h3optim.auto import _weighted

    sampler = InformationWeightedSampler(10, LossTracker(10), unbiased=True)
    idx = torch.tensor([4, 1, 7])
    some = _weighted(sampler, idx, lambda _i: torch.tensor([0.0, 2.0, 0.0]))
    assert torch.equal(some[0], torch.tensor([1])) and some[1] == 2
    whole = _weighted(sampler, idx, lambda _i: torch.zeros(3))
    assert torch.equal(whole[0], idx) and whole[1] == 0  # never an empty epoch


def _draws_holding(windows: Any, idx: torch.Tensor) -> list[str]:
    """The labels of the windowed epoch's draws that ``idx`` is a run of (read in order,
    a B draw wrapping around its end)."""
    found = []
    for label, (_k, _u, share, _w) in windows.draws.items():
        ring = torch.cat([share, share[: idx.numel()]])
        starts = torch.nonzero(ring == idx[0]).reshape(-1).tolist()
        if any(torch.equal(ring[s : s + idx.numel()], idx) for s in starts):
            found.append(label)
    return found


def _windowed_auto(train_set: Any) -> tuple[nn.Module, AutoH3]:
    """A small model and an AutoH3 whose windowed A/B test starts at the first thermodynamic
    epoch, in windows of 3 steps (SGD: its step(closure) returns the loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    auto = AutoH3(
        model.parameters(),
        train_set,
        total_epochs=10,
        profile=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        window_steps=3,
        probe_size=128,
        learned_ratio=None,  # windows from the first thermodynamic epoch
    )
    return model, auto


def test_with_loader_workers_each_step_trains_with_its_own_draws_weights_and_window() -> None:
    """A loader with workers reads the windowed sampler ahead of the training loop: each
    step still weights its batch by the draw the batch came from, and every window the
    controller observes trained with the label it records. Up to the test's decision the
    run is step for step the one without workers; only the batches read ahead of a
    decision train on the setting they were drawn for (a few, with their own weights)."""
    from h3optim import weighted_mean

    train_set, test, _ = digits_and_model()

    def run(workers: int) -> tuple[list[tuple[int, float]], list[Any], int]:
        model, auto = _windowed_auto(train_set)
        c = auto.controller
        crit = nn.CrossEntropyLoss()
        steps: list[tuple[int, float]] = []  # (windows observed, loss) after each step
        observed: list[Any] = []  # (label, the draws of the window's steps) per observation
        window_draws: list[list[str]] = []
        decision_step = -1
        for _ in range(6):
            for data, target, idx in auto.get_loader(batch_size=32, num_workers=workers):
                windows = auto._windows
                testing = windows is not None and c.window_testing
                if windows is not None:
                    draws = _draws_holding(windows, idx)
                    assert len(draws) == 1, draws
                    with torch.no_grad():
                        losses = nn.functional.cross_entropy(model(data), target, reduction="none")
                    w = windows.draws[draws[0]][3][idx]
                    expected = float(weighted_mean(losses, w))
                    other = "B" if draws[0] == "A" else "A"
                    wrong = float(weighted_mean(losses, windows.draws[other][3][idx]))
                    assert wrong != pytest.approx(expected, rel=1e-6)  # the test has power
                before = len(c._windows), len(c.decisions)
                loss = float(auto.training_step(model, data, target, crit, idx))
                if windows is not None:
                    assert loss == pytest.approx(expected, rel=1e-6)  # its own draw's weights
                if testing:
                    window_draws = [*window_draws[-2:], draws]
                    if (len(c._windows), len(c.decisions)) != before:  # a window observed
                        label = c._windows[-1][0] if len(c._windows) > before[0] else "A"
                        observed.append((label, window_draws))
                        if len(c.decisions) > before[1] and decision_step < 0:
                            decision_step = len(steps)
                steps.append((len(c._windows), loss))
            auto.evaluate_epoch(model, test)
        return steps, observed, decision_step

    with_workers = run(2)
    steps, observed, decided = with_workers
    assert decided > 0 and len(observed) >= 9  # the test ran and decided
    for label, draws in observed:  # each observed window trained on the draw of its label
        assert draws == [[label]] * 3, (label, draws)
    plain = run(0)
    assert decided == plain[2] and observed == plain[1]
    assert steps[: decided + 1] == plain[0][: decided + 1]


def test_get_loader_drop_last_in_windowed_and_other_epochs() -> None:
    """``drop_last=True`` gives only full batches, in a windowed A/B epoch as in the others
    (the windowed loader used to hand it to a DataLoader without batch_size, which refuses
    it)."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 8, window_steps=3, probe_size=128, learned_ratio=None)
    crit = nn.CrossEntropyLoss()
    windowed = 0
    for _ in range(8):
        loader = auto.get_loader(batch_size=48, drop_last=True)
        windows = auto._windows
        sizes = []
        for data, target, idx in loader:
            sizes.append(len(idx))
            auto.training_step(model, data, target, crit, idx)
        assert sizes and set(sizes) == {48} and len(sizes) == len(loader)
        if windows is not None:
            windowed += 1
            assert len(sizes) == windows.draws["A"][2].numel() // 48
        auto.evaluate_epoch(model, test)
    assert windowed >= 2
    assert auto.finish()["samples_backpropagated"] % 48 == 0


def test_without_workers_a_windowed_step_finds_its_batch_by_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without workers the loader hands the training step the very index tensor the windowed
    sampler made: its record is found by identity, not by comparing indices (a
    ``torch.equal`` costs about 7 µs, 1 % of a small model's step)."""
    train_set, test, _ = digits_and_model()
    model, auto = _windowed_auto(train_set)
    crit = nn.CrossEntropyLoss()
    compared = 0
    real_equal = torch.equal

    def counting_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
        nonlocal compared
        compared += 1
        return real_equal(a, b)

    windowed = 0
    for _ in range(6):
        for data, target, idx in auto.get_loader(batch_size=32):
            windowed += auto._windows is not None
            with monkeypatch.context() as m:
                m.setattr(torch, "equal", counting_equal)
                auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
    assert windowed > 10 and compared == 0


class _Epochs(_Recorder):
    """A profiler-like object that keeps each epoch's figures; its energy counter reads 10 J
    more at each reading (an epoch's start and its evaluation: 10 J an epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[dict[str, Any]] = []
        self.joules = 0.0

    def log_epoch(self, *args: Any, **kw: Any) -> None:
        self.epochs.append(kw)

    def energy_j(self) -> float:  # type: ignore[override]
        self.joules += 10.0
        return self.joules


def _regression(flat: bool) -> tuple[TensorDataset, DataLoader[Any], nn.Module]:
    """A noisy linear target of sklearn's digits (N, 1), or (N,) with ``flat``, and an MLP
    with one output."""
    train_set, test = digits()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 1, generator=g) / 4

    def targets(ds: TensorDataset) -> TensorDataset:
        x = ds.tensors[0]
        y = x @ w + 0.05 * torch.randn(len(x), 1, generator=g)
        return TensorDataset(x, y.reshape(-1) if flat else y)

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)]
    model = nn.Sequential(*layers, nn.Flatten(0)) if flat else nn.Sequential(*layers)
    test_set = targets(test.dataset)  # type: ignore[arg-type]
    return targets(train_set), DataLoader(test_set, batch_size=100), model


@pytest.mark.parametrize("flat", [False, True])
def test_a_regression_reports_its_held_out_loss_under_its_criterion(flat: bool) -> None:
    """evaluate_epoch takes the held-out loss by the criterion the run trains with (it was
    always cross-entropy: -0.0 for an MSE run with (N, 1) targets, an IndexError with (N,)
    ones), reports no accuracy where the targets are not class indices, and the
    controller's η is that loss's drop per joule."""
    train_set, test, model = _regression(flat)
    rec = _Epochs()
    auto = offline_auto(model, train_set, 3, profiler=rec)
    crit = nn.MSELoss()
    for _ in range(3):
        for data, target, idx in auto.get_loader(batch_size=64):
            auto.training_step(model, data, target, crit, idx)
        assert auto.evaluate_epoch(model, test) is None  # no accuracy for a regression
        x, y = test.dataset.tensors  # type: ignore[attr-defined]
        with torch.no_grad():
            mse = float(crit(model(x), y))
        last = auto.controller.history[-1]
        assert last["accuracy"] is None and last["loss"] == pytest.approx(mse, rel=1e-5)
        assert rec.epochs[-1]["val_loss"] == last["loss"] and rec.epochs[-1]["accuracy"] is None
    losses = [h["loss"] for h in auto.controller.history]
    assert losses[-1] < 0.8 * losses[0]  # it learns
    etas = [h["eta"] for h in auto.controller.history]
    assert etas[1] == pytest.approx((losses[0] - losses[1]) / math.log(2) / 10.0)
    assert etas[2] == pytest.approx((losses[1] - losses[2]) / math.log(2) / 10.0)


def test_evaluation_uses_the_training_criterion_and_accuracy_only_for_class_indices() -> None:
    """A classifier's held-out loss is that of its own criterion (label smoothing here), or
    of the one evaluate_epoch is given; accuracy needs integer class indices."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 2)
    crit = nn.CrossEntropyLoss(label_smoothing=0.2)
    for data, target, idx in auto.get_loader(batch_size=64):
        auto.training_step(model, data, target, crit, idx)
    x, y = test.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        out = model(x)
    acc = auto.evaluate_epoch(model, test)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert auto.controller.history[-1]["loss"] == pytest.approx(float(crit(out, y)), rel=1e-5)
    plain = nn.functional.cross_entropy(out, y)
    assert auto.controller.history[-1]["loss"] != pytest.approx(float(plain), rel=1e-3)
    auto.evaluate_epoch(model, test, criterion=nn.functional.cross_entropy)
    assert auto.controller.history[-1]["loss"] == pytest.approx(float(plain), rel=1e-5)
    # one-hot (class-probability) targets: the loss, and no accuracy
    soft = DataLoader(TensorDataset(x, nn.functional.one_hot(y, 10).float()), batch_size=128)
    assert auto.evaluate_epoch(model, soft, criterion=nn.CrossEntropyLoss()) is None
    assert auto.controller.history[-1]["loss"] == pytest.approx(float(plain), rel=1e-5)


def _bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
    )


def test_autoh3_trains_in_train_mode_and_its_evaluations_restore_each_modules_mode() -> None:
    """``training_step`` puts a model left in eval mode (by the caller's own evaluation) back
    in train mode, as the Hugging Face Trainer does, and keeps a module frozen inside a model
    in train mode (batch-norm statistics); AutoH3's evaluations leave every module's mode as
    they found it (``evaluate_epoch`` used to leave the whole model in eval mode)."""
    train_set, test, _ = digits_and_model()
    model = _bn_dropout_model()
    auto = offline_auto(model, train_set, 4, window_steps=2, probe_size=64, learned_ratio=None)
    crit = nn.CrossEntropyLoss()
    model.train()
    model[1].eval()  # frozen batch-norm statistics
    stats = model[1].running_mean.clone()
    for _ in range(4):
        for data, target, idx in auto.get_loader(batch_size=64):
            auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
        auto._probe_losses(model, crit)
        assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert torch.equal(model[1].running_mean, stats)  # the statistics stayed frozen
    model.eval()  # the caller's own evaluation
    with pytest.warns(UserWarning, match="past total_epochs"):  # a fifth epoch of a 4-epoch plan
        data, target, idx = next(iter(auto.get_loader(batch_size=64)))
    auto.training_step(model, data, target, crit, idx)
    assert all(m.training for m in model.modules())


def test_bad_arguments_are_clear_value_errors() -> None:
    """batch_size < 1 (it was a ZeroDivisionError), a learned_ratio outside (0, 1] (it was
    accepted) and a criterion that gives the batch's mean loss instead of one per sample (it
    was a TypeError about ``reduction``) are ValueErrors that say what is wrong."""
    train_set, _, model = digits_and_model()
    auto = offline_auto(model, train_set, 2, flush_denormal=False)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"Invalid batch_size: {bad}"):
            auto.get_loader(batch_size=bad)
    for ratio in (-1.0, 0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"Invalid learned_ratio: .*\(0, 1\]"):
            offline_auto(model, train_set, 2, learned_ratio=ratio)
    assert offline_auto(model, train_set, 2, learned_ratio=1.0).learned_ratio == 1.0

    class MeanCE(nn.Module):  # a typical hand-written loss: the batch's mean
        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(out, target, label_smoothing=0.1)

    class IgnoresReduction(nn.Module):  # has the attribute, returns the mean all the same
        reduction = "mean"

        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(out, target)

    data, target, idx = next(iter(auto.get_loader(batch_size=64)))
    criteria: list[Any] = [
        lambda o, t: nn.functional.cross_entropy(o, t),
        MeanCE(),
        IgnoresReduction(),
    ]
    for crit in criteria:
        with pytest.raises(ValueError, match=r"one loss per\s+sample.*reduction='none'"):
            auto.training_step(model, data, target, crit, idx)
    # a criterion that takes reduction= as torch's functions do trains
    loss = auto.training_step(model, data, target, nn.functional.cross_entropy, idx)
    assert math.isfinite(float(loss))


def test_a_nonfinite_probe_sample_leaves_the_windowed_test_and_train_loss_running() -> None:
    """One probe sample whose loss is NaN (a corrupt input) made every probe mean NaN: no
    window was ever observed, the test was then held as "too short", and the starvation
    guard lost its training loss. The probe averages its finite losses."""
    train_set, test, model = digits_and_model()
    x, y = train_set.tensors
    kw: dict[str, Any] = dict(
        total_epochs=8, profile=False, lr=3e-3, window_steps=4, probe_size=128, learned_ratio=None
    )
    ce = nn.functional.cross_entropy
    probe, _ = AutoH3(model.parameters(), train_set, **kw)._probe_losses(model, ce)
    x[probe[0]] = math.nan  # in the probe subset of every AutoH3 of this seed
    auto = AutoH3(model.parameters(), train_set, **kw)  # H3Optimizer: skips a NaN step
    auto.controller.min_pairs = auto.controller.max_pairs = 3
    train(auto, model, test, 8)
    res = auto.finish()
    thermo = [h for h in auto.controller.history if h["phase"] == "thermodynamic"]
    assert thermo and all(h["train_loss"] is not None for h in thermo)
    assert all(math.isfinite(h["train_loss"]) for h in thermo)
    assert "window pairs" in res["controller_report"]  # decided on observed windows
    assert "too short" not in res["controller_report"]
    _, losses = auto._probe_losses(model, ce)
    assert losses.isnan().sum() == 1 and losses[0].isnan()
    assert auto._probe_loss(model, ce) == pytest.approx(float(losses[1:].mean()))


def test_a_probe_without_any_finite_loss_warns_once() -> None:
    train_set, _, model = digits_and_model()
    auto = offline_auto(model, train_set, 4)

    nan_model = nn.Linear(64, 10)
    nn.init.constant_(nan_model.weight, math.nan)  # every probe loss NaN
    with pytest.warns(RuntimeWarning, match="none of the 512 probe samples has a finite loss"):
        assert math.isnan(auto._probe_loss(nan_model, nn.functional.cross_entropy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(auto._probe_loss(nan_model, nn.functional.cross_entropy))


def _resumable(model: nn.Module, train_set: TensorDataset) -> AutoH3:
    """An AutoH3 (H3Optimizer) whose 8 epochs hold floored epochs (1–3; epoch 3's floor,
    0.79, judged by the probe) and a windowed A/B test that runs across the epoch 4/5
    boundary and decides in epoch 5."""
    auto = AutoH3(
        model.parameters(),
        train_set,
        total_epochs=8,
        profile=False,
        window_steps=3,
        probe_size=128,
        learned_ratio=0.5,
    )
    auto.controller.min_pairs, auto.controller.max_pairs = 3, 4
    return auto


def _epochs(auto: AutoH3, model: nn.Module, test: DataLoader[Any], stop: int) -> list[Any]:
    """Train up to epoch ``stop``; each epoch's (epoch, keep_frac, windowed, indices)."""
    crit = nn.CrossEntropyLoss()
    out = []
    while auto.epoch < stop:
        loader = auto.get_loader(batch_size=64)
        drawn = []
        for data, target, idx in loader:
            auto.training_step(model, data, target, crit, idx)
            drawn += idx.tolist()
        out.append((auto.epoch, auto.sampler.keep_frac, auto._windows is not None, drawn))
        auto.evaluate_epoch(model, test)
    return out


@pytest.mark.parametrize("stop", [3, 5])
def test_a_resumed_autoh3_draws_and_decides_as_an_uninterrupted_run(
    stop: int, tmp_path: Path
) -> None:
    """AutoH3.state_dict() holds what is not the model's (optimizer, tracker, sampler,
    controller, epoch, window and sample counters) and loads, through torch.load's
    weights_only unpickler, into a fresh AutoH3 that goes on as if never stopped: the
    same draws, windows, decisions and weights (before: it started again at epoch 0 and
    replayed the first epochs' draws)."""
    train_set, test, model = digits_and_model()
    whole = _resumable(model, train_set)
    expected = _epochs(whole, model, test, 8)
    assert {e[2] for e in expected} == {False, True}  # windowed epochs and others
    assert any(e[1] not in (0.6, 1.0) for e in expected)  # a floor judged by the probe
    res = whole.finish()
    assert "window pairs" in res["controller_report"]

    train_set, test, model = digits_and_model()
    first = _resumable(model, train_set)
    assert _epochs(first, model, test, stop) == expected[:stop]
    torch.save({"model": model.state_dict(), "auto": first.state_dict()}, tmp_path / "ck.pt")
    first.finish()
    del first, model

    train_set, test, model = digits_and_model()  # a fresh model, AutoH3 and dataset
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    resumed = _resumable(model, train_set)
    resumed.load_state_dict(saved["auto"], model=model, criterion=nn.CrossEntropyLoss())
    assert resumed.epoch == stop
    assert _epochs(resumed, model, test, 8) == expected[stop:]
    again = resumed.finish()
    for key in ("controller_report", "samples_backpropagated", "samples_skipped", "skipped_steps"):
        assert again[key] == res[key]
    assert again["controller_decisions"] == res["controller_decisions"]
    for p, q in zip(model.parameters(), whole.optimizer.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)


def test_a_controller_state_loaded_on_its_own_carries_the_epoch() -> None:
    """Parts restored without AutoH3.load_state_dict: the run goes on at the controller's
    epoch (before: at epoch 0, replaying its draws while the controller was further on)."""
    train_set, test, model = digits_and_model()
    auto = offline_auto(model, train_set, 6, learned_ratio=None)
    train(auto, model, test, 2)
    fresh = offline_auto(model, train_set, 6, learned_ratio=None)
    fresh.loss_tracker.load_state_dict(auto.loss_tracker.state_dict())
    fresh.controller.load_state_dict(auto.controller.state_dict())
    fresh.get_loader(batch_size=64)
    auto.get_loader(batch_size=64)
    assert fresh.epoch == fresh.sampler.epoch == auto.sampler.epoch == 2
    assert torch.equal(fresh.sampler.epoch_indices(), auto.sampler.epoch_indices())


def test_an_optimizer_factory_gets_the_users_param_groups_untouched() -> None:
    """``optimizer=factory`` with dict groups: the factory's own lr and weight decay apply to
    the groups that set none. AutoH3 used to build an H3Optimizer from the same dicts first,
    which filled them in place with its defaults (lr 1e-3, weight_decay 0) and private keys:
    AdamW(lr=3e-4, weight_decay=0.05) trained at 1e-3 without decay. No H3Optimizer is built
    now, so a group lr above its lr_max is no error, and its keyword arguments are refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    auto = AutoH3(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        data,
        total_epochs=2,
        profile=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.05),
    )
    groups = auto.optimizer.param_groups
    assert isinstance(auto.optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in groups] == [3e-4, 3e-4]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert not any(k.startswith(("lipschitz", "lr_")) for g in groups for k in g)
    sgd = AutoH3(
        [{"params": decay, "lr": 0.5}, {"params": no_decay}],  # above H3Optimizer's lr_max
        data,
        total_epochs=2,
        profile=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    )
    assert [g["lr"] for g in sgd.optimizer.param_groups] == [0.5, 0.1]
    with pytest.raises(TypeError, match=r"\['lipschitz_safety'\].*give them to the factory"):
        AutoH3(
            model.parameters(),
            data,
            profile=False,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            lipschitz_safety=0.5,
        )


class _VarLen(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Token sequences of 2 to 8 tokens, labelled by the parity of their sum."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(2, 9, (n,), generator=g).tolist()
        self.seqs = [torch.randint(1, 20, (k,), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.seqs[i], int(self.seqs[i].sum()) % 2


class _PadCollate:
    """Pads a batch of ``(sequence, label, index)`` items; fails on anything else (a batch
    collated already, or by ``default_collate`` first)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert isinstance(items, list), f"collated twice: got a {type(items).__name__}"
        assert all(isinstance(it, tuple) and len(it) == 3 for it in items)
        self.sizes.append(len(items))
        return (
            nn.utils.rnn.pad_sequence([it[0] for it in items], batch_first=True),
            torch.tensor([int(it[1]) for it in items]),
            torch.tensor([int(it[2]) for it in items]),
        )


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x).sum(1))


def test_the_users_collate_fn_makes_every_batch_and_probe_chunk_once() -> None:
    """Variable-length sequences padded by the ``collate_fn`` given to ``get_loader``: the
    probe used ``default_collate`` (a RuntimeError, "stack expects each tensor to be equal
    size", at the first thermodynamic epoch), and windowed epochs collated with it too
    before the loader applied the user's function to the collated batch. Now the function
    makes each training batch and each probe chunk from its items, once, in windowed
    epochs and the others."""
    torch.manual_seed(0)
    model, collate = _Bag(), _PadCollate()
    auto = AutoH3(
        model.parameters(),
        _VarLen(64),
        total_epochs=8,
        profile=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        window_steps=1,
        probe_size=16,
        learned_ratio=None,  # the windowed test from the first thermodynamic epoch
    )
    crit = nn.CrossEntropyLoss()
    test = [collate([(*auto.indexed_dataset.dataset[i], i) for i in range(64)])]
    windowed = 0
    for _ in range(8):
        loader = auto.get_loader(batch_size=8, collate_fn=collate)
        windowed += auto.controller.window_testing
        for data, target, idx in loader:
            assert data.dim() == 2 and len(target) == len(idx) <= 8
            auto.training_step(model, data, target, crit, idx)
        auto.evaluate_epoch(model, test)
    assert windowed >= 2
    assert 16 in collate.sizes  # the probe, in one chunk of up to twice the batch
    # a tensor dataset given a collate_fn: batches of its items too (not a fetched batch)
    seen = []

    def record(items: list[Any]) -> Any:
        seen.append(items)
        return torch.utils.data.default_collate(items)

    plain = AutoH3(
        model.parameters(),
        TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,))),
        total_epochs=2,
        profile=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    batches = list(plain.get_loader(batch_size=8, collate_fn=record))
    assert [len(b[2]) for b in batches] == [8, 8, 4]
    assert all(isinstance(items, list) and len(items[0]) == 3 for items in seen)


def _sampled_run(
    compensate: bool, factory: bool = True, mode: str = "balanced"
) -> tuple[AutoH3, _Epochs, list[list[float]], list[float]]:
    """Six epochs over the digits with a StepLR on the optimizer (×0.9 each epoch): the lr in
    effect at each step, by epoch (a step pre-hook), and the scheduler's lr per epoch."""
    train_set, test, model = digits_and_model()
    rec = _Epochs()
    kw: dict[str, Any] = {"optimizer": lambda p: torch.optim.Adam(p, lr=1e-3)} if factory else {}
    auto = AutoH3(
        model.parameters(),
        train_set,
        mode=mode,
        total_epochs=6,
        profiler=rec,
        lr_compensation=compensate,
        learned_ratio=None,  # sample from the first thermodynamic epoch on
        **kw,
    )
    sched = torch.optim.lr_scheduler.StepLR(auto.optimizer, step_size=1, gamma=0.9)
    stepped: list[list[float]] = []

    def seen(opt: torch.optim.Optimizer, *_: Any) -> None:
        group = opt.param_groups[0]
        stepped[-1].append(group["lr"] * group.get("step_scale", 1.0))

    auto.optimizer.register_step_pre_hook(seen)
    crit = nn.CrossEntropyLoss()
    scheduled = []
    for _ in range(6):
        stepped.append([])
        scheduled.append(auto.optimizer.param_groups[0]["lr"])
        for data, target, idx in auto.get_loader(batch_size=64):
            auto.training_step(model, data, target, crit, idx)
        assert auto.optimizer.param_groups[0]["lr"] == scheduled[-1]  # the scheduler's own
        auto.evaluate_epoch(model, test)
        sched.step()
    return auto, rec, stepped, scheduled


@pytest.mark.parametrize("factory", [True, False], ids=["Adam", "H3Optimizer"])
def test_lr_compensation_scales_a_sampled_epochs_steps_and_leaves_the_schedulers_lr(
    factory: bool,
) -> None:
    """Each step of a sampled epoch takes the scheduler's lr × (a full epoch's steps / this
    epoch's), at most 2; uniform epochs take the scheduler's lr; every epoch logs its
    factor; between steps the optimizer's lr is the scheduler's, and no scale is left."""
    full = math.ceil(1400 / 64)
    auto, rec, stepped, scheduled = _sampled_run(True, factory)
    factors = [e["lr_factor"] for e in rec.epochs]
    assert factors[0] == 1.0 and factors[-1] == 1.0  # warmup and consolidation: uniform
    assert any(f > 1.0 for f in factors)  # the thermodynamic epochs sampled
    for steps, lr, factor in zip(stepped, scheduled, factors, strict=True):
        assert factor == pytest.approx(min(2.0, max(1.0, full / len(steps))))
        if not factory:  # H3Optimizer's probe may lower its step: never above the scale's
            assert all(s <= lr * factor * (1 + 1e-12) for s in steps)
            continue
        assert steps == pytest.approx([lr * factor] * len(steps))
    assert all(g.get("step_scale", 1.0) == 1.0 for g in auto.optimizer.param_groups)
    auto.finish()


def test_without_lr_compensation_every_step_takes_the_schedulers_lr() -> None:
    _, rec, stepped, scheduled = _sampled_run(False)
    assert {e["lr_factor"] for e in rec.epochs} == {1.0}
    assert sum(map(len, stepped)) < 6 * math.ceil(1400 / 64)  # it did sample
    for steps, lr in zip(stepped, scheduled, strict=True):
        assert steps == pytest.approx([lr] * len(steps))


def test_lr_compensation_is_at_most_twice_the_step() -> None:
    """The leanest mode keeps under half the data: its epochs' scale stops at 2."""
    _, rec, stepped, _ = _sampled_run(True, mode="extreme")
    full = math.ceil(1400 / 64)
    assert min(map(len, stepped)) < full / 2
    assert max(e["lr_factor"] for e in rec.epochs) == 2.0


def test_a_step_that_sets_its_own_lr_keeps_it_unscaled() -> None:
    """An optimizer whose step sets a new lr (as H3Optimizer's probe does): AutoH3 restores
    that lr over the scale, not the one from before the step."""
    train_set, _, model = digits_and_model()

    class Halving(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            loss = super().step(closure)
            for group in self.param_groups:
                group["lr"] = group["lr"] / 2
            return loss

    auto = AutoH3(
        model.parameters(), train_set, profile=False, optimizer=lambda p: Halving(p, lr=0.1)
    )
    auto.lr_factor = 1.5
    data, target = train_set.tensors
    auto.training_step(model, data[:64], target[:64], nn.CrossEntropyLoss(), torch.arange(64))
    assert auto.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 × 1.5 / 2 / 1.5
