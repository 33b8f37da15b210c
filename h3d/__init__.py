"""h3d: the H3 daemon. Samples device power, stores runs, serves energy and η over REST."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
