"""Launched by test_distributed.py under ``torch.distributed.run`` (gloo, CPU): each rank
tracks the losses of its own shard, draws the next epoch, and trains AutoH3 on a
DDP-wrapped model; it writes what the test compares across ranks to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from h3optim import AutoH3, InformationWeightedSampler, LossTracker


def sampler_epochs(rank: int) -> dict[str, object]:
    n = 1000
    tracker = LossTracker(n)
    sampler = InformationWeightedSampler(n, tracker, seed=3)
    draws, synced = [], []
    for epoch in range(3):
        sampler.set_fractions(*((1.0, 1.0) if epoch == 0 else (0.5, 0.3)))
        sampler.set_epoch(epoch)  # every rank: the trackers agree from here
        synced.append([float(x) for x in tracker._applied().sum(1)])
        mine = sampler.indices()
        # each rank sees only its shard: a loss that depends on the sample and the epoch
        tracker.update(mine, ((mine * 7919) % 1000).float() / 1000 / (epoch + 1))
        draws.append(mine.tolist())
    return {"draws": draws, "synced": synced}


def autoh3_epochs(rank: int) -> dict[str, object]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32)[:1200], torch.tensor(y)[:1200])
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    auto = AutoH3(
        model.parameters(),
        ds,
        total_epochs=8,
        profile=False,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        window_steps=2,  # room for a windowed test, were it on
    )
    if rank == 1:  # as if this rank's own figures had moved its controller elsewhere
        auto.controller.keep_frac = 0.9
    crit = nn.CrossEntropyLoss()
    # each rank evaluates its own part of the held-out data, so their figures differ
    held_out = slice(1200 + 200 * rank, 1400 + 200 * rank)
    test = [(torch.tensor(x[held_out] / 16.0, dtype=torch.float32), torch.tensor(y[held_out]))]
    steps, keeps, drawn = [], [], []
    for _ in range(8):
        loader = auto.get_loader(batch_size=32)
        keeps.append(auto.sampler.keep_frac)
        mine: list[int] = []
        for data, target, idx in loader:
            auto.training_step(model, data, target, crit, idx)
            mine += idx.tolist()
        steps.append(len(loader))
        drawn.append(mine)
        auto.evaluate_epoch(model, test)
    res = auto.finish()
    return {"steps": steps, "keeps": keeps, "drawn": drawn, "report": res["controller_report"]}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"rank": rank, "sampler": sampler_epochs(rank), "auto": autoh3_epochs(rank)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
