"""The OpenAPI document as a generated client needs it: auth, every error the daemon sends.

FastAPI documents only what its routes declare: no bearer scheme, a 422 shaped
``{"detail"}`` (the daemon sends ``{"error"}``), and none of the 401/404/409/413/415/503
answers that middleware and the error handler produce. This fills those in once, from the
same rules the middleware applies, so the document and the behaviour cannot drift apart
(the schemathesis run in tests/h3d/test_schemathesis.py checks every response against it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from h3d.middleware import is_protected

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable code."},
                "message": {"type": "string"},
                "details": {"description": "Code-specific details, if any."},
            },
        }
    },
}

_WHY = {
    "400": "Bad request: a corrupt gzip body, or a Host header naming no address of this "
    "daemon (DNS-rebinding guard).",
    "401": "Missing or wrong bearer token.",
    "404": "No such run (or path).",
    "409": "The run is finished or failed (it takes no more data), the id exists, or a run "
    "reference is ambiguous.",
    "413": "The body is over the size limit (after decompression), or too many batches or epochs.",
    "415": "A Content-Encoding other than gzip or identity.",
    "422": "The request does not validate; ``details`` lists each problem.",
    "503": "The store is unavailable (locked beyond the busy timeout, disk full, down).",
}


def _error(code: str) -> dict[str, Any]:
    return {
        "description": _WHY[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the completed document (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        comps = spec.setdefault("components", {})
        comps.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            comps["schemas"].pop(name, None)
        comps["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "The token in <data dir>/token (created on first start, 0600).",
            }
        }
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                codes = {"400", "503"}
                if is_protected(path):
                    op["security"] = [{"bearerAuth": []}]
                    codes.add("401")
                if "{run_id}" in path or path.endswith("/resolve") or path.endswith("/compare"):
                    codes |= {"404", "409"}
                if method in ("post", "patch", "put"):
                    codes |= {"409", "413", "415", "422"}
                if op.get("parameters"):
                    codes.add("422")
                responses = op.setdefault("responses", {})
                for code in sorted(codes):
                    responses[code] = _error(code)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
