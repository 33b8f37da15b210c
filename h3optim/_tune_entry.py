"""The ``h3-tune`` console script: ``h3optim.tune.cli``, or one line saying what is missing.

Every install has the script (``pip install h3`` with no extras too), but the tuner needs
PyTorch. A script pointed at ``h3optim.tune.cli`` itself would end in a traceback there,
whatever its arguments; this entry imports nothing that needs torch (``h3optim``'s own
``__init__`` loads its names on first use), says in one line that PyTorch is missing and how
to get it, and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``h3-tune``; without PyTorch print why not on stderr and return 1."""
    try:
        from h3optim.tune.cli import main as tune_main
    except ImportError as exc:
        if exc.name != "torch":  # not the missing extra: a real error, shown as one
            raise
        from h3optim import NO_TORCH

        print(f"h3-tune: {NO_TORCH}", file=sys.stderr)
        return 1
    return tune_main(argv)
