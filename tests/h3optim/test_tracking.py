from __future__ import annotations

import math
from pathlib import Path

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
    t.update(torch.arange(5), torch.full((5,), 0.05))  # five fall below 0.05 x 2.0 at once
    assert t.ema[0] > 0.05 * 2.0  # (the EMA still remembers their start)
    assert t.unlearned_fraction() == pytest.approx(0.5)  # 5 of 10 learned
    t.update(torch.tensor([0]), torch.tensor([float("nan")]))  # a NaN leaves it learned
    assert t.unlearned_fraction() == pytest.approx(0.5)
    t.update(torch.tensor([7]), torch.tensor([3.0]))  # rose above its first: likely mislabeled
    assert t.unlearned_fraction() == pytest.approx(0.4)
    assert t.unlearned_fraction(ratio=0.01) == pytest.approx(0.9)  # only the mislabeled one settled
    assert t.unlearned_fraction(ratio=0.3) == pytest.approx(0.4)


def test_unlearned_fraction_of_losses_measured_now() -> None:
    """With indices and fresh losses, the share among those samples by those losses: the
    tracked latest losses (stale after one epoch) do not count, the rules do."""
    t = LossTracker(6)
    t.update(torch.arange(5), torch.full((5,), 2.0))  # sample 5 never seen
    assert t.unlearned_fraction() == 1.0  # by the tracked latest losses
    idx = torch.tensor([0, 1, 2, 3, 5])
    now = torch.tensor([0.05, 0.05, 1.0, 2.5, 0.0])  # learned, learned, not, rose, unseen
    assert t.unlearned_fraction(indices=idx, losses=now) == pytest.approx(2 / 5)
    assert t.last[0] == 2.0  # the tracker's state is left as it was
    with pytest.raises(ValueError, match="5 indices but 4 losses"):
        t.unlearned_fraction(indices=idx, losses=now[:4])


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


def _stream(seed: int, n: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Updates with samples repeated across and within batches, odd sizes, NaN and inf."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        size = int(torch.randint(1, 24, (1,), generator=g))
        idx = torch.randint(0, n, (size,), generator=g)
        losses = torch.rand(size, generator=g) * 4
        losses[torch.rand(size, generator=g) < 0.1] = math.nan
        losses[torch.rand(size, generator=g) < 0.05] = -math.inf
        out.append((idx, losses))
    return out


def test_recorded_updates_apply_as_if_each_applied_at_once() -> None:
    """CPU updates are recorded and applied in bulk at the next read: the state is
    bit-identical to reading it after every update, repeats and non-finite losses included."""
    n = 40
    each, bulk = LossTracker(n, smoothing=0.3), LossTracker(n, smoothing=0.3)
    for k, (idx, losses) in enumerate(_stream(1, n, 300)):
        each.update(idx, losses)
        _ = each.ema  # a read applies what was recorded
        bulk.update(idx, losses)
        if k % 97 == 0:
            assert torch.equal(bulk.counts, each.counts)  # a read midway, then on recording
    assert bulk._pending and not torch.equal(bulk._state, each._state)  # waiting for a read
    assert torch.equal(bulk.ema, each.ema) and torch.equal(bulk._state, each._state)
    assert bulk.nonfinite_count == each.nonfinite_count > 0


def test_a_sample_twice_in_one_update_is_two_sightings_in_order() -> None:
    t = LossTracker(3, smoothing=0.5)
    t.update(torch.tensor([1, 1, 1]), torch.tensor([2.0, 4.0, 8.0]))
    assert t.first.tolist()[1] == 2.0 and t.last.tolist()[1] == 8.0
    assert t.get([1]).item() == 5.5  # 2, then halfway to 4 (3), then halfway to 8
    assert t.counts.tolist() == [0, 3, 0]


def test_pending_updates_are_bounded() -> None:
    t = LossTracker(100)
    t.max_pending = 50
    for i in range(40):
        t.update(torch.arange(i % 10 * 10, i % 10 * 10 + 10), torch.full((10,), float(i)))
        assert t._pending_samples < 50
    assert t.counts.sum().item() == 400


def test_losses_modified_in_place_before_they_are_applied_are_left_out() -> None:
    t = LossTracker(4)
    kept = torch.tensor([1.0, 2.0])
    t.update(torch.tensor([0, 1]), kept)
    changed = torch.tensor([5.0, 6.0])
    t.update(torch.tensor([2, 3]), changed)
    changed.mul_(100)  # after update(), before the tracker read it
    with pytest.warns(RuntimeWarning, match="1 update.*modified in place"):
        assert t.seen.tolist() == [True, True, False, False]
    assert t.ema.tolist() == [1.0, 2.0, 0.0, 0.0]
    grad = torch.tensor([3.0, 4.0], requires_grad=True) * 1
    t.update(torch.tensor([2, 3]), grad)  # detached inside; the version is shared
    grad.detach().zero_()
    with pytest.warns(RuntimeWarning):
        assert t.counts.tolist() == [1, 1, 0, 0]


def test_an_index_out_of_range_raises_at_the_read_and_the_rest_is_applied() -> None:
    t = LossTracker(4)
    t.update(torch.tensor([0]), torch.tensor([1.0]))
    t.update(torch.tensor([2, 9]), torch.tensor([1.0, 2.0]))
    t.update(torch.tensor([3]), torch.tensor([3.0]))
    with pytest.raises(IndexError, match="out of range for 4 samples.*update 2 of the 3"):
        _ = t.ema
    assert t.ema.tolist() == [1.0, 0.0, 0.0, 3.0]
    t.update(torch.tensor([-1]), torch.tensor([1.0]))
    with pytest.raises(IndexError):
        t.state_dict()


def test_indices_from_a_reused_numpy_buffer_and_inference_tensors() -> None:
    np = pytest.importorskip("numpy")
    t = LossTracker(6)
    buf = np.array([0, 1])
    t.update(buf, torch.tensor([1.0, 2.0]))
    buf[:] = [4, 5]  # numpy writes bypass torch's version counter: update() copied them
    t.update(buf, torch.tensor([3.0, 4.0]))
    assert t.ema.tolist() == [1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
    with torch.inference_mode():
        idx, losses = torch.tensor([2]), torch.tensor([7.0])
    t.update(idx, losses)  # no version counter: applied at once
    assert not t._pending and t.ema.tolist()[2] == 7.0


def test_updates_under_inference_mode_apply_as_recorded_ones() -> None:
    """Inference tensors are applied at once, with what a recorded update gives: a sample
    twice is two sightings in order (before: one, the last value), an index out of range an
    IndexError (before: a raw RuntimeError)."""
    stream = _stream(2, 20, 60)
    normal, inference = LossTracker(20, smoothing=0.3), LossTracker(20, smoothing=0.3)
    for idx, losses in stream:
        normal.update(idx, losses)
    with torch.inference_mode():
        for idx, losses in stream:
            inference.update(idx.clone(), losses.clone())  # inference tensors
            assert not inference._pending
    assert torch.equal(inference._state, normal._applied())  # bit-identical
    assert inference.nonfinite_count == normal.nonfinite_count
    t = LossTracker(3, smoothing=0.5)
    with torch.inference_mode():
        t.update(torch.tensor([1, 1, 1]), torch.tensor([2.0, 4.0, 8.0]))
        assert t.counts.tolist() == [0, 3, 0] and t.get([1]).item() == 5.5
        for bad in ([3], [-1]):
            with pytest.raises(IndexError, match="out of range for 3 samples"):
                t.update(torch.tensor(bad), torch.tensor([1.0]))
    with torch.inference_mode():
        idx, losses = torch.tensor([0, 5]), torch.tensor([1.0, 2.0])
    t.update(torch.tensor([2]), torch.tensor([6.0]))  # recorded, then an inference update
    with pytest.raises(IndexError):
        t.update(idx, losses)  # outside the mode, inference tensors all the same
    assert t.counts.tolist() == [0, 3, 1]  # the recorded update applied, in order


@pytest.mark.parametrize(
    "indices",
    [
        torch.tensor([True, False, True, False]),
        torch.tensor([0.0, 1.0, 2.0, 3.0]),
        torch.tensor([0.9, 2.7, 1.0, 3.0], dtype=torch.float64),
        [0.5, 1.0, 2.0, 3.0],
        [True, False, True, False],
    ],
)
def test_indices_that_are_no_integers_are_refused(indices: object) -> None:
    """Before: a bool mask was cast to samples 0 and 1, float indices were truncated."""
    t = LossTracker(4)
    with pytest.raises(TypeError, match="indices must be integers"):
        t.update(indices, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with torch.inference_mode(), pytest.raises(TypeError, match="indices must be integers"):
        t.update(indices, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert not t.seen.any()


def test_integer_indices_of_any_kind_are_taken() -> None:
    np = pytest.importorskip("numpy")
    t = LossTracker(8)
    losses = torch.tensor([1.0, 2.0])
    for indices in (
        torch.tensor([0, 1]),
        torch.tensor([2, 3], dtype=torch.int32),
        torch.tensor([4, 5], dtype=torch.uint8),
        [6, 7],
        np.array([0, 1], dtype=np.int32),
        np.array([2, 3]),
    ):
        t.update(indices, losses)
    t.update([], torch.tensor([]))  # an empty list reads as float32: nothing to refuse
    assert t.counts.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]


def test_a_pickled_or_copied_tracker_carries_its_recorded_updates() -> None:
    import copy
    import io

    t = LossTracker(5)
    losses = torch.tensor([1.0, 2.0])
    losses.add_(1.0)  # a version counter past 0, which a fresh unpickled tensor would not have
    t.update(torch.tensor([0, 4]), losses)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.ema.tolist() == [2.0, 0.0, 0.0, 0.0, 3.0]
    t.update(torch.tensor([1]), torch.tensor([5.0]))
    c = copy.copy(t)
    c.update(torch.tensor([2]), torch.tensor([7.0]))
    assert t._pending == [] and c._pending  # its own list: recorded in the copy only
    _ = c.ema  # a shallow copy shares the state tensor, as before
    assert t.counts.tolist() == [1, 1, 1, 0, 1]
    d = copy.deepcopy(t)
    d.update(torch.tensor([3]), torch.tensor([9.0]))
    assert t.counts.tolist() == [1, 1, 1, 0, 1] and d.counts.tolist() == [1, 1, 1, 1, 1]


def test_nonfinite_sightings_are_counted_per_sample() -> None:
    """A sample whose losses were all non-finite is not seen, but it was sighted: the
    tracker counts its non-finite losses (the sampler leaves it to the uniform share)."""
    t = LossTracker(4)
    t.update(torch.tensor([0, 1, 1, 2]), torch.tensor([math.nan, math.inf, 2.0, -math.inf]))
    t.update(torch.tensor([2, 0]), torch.tensor([math.nan, 1.0]))
    assert t.nonfinite_counts.tolist() == [1, 1, 2, 0]
    assert t.counts.tolist() == [1, 1, 0, 0] and t.seen.tolist() == [True, True, False, False]
    assert t.nonfinite_count == 4 and t.ema.tolist() == [1.0, 2.0, 0.0, 0.0]
    u = LossTracker(4)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.nonfinite_counts, t.nonfinite_counts) and torch.equal(u.ema, t.ema)


def test_a_state_saved_before_per_sample_nonfinite_counts_loads(tmp_path: Path) -> None:
    """The keys a tracker's state_dict had before the per-sample non-finite counts: it
    loads (through torch.load's weights_only unpickler too), with no sample counted."""
    old = {
        "num_samples": 3,
        "smoothing": 0.5,
        "ema": torch.tensor([1.0, 0.0, 2.0]),
        "seen": torch.tensor([True, False, True]),
        "counts": torch.tensor([2, 0, 1], dtype=torch.int32),
        "first": torch.tensor([1.5, 0.0, 2.0]),
        "last": torch.tensor([0.5, 0.0, 2.0]),
        "nonfinite": torch.tensor(4),
    }
    torch.save(old, tmp_path / "tracker.pt")
    t = LossTracker(3)
    t.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    assert t.nonfinite_counts.tolist() == [0, 0, 0] and t.nonfinite_count == 4
    assert t.ema.tolist() == [1.0, 0.0, 2.0] and t.counts.tolist() == [2, 0, 1]
    t.update(torch.tensor([1, 2]), torch.tensor([math.nan, 4.0]))
    assert t.nonfinite_counts.tolist() == [0, 1, 0] and t.ema.tolist() == [1.0, 0.0, 3.0]


def test_h3_optimizer_020_third_argument_is_accepted_and_said_to_have_no_effect() -> None:
    """h3-optimizer 0.2.0's ``LossTracker(n, smoothing, initial_loss)``: the third
    positional was this tracker's ``device`` (``torch.device(1.0)``: a TypeError)."""
    with pytest.warns(UserWarning, match="initial_loss=1.0 has no effect"):
        t = LossTracker(4, 0.1, 1.0)
    t.update(torch.tensor([1]), torch.tensor([2.0]))
    assert t.seen.tolist() == [False, True, False, False] and t.ema[1].item() == 2.0
    with pytest.raises(ValueError, match="initial_loss"):
        LossTracker(4, 0.1, 0.0)
    assert LossTracker(4, device="cpu").ema.device == torch.device("cpu")
