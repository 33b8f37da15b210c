"""Subnormal floats on the CPU: how much of a model's state is subnormal, and flush-to-zero.

A float below the smallest normal number (about 1.2e-38 in float32) but not zero is
*subnormal*. x86 CPUs compute with subnormal operands or results at a fraction of their speed
(a microcode assist per operation), and Adam-style optimizers put them there: the second-moment
estimate of a weight whose gradient is tiny or has stopped decays by ``beta2`` every step, down
through the subnormal range, and every later step reads it. A long or small CPU run can then
spend more time on those values than on the rest of the arithmetic
(``benchmarks/denormals.py``). Flushing them to zero (``torch.set_flush_denormal(True)``, the
CPU's FTZ and DAZ modes, which TensorFlow and XLA's CPU back end turn on by default) removes
the cost; what it changes is below 1.2e-38, far under Adam's ``eps``.

The mode is per thread: ``torch.set_flush_denormal`` sets it for the calling thread only, so
with more than one intra-op thread the work PyTorch hands to its other threads would keep
computing subnormals (and a parallel region waits for its slowest thread).
:func:`set_flush_denormal` therefore also runs ``torch.set_flush_denormal`` on each thread of
the OpenMP team the calling thread's parallel regions use (the runtime PyTorch loaded: libgomp
on Linux builds, libomp or libiomp5 elsewhere). GPU kernels are not affected either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

_OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

# (integer view, exponent mask, mantissa mask) per floating-point dtype: a subnormal has
# all exponent bits 0 and a mantissa that is not (read from the bits, so that the count
# does not depend on the thread's flush-to-zero mode)
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF),
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    torch.float16: (torch.int16, 0x7C00, 0x03FF),
    torch.bfloat16: (torch.int16, 0x7F80, 0x007F),
}


def flush_denormal_enabled() -> bool:
    """Whether the calling thread computes subnormal floats as zero on the CPU."""
    return float(torch.tensor(1e-39) * 2.0) == 0.0


def _openmp_candidates(paths: Iterable[str], torch_lib: Path) -> list[str]:
    """The OpenMP runtimes among loaded library ``paths``, PyTorch's own copy first (a pip
    wheel ships ``torch/lib/libgomp-<hash>.so.1``; another copy may be loaded beside it)."""
    found = []
    for path in dict.fromkeys(paths):
        name = Path(path).name
        if any(name.startswith((n + ".", n + "-")) for n in _OPENMP_NAMES):
            found.append(path)
    return sorted(found, key=lambda p: Path(p).parent != torch_lib)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime PyTorch's intra-op threads run on, or None (another backend, or
    none found). Looked up once: what torch loaded at its import does not change."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None  # a build on PyTorch's native thread pool: its threads are not reachable
    torch_lib = Path(torch.__file__).parent / "lib"
    if sys.platform.startswith("linux"):
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
        paths = [line.split()[-1] for line in maps.splitlines() if "/" in line]
    else:  # macOS and others: the copy shipped in torch/lib, which torch itself loads
        paths = [str(p) for p in torch_lib.glob("lib*omp*")]
    for path in _openmp_candidates(paths, torch_lib):
        try:
            lib = ctypes.CDLL(path)
            lib.GOMP_parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def set_flush_denormal(on: bool) -> int:
    """Set flush-to-zero ``on`` or off for the calling thread and every thread of its OpenMP
    team (the threads ``torch.get_num_threads()`` counts).

    Returns how many threads were set: 0 when the CPU has no such mode, 1 when only the
    calling thread could be (PyTorch not on OpenMP, or its runtime not found). Threads
    PyTorch starts later, after a larger ``torch.set_num_threads``, start without it: call
    again after changing the count. While the interpreter shuts down (a block of
    :func:`flushing_denormals` closed by the garbage collector at exit) only the calling
    thread is set: the team's threads could no longer take the GIL to run the setter, and
    the call would wait for them forever.
    """
    if not torch.set_flush_denormal(on):
        return 0
    threads = torch.get_num_threads() > 1 and not sys.is_finalizing()
    runtime = _openmp_runtime() if threads else None
    if runtime is None:
        return 1
    ids: set[int] = set()

    def on_each_thread(_data: Any) -> None:  # ctypes takes the GIL around it
        torch.set_flush_denormal(on)
        ids.add(threading.get_native_id())

    callback = _CALLBACK(on_each_thread)
    runtime.GOMP_parallel(callback, None, torch.get_num_threads(), 0)  # GIL released meanwhile
    return max(1, len(ids))


@contextlib.contextmanager
def flushing_denormals(on: bool = True) -> Iterator[int]:
    """:func:`set_flush_denormal` (``on``) for a block, then the calling thread's mode as the
    block found it, however the block ends. Yields how many threads were set (0: this CPU
    has no such mode, and nothing is restored)."""
    before = flush_denormal_enabled()
    n = set_flush_denormal(on)
    try:
        yield n
    finally:
        if n:
            set_flush_denormal(before)


def subnormal_count(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(subnormal elements, floating-point elements) over ``tensors``; others are skipped."""
    sub = total = 0
    for t in tensors:
        bits = _BITS.get(t.dtype)
        if bits is None or t.numel() == 0:
            continue
        view, exp_mask, man_mask = bits
        raw = t.detach().contiguous().view(view)
        sub += int(((raw & exp_mask) == 0).logical_and_((raw & man_mask) != 0).sum())
        total += t.numel()
    return sub, total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The parameters an optimizer updates and the tensors of its state (Adam's moments)."""
    for group in optimizer.param_groups:
        yield from group["params"]
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield value


def subnormal_share(source: torch.optim.Optimizer | Iterable[torch.Tensor]) -> float:
    """Share of the floating-point elements that are subnormal: of an optimizer's parameters
    and state, or of any tensors. 0.0 when there are none."""
    tensors: Iterable[Any] = (
        optimizer_tensors(source) if isinstance(source, torch.optim.Optimizer) else source
    )
    sub, total = subnormal_count(tensors)
    return sub / total if total else 0.0
