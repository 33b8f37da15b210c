"""The wire format is the daemon's: a checked-in OpenAPI snapshot keeps clients from drifting.

HOW TO UPDATE after an intended API change:
    H3D_WRITE_OPENAPI=1 python -m pytest tests/h3d/test_openapi.py
then review the diff of tests/h3d/openapi.json and update h3client if the wire changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from h3d.app import create_app
from h3d.config import Settings

SNAPSHOT = Path(__file__).with_name("openapi.json")


def contract(spec: dict[str, Any]) -> dict[str, Any]:
    """What clients depend on, independent of the FastAPI/pydantic version that renders it:
    every path and method with its parameters and response codes, and every schema's
    properties and required fields."""
    paths = {
        f"{method.upper()} {path}": {
            "params": sorted(p["name"] for p in op.get("parameters", [])),
            "body": bool(op.get("requestBody")),
            "responses": sorted(op.get("responses", {})),
        }
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }
    schemas = {
        name: {
            "properties": sorted(s.get("properties", {})),
            "required": sorted(s.get("required", [])),
        }
        for name, s in spec.get("components", {}).get("schemas", {}).items()
        if name
        not in ("HTTPValidationError", "ValidationError")  # FastAPI's own, version-dependent
    }
    return {"paths": paths, "schemas": schemas}


def test_openapi_matches_the_checked_in_snapshot(tmp_path: Path) -> None:
    spec = create_app(Settings(data_dir=tmp_path)).openapi()
    text = json.dumps(contract(spec), indent=1, sort_keys=True) + "\n"
    if os.environ.get("H3D_WRITE_OPENAPI"):
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), (
        "no snapshot: run with H3D_WRITE_OPENAPI=1 (see this module's docstring)"
    )
    assert text == SNAPSHOT.read_text(), (
        "the daemon's OpenAPI changed. If intended: H3D_WRITE_OPENAPI=1 python -m pytest "
        "tests/h3d/test_openapi.py, review tests/h3d/openapi.json, and update h3client."
    )
    paths = spec["paths"]
    for path in (
        "/v1/runs",
        "/v1/runs/{run_id}/batches",
        "/v1/runs/{run_id}/eta",
        "/v1/devices",
        "/healthz",
    ):
        assert path in paths


def test_a_served_daemon_renders_the_same_document(daemon: Any) -> None:
    """``h3d serve`` imports FastAPI with pydantic's model builds deferred (a faster start):
    the document it serves, which builds FastAPI's OpenAPI models then, is the same, and
    the first requests log no warning (h3d's own models are built at start, as before)."""
    with daemon.client() as api:
        assert api.post("/v1/runs", json={"name": "first"}).status_code == 201
        r = api.get("/openapi.json")
        assert api.get("/docs").status_code == 200
    assert r.status_code == 200
    assert json.dumps(contract(r.json()), indent=1, sort_keys=True) + "\n" == SNAPSHOT.read_text()
    assert "Warning" not in daemon.log.read_text()
