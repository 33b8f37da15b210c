"""What fetching a batch from tensor data costs: advanced indexing against ``index_select``.

``IndexedDataset`` and ``batch_loader`` fetch a batch of a tensor-backed dataset with
:func:`h3optim.tracking.take_rows` (one ``index_select`` per tensor). This times one epoch of
random batches from an MNIST-shaped ``(50 000, 784)`` float32 tensor and its labels both ways,
interleaved, and prints the medians per batch and their ratio::

    PYTHONPATH=. python benchmarks/batch_fetch.py --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks._common import machine
from h3optim.tracking import take_rows


def epoch_us(fetch: Callable[[torch.Tensor], object], batches: tuple[torch.Tensor, ...]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        fetch(b)
    return (time.perf_counter() - t0) / len(batches) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="epochs timed per method")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=784)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, args.dim, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    batches = torch.randperm(args.n, generator=g).split(args.batch)
    methods: dict[str, Callable[[torch.Tensor], object]] = {
        "advanced indexing (x[idx], y[idx])": lambda b: (x[b], y[b]),
        "take_rows (index_select)": lambda b: (take_rows(x, b), take_rows(y, b)),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):  # interleaved, so that drift hits both alike
        for name, fetch in methods.items():
            times[name].append(epoch_us(fetch, batches))
    print(f"{machine()}; torch {torch.__version__}, 1 thread")
    print(f"one epoch of {len(batches)} random batches of {args.batch} rows of {args.dim} float32")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(
            f"  {name}: median {m:.1f} µs a batch (min {min(times[name]):.1f}, max {max(times[name]):.1f})"
        )
    a, b = med.values()
    print(f"  ratio: {b / a:.2f}× (take_rows over advanced indexing)")


if __name__ == "__main__":
    main()
