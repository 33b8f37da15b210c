"""The demo's training run: a real MLP on scikit-learn's digits, streamed to h3d.

Run by ``h3d demo`` as ``python -m h3client._demo``; needs torch and scikit-learn.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import httpx


def _token() -> str:
    tok = os.environ.get("H3D_TOKEN")
    if tok:
        return tok
    return (Path(os.environ["H3D_DATA_DIR"]) / "token").read_text().strip()


def main() -> None:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

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
    http = httpx.Client(
        base_url=os.environ["H3D_URL"],
        headers={"Authorization": f"Bearer {_token()}"},
        timeout=30.0,
    )
    run = http.post(
        "/v1/runs",
        json={
            "name": "demo-digits-mlp",
            "config": {"model": "mlp-64-1024-1024-10", "optimizer": "adam", "lr": 1e-3},
            "tags": ["demo"],
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "n_train": len(tr),
        },
    ).json()
    seq = 0
    for epoch in range(args.epochs):
        batches = []
        order = tr[torch.randperm(len(tr))]
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            batches.append(
                {
                    "seq": seq,
                    "t": time.time(),
                    "loss": loss.item(),
                    "n": len(idx),
                    "epoch": epoch,
                    "step": seq,
                    "losses": losses.detach().tolist(),
                    "indices": idx.tolist(),
                }
            )
            seq += 1
        with torch.no_grad():
            acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
            val = nn.functional.cross_entropy(model(x[te]), y[te]).item()
        http.post(f"/v1/runs/{run['id']}/batches", json={"batches": batches}).raise_for_status()
        http.post(
            f"/v1/runs/{run['id']}/epochs",
            json={"epochs": [{"epoch": epoch, "t": time.time(), "accuracy": acc, "val_loss": val}]},
        ).raise_for_status()
        print(f"epoch {epoch + 1:>3}/{args.epochs}  loss {batches[-1]['loss']:.4f}  acc {acc:.3f}")
    http.patch(f"/v1/runs/{run['id']}", json={"status": "finished"}).raise_for_status()
    print(f"RUN_ID={run['id']}")


if __name__ == "__main__":
    main()
