"""Downsample a series for plotting: Largest-Triangle-Three-Buckets keeps its shape (its
spikes too); bucket means keep its level."""

from __future__ import annotations

from collections.abc import Sequence


def lttb(points: Sequence[tuple[float, float]], n_out: int) -> list[tuple[float, float]]:
    """Return at most ``n_out`` of ``points`` (sorted by x); first and last are kept."""
    n = len(points)
    if n_out >= n or n_out < 3:
        return list(points) if n_out >= n else list(points[:: max(1, n // max(n_out, 1))])[:n_out]
    out = [points[0]]
    every = (n - 2) / (n_out - 2)
    a = 0
    for i in range(n_out - 2):
        lo = int(i * every) + 1
        hi = int((i + 1) * every) + 1
        nxt_lo, nxt_hi = hi, min(int((i + 2) * every) + 1, n)
        nxt = points[nxt_lo:nxt_hi] or [points[-1]]
        avg_x = sum(p[0] for p in nxt) / len(nxt)
        avg_y = sum(p[1] for p in nxt) / len(nxt)
        ax, ay = points[a]
        best, best_area = lo, -1.0
        for j in range(lo, min(hi, n - 1)):
            bx, by = points[j]
            area = abs((ax - avg_x) * (by - ay) - (ax - bx) * (avg_y - ay))
            if area > best_area:
                best, best_area = j, area
        out.append(points[best])
        a = best
    out.append(points[-1])
    return out


def bucket_means(
    points: Sequence[tuple[float, float, float]], n_out: int
) -> tuple[list[tuple[float, float]], int]:
    """``points`` (x, y, weight), sorted by x, as at most ``n_out`` points: each the mean of
    ``k`` consecutive ones (the last of what is left), x their mean, y their weighted mean.
    Returns (the points, ``k``): ``k`` is the smallest bucket size that ``n_out`` allows."""
    n = len(points)
    k = max(1, -(-n // max(n_out, 1)))
    out = []
    for i in range(0, n, k):
        bucket = points[i : i + k]
        w = sum(p[2] for p in bucket)
        if w > 0:  # a bucket of weightless points has no mean: left out
            x = sum(p[0] for p in bucket) / len(bucket)
            out.append((x, sum(p[1] * p[2] for p in bucket) / w))
    return out, k
