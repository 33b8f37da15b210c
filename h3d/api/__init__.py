"""The /v1 routes: every resource module's, added to the app by ``add_routes``."""

from __future__ import annotations

from fastapi import FastAPI

from h3d.api.routes import analysis, ingest, runs, system


def add_routes(app: FastAPI, prefix: str = "/v1") -> None:
    """Create the routes of every resource module on ``app`` (each built once: see _routes)."""
    for module in (runs, ingest, analysis, system):
        module.router.add_to(app, prefix)
