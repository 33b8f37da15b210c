"""The demo's training run: a real MLP on scikit-learn's digits, profiled by H3Profiler.

Run by ``h3d demo`` as ``python -m h3client._demo`` (it needs torch and scikit-learn); it
finds the daemon through ``H3D_URL``/``H3D_DATA_DIR`` like any user code would.
"""

from __future__ import annotations

import argparse


def main() -> None:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from h3client import H3Profiler

    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    model = nn.Sequential(
        nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = {"model": "mlp-64-1024-1024-10", "optimizer": "adam", "lr": 1e-3, "batch_size": 32}
    with H3Profiler("demo-digits-mlp", config=config, tags=["demo"], n_train=len(tr)) as prof:
        for epoch in range(args.epochs):
            order = tr[torch.randperm(len(tr))]
            loss_sum = torch.zeros(())  # the epoch's mean training loss, summed on the device
            for i in range(0, len(order), 32):
                idx = order[i : i + 32]
                losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
                loss = losses.mean()
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                prof.log_batch(loss, losses=losses, indices=idx, epoch=epoch)
                loss_sum += losses.detach().sum()
            train_loss = loss_sum.item() / len(order)
            with torch.no_grad():
                out = model(x[te])
                acc = (out.argmax(1) == y[te]).float().mean().item()
                val = nn.functional.cross_entropy(out, y[te]).item()
            prof.log_epoch(epoch, accuracy=acc, loss=train_loss, val_loss=val)
            print(
                f"epoch {epoch + 1:>3}/{args.epochs}  train loss {train_loss:.4f} (epoch mean)  "
                f"val loss {val:.4f}  acc {acc:.3f}",
                flush=True,
            )
    print(f"RUN_ID={prof.run_id}")


if __name__ == "__main__":
    main()
