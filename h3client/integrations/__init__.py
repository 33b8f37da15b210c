"""Framework callbacks over :class:`h3client.H3Profiler`, one module per framework.

Import the one you use (``h3client.integrations.lightning``,
``h3client.integrations.transformers``): nothing here imports a framework until then.
"""

from __future__ import annotations
