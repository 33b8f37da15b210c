from __future__ import annotations

import socket
import time
from typing import Annotated

from fastapi import Query, Request, Response, status
from pydantic import StringConstraints
from sqlalchemy.orm import Session

from h3d import reaper as reaping
from h3d.api._routes import Routes
from h3d.api.deps import ReaperDep, SamplerDep, SeenRun, SettingsDep, StoreDep
from h3d.api.routes.ingest import is_replay
from h3d.api.schemas import (
    CheckText,
    RunCreate,
    RunName,
    RunPublic,
    RunsPublic,
    RunUpdate,
    Text,
)
from h3d.storage import repository as repo
from h3d.storage.models import Run

router = Routes(prefix="/runs", tags=["runs"])


def to_public(run: Run, tags: list[str]) -> RunPublic:
    return RunPublic(
        id=run.id,
        name=run.name,
        status=run.status,
        created_at=run.created_at,
        finished_at=run.finished_at,
        config=run.config,
        tags=tags,
        pid=run.pid,
        host=run.host,
        n_train=run.n_train,
        node=run.node,
        world_size=run.world_size,
        n_batches=run.n_batches,
        n_epochs=run.n_epochs,
        n_nonfinite=run.n_nonfinite,
        last_seq=run.last_seq,
        last_t=run.last_t,
    )


def public(session: Session, run: Run) -> RunPublic:
    return to_public(run, repo.run_tags(session, run_ids=[run.id])[run.id])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create_run(
    body: RunCreate,
    store: StoreDep,
    sampler: SamplerDep,
    reaper: ReaperDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> RunPublic:
    now = body.created_at if body.created_at is not None else time.time()
    # a resumed profiler's create (H3-Resume): the run continues in the process that sends
    # it, which the daemon follows from now on (200); one the reaper failed is reopened
    resume = (
        body.id is not None
        and body.rank is None
        and request.headers.get(reaping.RESUME_HEADER) == "1"
        and not is_replay(request)
    )

    def write(s: Session) -> tuple[RunPublic, bool]:
        if resume and body.id is not None:
            resumed = reaping.resumed_run(s, body.id, pid=body.pid, host=body.host, now=time.time())
            if resumed is not None:
                return public(s, resumed), True
        run = repo.create_run(
            s,
            name=body.name,
            config=body.config,
            tags=body.tags,
            pid=body.pid,
            host=body.host,
            n_train=body.n_train,
            now=now,
            run_id=body.id,
            node=settings.node,
            rank=body.rank,
            world_size=body.world_size,
            local_rank=body.local_rank,
        )
        return public(s, run), False

    out, resumed = store.write(write)
    if resumed:
        response.status_code = status.HTTP_200_OK
    reaper.seen(out.id)
    if sampler is not None:
        if sampler.devices:
            sampler.mark()
        sampler.run_started(
            out.id,
            body.pid if is_local(body.host) else None,
            body.rank,
            cpu_s=body.cpu_s,
            since_t=now,
        )
    return out


def is_local(host: str | None) -> bool:
    """Processes can be followed only on this machine."""
    return host is None or host in (socket.gethostname(), "localhost", "127.0.0.1")


@router.get("", response_model=RunsPublic)
def list_runs(
    store: StoreDep,
    status: str | None = Query(None, pattern="^(running|finished|failed)$"),
    name: RunName | None = None,
    tag: Annotated[str, StringConstraints(max_length=100), CheckText] | None = None,
    since: float | None = Query(
        None, allow_inf_nan=False, description="Unix seconds: runs created at or after."
    ),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=200),
) -> RunsPublic:
    with store.read() as s:
        runs, count, nxt = repo.list_runs(
            s, status=status, name=name, tag=tag, since=since, limit=limit, cursor=cursor
        )
        tags = repo.run_tags(s, run_ids=[r.id for r in runs])
        data = [to_public(r, tags[r.id]) for r in runs]
    return RunsPublic(data=data, count=count, next_cursor=nxt)


@router.get("/resolve", response_model=RunPublic)
def resolve_run(
    store: StoreDep,
    ref: Annotated[
        Annotated[str, StringConstraints(min_length=1, max_length=200), CheckText],
        Query(description="id, name or id prefix"),
    ],
) -> RunPublic:
    """What a person types for a run, as every H3 command resolves it: a full id, a run name
    (the newest run of that name), or a unique id prefix (409 ``ambiguous_run`` lists the
    candidates). Every other endpoint takes full ids only."""
    with store.read() as s:
        return public(s, repo.resolve_run(s, ref=ref))


@router.get("/{run_id}", response_model=RunPublic)
def get_run(run_id: Text, store: StoreDep) -> RunPublic:
    with store.read() as s:
        return public(s, repo.get_run(s, run_id=run_id))


@router.patch("/{run_id}", response_model=RunPublic, dependencies=[SeenRun])
def update_run(
    run_id: Text, body: RunUpdate, store: StoreDep, sampler: SamplerDep, request: Request
) -> RunPublic:
    now, replay = time.time(), is_replay(request)

    def write(s: Session) -> tuple[RunPublic, bool]:
        with reaping.replaying(s, run_id, replay=replay, now=now) as reaped:
            run = repo.update_run(
                s,
                run_id=run_id,
                status=body.status,
                name=body.name,
                tags=body.tags,
                now=now,
                rank=body.rank,
                finished_at=body.finished_at,
            )
        return public(s, run), reaped

    out, reaped = store.write(write)
    if reaped:
        return out  # the sampler follows nothing of a run the reaper failed
    if sampler is not None and body.rank is not None and body.status is not None:
        if sampler.devices:
            sampler.mark()
        sampler.run_ended(out.id, body.rank)  # this rank is done (here, if it ran here)
    if sampler is not None and out.status != "running":
        if sampler.devices:
            sampler.mark()  # a reading at the window's end: no edge interpolation
        sampler.run_ended(out.id)
    return out


@router.delete("/{run_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_run(run_id: Text, store: StoreDep) -> Response:
    """Delete an ended run and everything stored of it: batches, per-sample losses, epochs,
    tags, ranks, shares and idle baselines (a 409 ``run_running`` while it runs). Cannot be
    undone. A client that replays the run's spool later (``h3d import``, a resumed
    profiler) creates it anew from what the spool holds."""
    store.write(lambda s: repo.delete_run(s, run_id=run_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
