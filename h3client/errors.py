"""Errors raised by explicit client calls (``log_batch`` never raises).

H3ClientError
├── H3ConnectionError      no daemon answers at the URL
└── H3HTTPStatusError      the daemon answered with an error (carries its code)
    └── H3RunNotFound      404 run_not_found
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx


class H3ClientError(Exception):
    """Root of every error h3client raises on purpose."""


class H3ConnectionError(H3ClientError):
    """No daemon answered (refused, timed out, DNS)."""


class H3HTTPStatusError(H3ClientError):
    """The daemon answered 4xx/5xx. ``code`` is its stable error code."""

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request,
        response: httpx.Response,
        code: str = "http_error",
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.response = response
        self.code = code
        self.details = details

    @property
    def status_code(self) -> int:
        return self.response.status_code


class H3RunNotFound(H3HTTPStatusError):
    """The daemon has no run with that id."""
