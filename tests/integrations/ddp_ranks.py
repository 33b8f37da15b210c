"""One rank of a small DDP run (gloo, CPU), launched by the ranks test with torchrun.

argv: daemon URL, daemon data dir, output dir. Writes <output dir>/rank<r>.json with the
run id the profiler joined and the losses this rank trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from h3client import H3Profiler

EPOCHS, BATCH = 2, 40


def main() -> None:
    url, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x[:800] / 16.0, dtype=torch.float32), torch.tensor(y[:800]))
    sampler = DistributedSampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    prof = H3Profiler("ddp-digits", url=url, data_dir=data_dir, n_train=800)  # rank from env
    losses: list[float] = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            prof.log_batch(loss, epoch=epoch)
            losses.append(loss.item())
        if rank == 0:
            prof.log_epoch(epoch, loss=sum(losses[-5:]) / 5)
    res = prof.stop()
    out.joinpath(f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "run_id": prof.run_id, "losses": losses, "results": res})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
