"""Annotated dependencies: the session, the settings and the sampler, from lifespan state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from h3d.config import Settings
from h3d.power.sampler import PowerSampler
from h3d.storage.engine import session_scope


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.state.session_factory) as s:
        yield s


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def get_sampler(request: Request) -> PowerSampler | None:
    sampler: PowerSampler | None = request.state.sampler
    return sampler


# scope="function": the transaction commits before the response is sent, so a 200 means
# the data is stored (and a failed commit is an error response, not a lost write).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SamplerDep = Annotated["PowerSampler | None", Depends(get_sampler)]
