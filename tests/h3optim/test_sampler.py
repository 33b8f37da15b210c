from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from h3optim import (
    IndexedDataset,
    InformationWeightedSampler,
    LossTracker,
    PhaseSchedule,
    batch_loader,
)


def tracker_with_losses(n: int, seed: int = 0) -> LossTracker:
    t = LossTracker(n)
    g = torch.Generator().manual_seed(seed)
    t.update(torch.arange(n), torch.rand(n, generator=g))
    return t


def test_phase_schedule() -> None:
    s = PhaseSchedule(20)
    assert [s.phase(e) for e in (0, 2, 3, 16, 17, 19)] == [
        "warmup",
        "warmup",
        "thermodynamic",
        "thermodynamic",
        "consolidation",
        "consolidation",
    ]
    assert PhaseSchedule(10, warmup=0, consolidation=0).phase(0) == "thermodynamic"
    with pytest.raises(ValueError):
        PhaseSchedule(10, warmup=0.6, consolidation=0.6)


def test_kept_and_uniform_shares() -> None:
    n = 1000
    t = tracker_with_losses(n)
    s = InformationWeightedSampler(n, t, keep_frac=0.4, uniform_mix=0.25, outlier_quantile=1.0)
    idx = list(s)
    assert len(idx) == 400 == len(set(idx))
    top = set(torch.argsort(t.ema, descending=True)[:300].tolist())
    assert len(top & set(idx)) >= 300  # the loss-driven 300 are all there
    # the uniform 100 come from outside the top 300
    assert len(set(idx) - top) >= 95


def test_unseen_samples_come_first_and_outliers_wait() -> None:
    t = LossTracker(100)
    t.update(torch.arange(50), torch.linspace(0, 1, 50))
    s = InformationWeightedSampler(100, t, keep_frac=0.5, uniform_mix=0.0)
    idx = set(s)
    assert set(range(50, 100)) <= idx  # all 50 unseen
    t.update(torch.arange(50, 100), torch.linspace(0, 1, 50))
    t.update(torch.tensor([7]), torch.tensor([100.0]))  # a mislabeled-looking outlier
    s2 = InformationWeightedSampler(100, t, keep_frac=0.1, uniform_mix=0.0, outlier_quantile=0.98)
    assert 7 not in set(s2)


def test_deterministic_per_seed_and_epoch() -> None:
    t = tracker_with_losses(500)
    a = InformationWeightedSampler(500, t, 0.5, 0.5, seed=3)
    b = InformationWeightedSampler(500, t, 0.5, 0.5, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    state = torch.random.get_rng_state()
    list(a)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_shards_are_disjoint_and_complete() -> None:
    t = tracker_with_losses(103)
    shards = [
        list(InformationWeightedSampler(103, t, 0.6, 0.5, num_replicas=4, rank=r, seed=1))
        for r in range(4)
    ]
    assert len({len(s) for s in shards}) == 1
    full = InformationWeightedSampler(103, t, 0.6, 0.5, seed=1).epoch_indices().tolist()
    together = [i for s in shards for i in s]
    assert set(together) == set(full)  # complete
    assert (
        sum(len(s) for s in shards) - len(full) < 4
    )  # only the DistributedSampler padding repeats


def test_no_sample_starved_over_many_epochs() -> None:
    n = 300
    t = tracker_with_losses(n)
    s = InformationWeightedSampler(n, t, keep_frac=0.3, uniform_mix=0.2, seed=0)
    # even with losses frozen (the worst case: the same 72 always win the loss-driven
    # share), every other sample has an 18/228 chance each epoch: P(missed 200 times) ≈ 1e-7
    seen: set[int] = set()
    for epoch in range(200):
        s.set_epoch(epoch)
        seen |= set(s)
    assert len(seen) == n


def test_unbiased_weights_give_the_full_data_gradient() -> None:
    # linear model, squared loss: per-sample gradients are known in closed form
    g = torch.Generator().manual_seed(0)
    n, d = 400, 5
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, generator=g)
    w = torch.randn(d, generator=g)
    per_sample_grad = 2 * (x @ w - y)[:, None] * x  # n × d
    full = per_sample_grad.mean(0)
    t = LossTracker(n)
    t.update(torch.arange(n), (x @ w - y) ** 2)
    s = InformationWeightedSampler(n, t, keep_frac=0.3, uniform_mix=0.4, seed=0, unbiased=True)
    est = []
    biased = []
    for epoch in range(3000):
        s.set_epoch(epoch)
        idx = torch.tensor(list(s))
        est.append((s.weights(idx)[:, None] * per_sample_grad[idx]).mean(0))
        biased.append(per_sample_grad[idx].mean(0))
    mean_est = torch.stack(est).mean(0)
    se = torch.stack(est).std(0) / len(est) ** 0.5
    assert torch.all((mean_est - full).abs() < 4 * se + 1e-6), (mean_est, full, se)
    # without the weights the loss-driven share biases the gradient
    assert (torch.stack(biased).mean(0) - full).abs().max() > 10 * se.max()


def test_validation() -> None:
    t = LossTracker(10)
    with pytest.raises(ValueError):
        InformationWeightedSampler(10, t, keep_frac=0.0)
    with pytest.raises(ValueError):
        InformationWeightedSampler(10, t, uniform_mix=1.5)
    with pytest.raises(ValueError):
        InformationWeightedSampler(11, t)


def test_indices_unchanged_for_the_same_seed_and_epoch() -> None:
    # recorded from the per-index implementation before the tensor rewrite: the tensor
    # path and the noise guard (inactive while every sample has been seen once) keep them
    t = LossTracker(200)
    g = torch.Generator().manual_seed(0)
    t.update(torch.arange(200), torch.rand(200, generator=g))
    expected = {
        (0.4, 0.25): [9, 67, 153, 36, 173, 72, 184, 112, 117, 42, 16, 111],
        (1.0, 1.0): [33, 123, 74, 175, 18, 141, 61, 19, 126, 10, 112, 194],
        (0.5, 1.0): [33, 105, 60, 151, 196, 197, 70, 44, 35, 65, 136, 68],
    }
    for (k, u), first in expected.items():
        s = InformationWeightedSampler(200, t, k, u, seed=3)
        s.set_epoch(2)
        assert list(s)[:12] == first
        assert torch.equal(s.indices(), torch.tensor(list(s)))
    t2 = LossTracker(200)
    t2.update(torch.arange(100), torch.rand(100, generator=g))
    s = InformationWeightedSampler(200, t2, 0.3, 0.2, seed=1)
    s.set_epoch(5)
    assert list(s)[:12] == [105, 145, 121, 103, 149, 102, 151, 129, 116, 125, 119, 139]


def test_draws_rank_once_and_give_what_draw_gives() -> None:
    """Several settings drawn together (a windowed A/B epoch) are the draws made one by one:
    with unseen samples, a noise-guarded one, and a setting with no loss-driven share."""
    t = tracker_with_losses(300)
    t.update(torch.tensor([5, 6]), torch.tensor([9.0, 9.0]))  # rose: noise guard
    t2 = LossTracker(300)  # 50 samples never seen
    t2.update(torch.arange(250), torch.rand(250, generator=torch.Generator().manual_seed(1)))
    for tracker in (t, t2):
        s = InformationWeightedSampler(300, tracker, seed=4)
        s.set_epoch(3)
        settings = [(0.6, 0.3), (0.5, 0.3), (1.0, 1.0), (0.4, 0.0)]
        for (a, pa), (b, pb) in zip(
            s.draws(settings), [s.draw(k, u) for k, u in settings], strict=True
        ):
            assert torch.equal(a, b) and torch.equal(pa, pb)


def test_noise_guard_keeps_rising_losses_out_of_the_loss_driven_share() -> None:
    n = 100
    t = LossTracker(n, smoothing=1.0)
    t.update(torch.arange(n), torch.full((n,), 2.0))
    # 0..9: the loss rose above its first value (a flipped label); 10..99 fell, 10..19 least
    later = torch.cat([torch.full((10,), 3.0), torch.full((10,), 1.5), torch.full((80,), 0.5)])
    t.update(torch.arange(n), later)
    guarded = InformationWeightedSampler(n, t, keep_frac=0.1, uniform_mix=0.0)
    assert set(guarded) == set(range(10, 20))
    off = InformationWeightedSampler(
        n, t, keep_frac=0.1, uniform_mix=0.0, noise_guard=None, outlier_quantile=1.0
    )
    assert set(off) == set(range(10))
    with pytest.raises(ValueError):
        InformationWeightedSampler(n, t, noise_guard=0.0)


def test_weights_are_one_gather_and_can_be_capped() -> None:
    t = tracker_with_losses(1000)
    s = InformationWeightedSampler(1000, t, 0.3, 0.1, unbiased=True, max_weight=2.0)
    idx = s.indices()
    w = s.weights(idx)
    assert w.shape == idx.shape and float(w.max()) <= 2.0
    uncapped = InformationWeightedSampler(1000, t, 0.3, 0.1, unbiased=True)
    assert float(uncapped.weights(uncapped.indices()).max()) > 2.0


def test_samples_whose_loss_rose_past_the_margin_get_weight_zero() -> None:
    n = 1000
    t = LossTracker(n, smoothing=1.0)
    first = torch.full((n,), 2.3)
    t.update(torch.arange(n), first)
    later = first - 1.0  # most samples are being learned
    later[:50] = 2.3 + 0.6  # these rose by 0.6 nats: their labels disagree with the model
    later[50:80] = 2.3 + 0.4  # these by 0.4: within the margin
    t.update(torch.arange(n), later)
    s = InformationWeightedSampler(n, t, 0.5, 0.3, unbiased=True)
    assert s.likely_mislabeled().nonzero().reshape(-1).tolist() == list(range(50))
    plain = InformationWeightedSampler(n, t, 0.5, 0.3, unbiased=True, noise_margin=None)
    idx = s.indices()
    assert torch.equal(idx, plain.indices())  # the margin changes the weights, not the draw
    w, w_plain = s.weights(idx), plain.weights(idx)
    rose = idx < 50
    assert rose.any() and bool((w[rose] == 0).all())
    assert torch.equal(w[~rose], w_plain[~rose]) and bool((w_plain[rose] > 0).all())
    # a changed margin is applied at once, as a changed cap is
    s.noise_margin = 0.3
    assert int((s.weights(idx) == 0).sum()) == int((idx < 80).sum())


def test_a_model_that_is_not_learning_is_not_mistaken_for_bad_labels() -> None:
    n = 100
    t = LossTracker(n, smoothing=1.0)
    t.update(torch.arange(n), torch.full((n,), 1.0))
    t.update(torch.arange(n), torch.full((n,), 3.0))  # every loss rose: a divergence
    s = InformationWeightedSampler(n, t, 0.5, 0.3, unbiased=True)
    assert not s.likely_mislabeled().any()
    assert bool((s.weights(s.indices()) > 0).all())
    with pytest.raises(ValueError):
        InformationWeightedSampler(n, t, noise_margin=-0.1)


@pytest.mark.parametrize(("rose", "flagged"), [(10, 0), (19, 0), (20, 20), (80, 80)])
def test_a_few_rising_losses_are_hard_samples_not_bad_labels(rose: int, flagged: int) -> None:
    """Under ``noise_min_share`` (2 %) of the seen samples flagged, none is set to 0: on clean
    data that is what a model still learning its hard samples looks like."""
    n = 1000
    t = LossTracker(n, smoothing=1.0)
    t.update(torch.arange(n), torch.full((n,), 2.3))
    later = torch.full((n,), 1.3)
    later[:rose] = 2.9  # rose by 0.6 nats, past the margin
    t.update(torch.arange(n), later)
    s = InformationWeightedSampler(n, t, 0.5, 0.3, unbiased=True)
    assert int(s.likely_mislabeled().sum()) == flagged
    assert int((s.weights(torch.arange(n)) == 0).sum()) == flagged
    every = InformationWeightedSampler(n, t, 0.5, 0.3, unbiased=True, noise_min_share=0.0)
    assert int(every.likely_mislabeled().sum()) == rose
    with pytest.raises(ValueError):
        InformationWeightedSampler(n, t, noise_min_share=0.6)


def test_the_weight_vector_is_computed_once_per_draw_and_follows_changes() -> None:
    t = tracker_with_losses(1000)
    s = InformationWeightedSampler(1000, t, 0.3, 0.1, unbiased=True)
    idx = s.indices()
    first = s.weights(idx)
    assert s._weights is not None
    vector = s._weights[2]
    assert s.weights(idx[:5]).tolist() == first[:5].tolist() and s._weights[2] is vector
    s.max_weight = 1.5  # a changed cap is applied at once
    assert float(s.weights(idx).max()) <= 1.5
    s.max_weight = None
    t.update(torch.arange(1000), torch.rand(1000, generator=torch.Generator().manual_seed(3)))
    s.set_fractions(0.5, 0.2)
    s.set_epoch(1)
    idx = s.indices()  # a new draw: new inclusion probabilities, a new vector
    assert s._probs is not None
    assert torch.equal(s.weights(idx), s.weights_from(s._probs, s.num_kept)[idx])


def test_weighted_mean_is_the_mean_of_weighted_losses_with_its_gradient() -> None:
    from h3optim import weighted_mean

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (37,), generator=g)
    w = torch.rand(37, generator=g, dtype=torch.float64)  # another dtype than the losses
    losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    got = weighted_mean(losses, w)
    (grad,) = torch.autograd.grad(got, logits, retain_graph=True)
    want = (losses * w.float()).mean()
    (want_grad,) = torch.autograd.grad(want, logits)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert torch.allclose(got, want) and torch.allclose(grad, want_grad)
    column = weighted_mean(losses.detach().reshape(-1, 1), w)  # one loss per sample, any shape
    assert torch.allclose(column, want.detach())


def test_samples_never_finite_wait_for_the_uniform_share() -> None:
    """A sample whose loss is never finite stays unseen; once sighted it must not be ranked
    first forever (before: drawn with probability 1 in every epoch once the rest had been
    seen), only drawn by the uniform share like any sample outside the loss-driven one."""
    n, bad = 1000, torch.tensor([3, 42, 500, 777, 901])
    t = LossTracker(n)
    s = InformationWeightedSampler(n, t, keep_frac=0.3, uniform_mix=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    drawn, sighted = [], torch.zeros(len(bad), dtype=torch.bool)
    for epoch in range(8):
        s.set_epoch(epoch)
        idx = s.indices()
        losses = torch.rand(idx.numel(), generator=g) + 0.5
        losses[torch.isin(idx, bad)] = float("inf")
        t.update(idx, losses)
        drawn.append(int(torch.isin(bad, idx).sum()))
        sighted |= torch.isin(bad, idx)
        _, probs = s.draw(0.3, 0.1)  # the next epoch's inclusion probabilities
        assert (probs[bad[sighted]] < 0.1).all()  # 30 uniform picks among the other 730
    assert sighted.all() and not t.seen[bad].any()
    assert sum(drawn[3:]) < 5  # before: all 5 in each of those 5 epochs


class _Growing(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset that new labelled samples join (active learning, say)."""

    def __init__(self, n: int) -> None:
        self.items = [(torch.full((2,), float(i)), i % 2) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def test_a_dataset_whose_size_changed_is_a_clear_error_at_the_next_epoch() -> None:
    """N is fixed when the sampler and its tracker are built: a dataset that grew since
    raises, naming both sizes, where the new samples were silently never drawn before."""
    base = _Growing(10)
    ds = IndexedDataset(base)
    s = InformationWeightedSampler(ds, LossTracker(len(ds)), keep_frac=1.0, uniform_mix=1.0)
    s.set_epoch(0)
    assert sorted(i for b in batch_loader(ds, s, 4) for i in b[2].tolist()) == list(range(10))
    base.items += [(torch.zeros(2), 1)] * 5
    for start_epoch in (lambda: s.set_epoch(1), lambda: list(s), s.indices):
        with pytest.raises(RuntimeError, match=r"from 10 to 15 samples.*new LossTracker"):
            start_epoch()
    del base.items[8:]
    with pytest.raises(RuntimeError, match="from 10 to 8 samples"):
        s.set_epoch(1)
    base.items += [(torch.zeros(2), 1)] * 2  # back to the size it was built for
    s.set_epoch(1)
    assert len(list(s)) == 10


@pytest.mark.parametrize("bad", [0.01, 2.5, float("nan"), float("inf")])
def test_total_epochs_that_is_no_whole_number_is_refused(bad: float) -> None:
    """An ``lr`` in ``total_epochs``' place (h3-optimizer 0.2.0's order) was accepted: 0.01
    epochs made every epoch after the first "consolidation", and nothing was sampled."""
    from torch import nn

    from h3optim import EtaController, create_controlled_h3

    with pytest.raises(ValueError, match="whole number of epochs"):
        PhaseSchedule(bad)
    with pytest.raises(ValueError, match="whole number of epochs"):
        EtaController("balanced", 1.0, bad)
    with pytest.raises(ValueError, match="whole number of epochs"):
        create_controlled_h3(nn.Linear(2, 1).parameters(), [(0, 0)], total_epochs=bad)


@pytest.mark.parametrize("bad", [True, False, "10", None])
def test_total_epochs_of_another_type_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="whole number of epochs"):
        PhaseSchedule(bad)  # type: ignore[arg-type]


def test_total_epochs_may_be_an_integral_float_or_a_numpy_integer() -> None:
    import numpy as np

    for count in (10.0, np.int64(10), np.float64(10.0)):
        s = PhaseSchedule(count)  # type: ignore[arg-type]
        assert s.total_epochs == 10 and type(s.total_epochs) is int
        assert [s.phase(e) for e in (1, 2, 8)] == ["warmup", "thermodynamic", "consolidation"]
    with pytest.raises(ValueError):
        PhaseSchedule(0.0)
