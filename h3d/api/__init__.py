"""The /v1 router: every resource module, aggregated."""

from __future__ import annotations

from fastapi import APIRouter

from h3d.api.routes import analysis, ingest, runs, system

api_router = APIRouter()
api_router.include_router(runs.router)
api_router.include_router(ingest.router)
api_router.include_router(analysis.router)
api_router.include_router(system.router)
