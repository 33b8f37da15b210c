"""Each h3optim test starts with the thread's flush-to-zero mode as the session found it
(an AutoH3 left unfinished keeps it on: see ``AutoH3(flush_denormal=)``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from h3optim.denormals import flush_denormal_enabled, set_flush_denormal

_SESSION_MODE = flush_denormal_enabled()


@pytest.fixture(autouse=True)
def _flush_denormal_restored() -> Iterator[None]:
    yield
    set_flush_denormal(_SESSION_MODE)
