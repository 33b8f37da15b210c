"""Annotated dependencies: the store, the settings and the sampler, from lifespan state.

There is no session dependency on purpose: a yield dependency's exit runs after the route
returns, in another threadpool thread, so a session held by one would keep its connection
(and, for a write, SQLite's lock) across a thread hop. (They are ``async``: plain lookups
need no threadpool hop either.) Routes open ``store.read()`` in their body and hand writes
to ``store.write(fn)``; the async ingest routes await ``store.write_async(fn)``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from h3d.api.schemas import Text
from h3d.config import Settings
from h3d.power.sampler import PowerSampler
from h3d.reaper import Reaper
from h3d.storage.engine import Store


async def get_store(request: Request) -> Store:
    store: Store = request.state.store
    return store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_sampler(request: Request) -> PowerSampler | None:
    sampler: PowerSampler | None = request.state.sampler
    return sampler


async def get_reaper(request: Request) -> Reaper:
    reaper: Reaper = request.state.reaper
    return reaper


async def seen_run(request: Request, run_id: Text) -> None:
    """A request for this run arrived: its heartbeat for the reaper. (``Text``: an id the
    store cannot hold is refused before it is recorded, or the reaper's every write of the
    heartbeats would fail on it.)"""
    reaper: Reaper = request.state.reaper
    reaper.seen(run_id)


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SamplerDep = Annotated["PowerSampler | None", Depends(get_sampler)]
ReaperDep = Annotated[Reaper, Depends(get_reaper)]
SeenRun = Depends(seen_run)
