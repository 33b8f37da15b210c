"""Names of the published ``h3-optimizer`` 0.2.0 that need :class:`~h3optim.AutoH3`.

Kept apart from :mod:`h3optim.presets`, which :mod:`h3optim.auto` imports: ``auto_h3`` there
would make the two modules import each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from h3optim.auto import AutoH3


def auto_h3(params: Iterable[Any], dataset: Any, mode: str = "balanced", **kwargs: Any) -> AutoH3:
    """``AutoH3(params, dataset, mode, **kwargs)``: ``h3-optimizer`` 0.2.0's shortcut.

    The keyword arguments are :class:`~h3optim.AutoH3`'s (docs/optim.md lists where they
    differ from 0.2.0's).

    Example:
        >>> auto = auto_h3(model.parameters(), train_set, "balanced", total_epochs=20)  # doctest: +SKIP
    """
    return AutoH3(params, dataset, mode, **kwargs)
