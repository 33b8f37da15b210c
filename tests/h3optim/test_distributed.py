"""The sampler and AutoH3 under torch.distributed: two gloo ranks on this machine.

Each rank tracks the losses of its own shard. Without a common tracker the ranks would rank
samples differently, and their shards of a loss-driven epoch would overlap and leave samples
out; without one controller they could draw epochs of different lengths, and DDP would hang.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import torchrun

SCRIPT = Path(__file__).with_name("ddp_sampling.py")


def test_ranks_share_one_tracker_and_one_controller(tmp_path: Path) -> None:
    r0, r1 = torchrun(2, SCRIPT, out=tmp_path, timeout_s=300)

    # the sampler: after set_epoch the trackers agree, and the shards split each epoch
    assert r0["sampler"]["synced"] == r1["sampler"]["synced"]
    for epoch, (a, b) in enumerate(
        zip(r0["sampler"]["draws"], r1["sampler"]["draws"], strict=True)
    ):
        kept = 1000 if epoch == 0 else 500
        assert len(a) == len(b) == kept // 2
        assert not set(a) & set(b) and len(set(a) | set(b)) == kept

    # AutoH3: the same epochs on both ranks (rank 0's controller decides), split between them
    a, b = r0["auto"], r1["auto"]
    assert a["steps"] == b["steps"] and a["keeps"] == b["keeps"]
    assert min(a["keeps"]) < 1.0  # sampled epochs, not only full ones
    for x, y in zip(a["drawn"], b["drawn"], strict=True):
        assert len(set(x) & set(y)) <= 1  # at most the one padding sample DistributedSampler adds
    assert a["report"] == b["report"]
    assert "windowed A/B: off under torch.distributed (2 ranks)" in a["report"]
