"""Ctrl-C delivered where a session can stop cleanly.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT
arrives; inside a weakref callback or a ``__del__`` (torch runs many) it is printed and
*ignored*, and the session would run to its end. ``h3-tune`` therefore turns SIGINT into a
request that the training loop honours at its next step and the runner between trials. A
second Ctrl-C interrupts at once, as Python's default would.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_requested = threading.Event()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C is pending (a cheap flag read)."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """While inside, the first SIGINT only sets the flag that :func:`check` raises on."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if _requested.is_set():  # the second Ctrl-C: now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
