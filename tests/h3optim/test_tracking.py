from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from h3optim import IndexedDataset, LossTracker
from h3optim.tracking import take_rows


def test_indexed_dataset_tuple_and_dict_items() -> None:
    ds = IndexedDataset(TensorDataset(torch.arange(5.0), torch.arange(5) * 10))
    assert len(ds) == 5 and ds[3] == (torch.tensor(3.0), torch.tensor(30), 3)
    d = IndexedDataset([{"x": 1, "label": 7}, {"x": 2, "label": 8}])
    assert d[1] == ({"x": 2}, 8, 1)
    with pytest.raises(TypeError):
        IndexedDataset([{"x": 1}])[0]
    with pytest.raises(TypeError):
        IndexedDataset(5)


def test_first_sighting_assigns_then_ema() -> None:
    t = LossTracker(4, smoothing=0.5)
    t.update([0, 1], torch.tensor([2.0, 4.0]))
    assert t.get([0, 1]).tolist() == [2.0, 4.0]
    t.update([0], torch.tensor([4.0]))
    assert t.get([0]).item() == 3.0
    assert t.unseen().tolist() == [2, 3]
    assert t.summary()["seen_frac"] == 0.5


def test_nonfinite_losses_are_ignored_and_counted() -> None:
    t = LossTracker(3)
    t.update([0, 1, 2], torch.tensor([1.0, math.nan, math.inf]))
    assert t.nonfinite_count == 2
    assert t.seen.tolist() == [True, False, False]
    assert torch.isfinite(t.ema).all()
    with pytest.raises(ValueError):
        t.update([0, 1], torch.tensor([1.0]))


def test_state_dict_round_trip() -> None:
    t = LossTracker(5, smoothing=0.2)
    t.update([1, 3], torch.tensor([0.5, 1.5]))
    u = LossTracker(5)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.ema, t.ema) and torch.equal(u.seen, t.seen) and u.smoothing == 0.2
    with pytest.raises(ValueError):
        LossTracker(6).load_state_dict(t.state_dict())


def test_first_loss_is_kept_and_old_states_load() -> None:
    t = LossTracker(4)
    t.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    t.update(torch.tensor([0, 2]), torch.tensor([3.0, 0.5]))
    assert t.first.tolist() == [1.0, 2.0, 0.5, 0.0]
    old = t.state_dict()
    del old["first"]  # a state saved before ``first`` existed
    u = LossTracker(4)
    u.load_state_dict(old)
    assert torch.equal(u.first, t.ema)


def test_rose_compares_the_ema_with_the_first_loss() -> None:
    t = LossTracker(4, smoothing=1.0)
    t.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 1.0]))
    t.update(torch.tensor([0, 1, 2]), torch.tensor([0.5, 1.2, 1.8]))
    assert t.rose().tolist() == [False, True, True, False]  # never seen: False
    assert t.rose(margin=0.5).tolist() == [False, False, True, False]
    assert t.rose(factor=1.5).tolist() == [False, False, True, False]
    assert t.rose(factor=2.0).tolist() == [False, False, False, False]


def test_unlearned_fraction_against_the_mean_first_loss() -> None:
    t = LossTracker(10)
    assert t.unlearned_fraction() == 1.0  # nothing seen
    t.update(torch.arange(8), torch.full((8,), 2.0))  # first sightings: mean first loss 2.0
    assert t.unlearned_fraction() == 1.0  # seen, not learned; 2 never seen
    t.update(torch.arange(5), torch.full((5,), 0.1))  # five fall below 0.3 x 2.0 at once
    assert t.ema[0] > 0.3 * 2.0  # (the EMA still remembers their start)
    assert t.unlearned_fraction() == pytest.approx(0.5)  # 5 of 10 learned
    t.update(torch.tensor([0]), torch.tensor([float("nan")]))  # a NaN leaves it learned
    assert t.unlearned_fraction() == pytest.approx(0.5)
    t.update(torch.tensor([7]), torch.tensor([3.0]))  # rose above its first: likely mislabeled
    assert t.unlearned_fraction() == pytest.approx(0.4)
    assert t.unlearned_fraction(ratio=0.01) == pytest.approx(0.9)  # only the mislabeled one settled


def test_update_matches_the_per_sample_rule() -> None:
    """The fused update against the rule written out sample by sample: first sighting
    assigns, later ones blend with ``smoothing``, non-finite losses change nothing."""
    n, s = 50, 0.2
    t = LossTracker(n, smoothing=s)
    ema, first, last, counts = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
    g = torch.Generator().manual_seed(0)
    bad = 0
    for _ in range(200):
        idx = torch.randperm(n, generator=g)[:16]
        losses = torch.rand(16, generator=g) * 3
        losses[torch.rand(16, generator=g) < 0.1] = math.nan
        losses[torch.rand(16, generator=g) < 0.05] = math.inf
        t.update(idx, losses)
        for i, v in zip(idx.tolist(), losses.tolist(), strict=True):
            if not math.isfinite(v):
                bad += 1
                continue
            v32 = float(torch.tensor(v))
            ema[i] = float(torch.tensor(ema[i]).lerp(torch.tensor(v32), s)) if counts[i] else v32
            first[i] = first[i] if counts[i] else v32
            last[i] = v32
            counts[i] += 1
    assert t.ema.tolist() == ema
    assert t.first.tolist() == first and t.last.tolist() == last
    assert t.counts.tolist() == counts and t.seen.tolist() == [c > 0 for c in counts]
    assert t.nonfinite_count == bad
    u = LossTracker(n)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u._state, t._state)


def test_state_is_float32_whatever_the_default_dtype() -> None:
    """A script that sets float64 as torch's default dtype still tracks (float32 state)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = LossTracker(4)
        t.update(torch.tensor([1, 2]), torch.tensor([0.5, 0.75]))
        t.update(torch.tensor([1, 3]), torch.tensor([1.5, math.nan]))
    finally:
        torch.set_default_dtype(previous)
    assert t.ema.dtype == torch.float32
    assert t.ema.tolist() == [0.0, 0.6000000238418579, 0.75, 0.0]
    assert t.counts.tolist() == [0, 2, 1, 0] and t.nonfinite_count == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_take_rows_is_advanced_indexing(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, generator=g)
    if dtype is torch.bool:
        index = torch.rand(50, generator=g) > 0.5
    else:
        index = torch.randint(0, 50, (17,), generator=g).to(dtype)
    assert torch.equal(take_rows(x, index), x[index])
    assert torch.equal(take_rows(x[:, 0, 0], index), x[:, 0, 0][index])


def test_batch_fetch_matches_per_item_fetch() -> None:
    x, y = torch.randn(30, 5), torch.randint(0, 10, (30,))
    ds = IndexedDataset(TensorDataset(x, y))
    idx = torch.tensor([4, 0, 29, 4])
    bx, by, bi = ds[idx]
    items = [ds[int(i)] for i in idx]
    assert torch.equal(bx, torch.stack([it[0] for it in items]))
    assert torch.equal(by, torch.stack([it[1] for it in items]))
    assert bi is idx


def test_update_follows_a_smoothing_changed_by_a_loaded_state() -> None:
    t = LossTracker(3, smoothing=0.5)
    t.update([0], torch.tensor([2.0]))
    t.update([0], torch.tensor([4.0]))
    assert t.get([0]).item() == 3.0  # 2 moved halfway to 4
    state = t.state_dict()
    state["smoothing"] = 0.25
    u = LossTracker(3, smoothing=0.5)
    u.update([1], torch.tensor([1.0]))  # its columns cached at smoothing 0.5
    u.load_state_dict(state)
    u.update([0], torch.tensor([7.0]))
    assert u.get([0]).item() == 4.0  # 3 moved a quarter of the way to 7
    assert u.first.tolist()[0] == 2.0 and u.last.tolist()[0] == 7.0
    assert u.counts.tolist() == [3, 0, 0]
