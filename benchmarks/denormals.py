"""What subnormal floats cost a CPU training run, and what flushing them to zero saves.

Adam's second moments decay into the subnormal range (below about 1.2e-38) for weights whose
gradients are tiny or have stopped, and x86 CPUs compute with such values many times slower
(``h3optim.denormals``). This trains the same model from the same seed with and without
flush-to-zero (``h3optim.denormals.set_flush_denormal(True)``, what ``AutoH3``'s default
``flush_denormal=True`` and h3-tune's ``flush_denormal`` technique set),
alternating the two (the order swapped every repeat), and reports the medians of wall time,
the paired ratio, the test accuracy of both and the subnormal share of parameters and Adam
state at the end of the plain run. Workloads:

- ``demo``: the loop ``make demo`` profiles (scikit-learn digits, MLP 64-1024-1024-10,
  batch 32, Adam lr 1e-3, 20 epochs);
- ``mnist1d``: ``benchmarks/learning.py``'s MNIST-1D MLP (batch 64, Adam lr 2e-3, 20 epochs).

The mode is per thread: ``set_flush_denormal`` sets it on every intra-op thread, and
``--torch-only`` measures ``torch.set_flush_denormal(True)`` alone, which reaches the calling
thread only (with ``--threads 2`` the second thread keeps computing subnormals).

    PYTHONPATH=. python benchmarks/denormals.py --repeats 5 [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks._common import machine
from h3optim.denormals import set_flush_denormal, subnormal_share

Workload = Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def demo_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt, yt = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return model, xt[tr], yt[tr], xt[te], yt[te]


def mnist1d_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from benchmarks._data import load
    from benchmarks.learning import make_model

    d = load("mnist1d")
    torch.manual_seed(0)
    return make_model("mlp", d.input_dim), d.x_train, d.y_train, d.x_test, d.y_test


WORKLOADS: dict[str, tuple[Workload, int, float]] = {  # data, batch, lr; 20 epochs each
    "demo": (demo_data, 32, 1e-3),
    "mnist1d": (mnist1d_data, 64, 2e-3),
}


def run(name: str, flush: bool, epochs: int, torch_only: bool = False) -> dict[str, float]:
    make, batch, lr = WORKLOADS[name]
    model, x, y, xt, yt = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    if flush:
        ok = torch.set_flush_denormal(True) if torch_only else set_flush_denormal(True)
        assert ok, "no flush-to-zero on this CPU"
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(batch):
                loss = nn.functional.cross_entropy(model(x.index_select(0, idx)), y[idx])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        set_flush_denormal(False)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {"wall": wall, "cpu": cpu, "acc": 100 * acc, "sub": subnormal_share(opt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument(
        "--torch-only",
        action="store_true",
        help="flush with torch.set_flush_denormal alone (the calling thread only)",
    )
    args = ap.parse_args()
    how = "torch.set_flush_denormal alone" if args.torch_only else "set_flush_denormal"
    print(f"{machine()}; torch {torch.__version__}; {args.repeats} repeats, {args.epochs} epochs")
    print(f"flush-to-zero by {how}")
    print(
        "| workload | threads | wall s, plain | wall s, flush-to-zero | flush / plain (paired) "
        "| CPU s plain → flush | test acc % plain / flush | subnormal share at the end, plain |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads:
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(args.repeats):
                for flush in (False, True) if r % 2 == 0 else (True, False):
                    rows[flush].append(run(name, flush, args.epochs, args.torch_only))
            med = {
                f: {k: statistics.median(x[k] for x in v) for k in v[0]} for f, v in rows.items()
            }
            ratio = statistics.median(
                b["wall"] / a["wall"] for a, b in zip(rows[False], rows[True], strict=True)
            )
            p, f = med[False], med[True]
            print(
                f"| {name} | {threads} | {p['wall']:.2f} | {f['wall']:.2f} | {ratio:.2f}× "
                f"| {p['cpu']:.2f} → {f['cpu']:.2f} | {p['acc']:.2f} / {f['acc']:.2f} "
                f"| {100 * p['sub']:.2f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
