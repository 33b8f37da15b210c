"""Store operations: keyword-only functions taking a session first. They flush, never commit."""

from __future__ import annotations

import base64
import bisect
import functools
import itertools
import math
import uuid
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    CursorResult,
    Dialect,
    Float,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from h3d.energy import EnergyCurve, Sample, max_gap, thinned_step
from h3d.errors import (
    AmbiguousRun,
    InvalidInput,
    RunExists,
    RunFinished,
    RunNotFound,
    RunRunning,
)
from h3d.storage.models import (
    Batch,
    BigInt,
    Device,
    Epoch,
    NodeLease,
    PowerSample,
    Run,
    RunIdle,
    RunRank,
    RunShare,
    RunTag,
    SampleLosses,
)


def new_run_id() -> str:
    return uuid.uuid4().hex


def _pg_insert(table: Any) -> Any:
    # Imported here: a PostgreSQL engine has loaded the dialect already, and a SQLite
    # daemon's start-up is spared it (tens of ms; benchmarks/results/startup.md).
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(table)


def _dialect_insert(session: Session, table: Any) -> Any:
    """The store's own INSERT construct for ``table`` (one that can resolve a key conflict),
    or None on another dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table)
    return _pg_insert(table) if dialect == "postgresql" else None


def _upsert_shares(session: Session) -> Any:
    """An INSERT of run shares where a row with the key already stored is replaced: the
    sampler amends a run's rows (a run's split extended while it holds, a late rank's
    share added to the intervals it was back-dated over), and never loses one on a key."""
    table: Any = RunShare.__table__
    stmt = _dialect_insert(session, table)
    if stmt is None:
        return table.insert()
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key],
        set_={"t1": stmt.excluded.t1, "share": stmt.excluded.share},
    )


def _insert(session: Session, table: Any) -> Any:
    """An INSERT that skips rows whose key exists (race-safe idempotent ingest)."""
    # On the Table, not the mapped class: a Core executemany, without the ORM's per-row
    # bookkeeping (a third of the ingest time at 100 batches a request).
    stmt = _dialect_insert(session, table.__table__)
    return table.__table__.insert() if stmt is None else stmt.on_conflict_do_nothing()


# --- runs -----------------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    name: str | None,
    config: dict[str, Any],
    tags: Sequence[str],
    pid: int | None,
    host: str | None,
    n_train: int | None,
    now: float,
    run_id: str | None = None,
    node: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> Run:
    """Create a run; with ``rank``, join it instead (creating it if no rank did yet).

    Joining is idempotent: every rank of a distributed run sends the same create with its
    own rank, whichever arrives first creates the run, on any node's daemon.
    """
    if rank is not None and (run_id is None or world_size is None):
        raise InvalidInput("a rank joins a run by its id and the world size")
    if run_id is None:
        run_id = new_run_id()
    row: dict[str, Any] = {
        "id": run_id,
        "name": name or f"run-{run_id[:8]}",
        "status": "running",
        "created_at": now,
        "finished_at": None,
        "config": config,
        "pid": pid,
        "host": host,
        "n_train": n_train,
        "node": node,
        "world_size": world_size if rank is not None else None,
        "n_batches": 0,
        "n_epochs": 0,
        "n_nonfinite": 0,
        "last_seq": None,
        "last_t": None,
    }
    if rank is not None:
        return _join_run(session, row=row, tags=tags, rank=rank, local_rank=local_rank)
    if session.get(Run, run_id) is not None:
        raise RunExists(f"a run with id {run_id} exists", details={"run_id": run_id})
    run = Run(**row)
    session.add(run)
    session.add_all(RunTag(run_id=run_id, tag=t) for t in dict.fromkeys(tags))
    session.flush()
    return run


def _join_run(
    session: Session,
    *,
    row: dict[str, Any],
    tags: Sequence[str],
    rank: int,
    local_rank: int | None,
) -> Run:
    run_id, world_size, now = row["id"], row["world_size"], row["created_at"]
    result = session.execute(_insert(session, Run).values(**row))
    created = cast(CursorResult[Any], result).rowcount == 1
    # The row lock orders joins and finishes of one run across daemons (a no-op on SQLite,
    # whose writers are serialised anyway).
    run = session.get(Run, run_id, with_for_update=True, populate_existing=True)
    assert run is not None
    if run.world_size != world_size:
        raise InvalidInput(
            f"run {run_id} was started with world_size {run.world_size}; rank {rank} says "
            f"{world_size}",
            details={"world_size": run.world_size},
        )
    if not created and run.status != "running":
        # A run that ended is never reopened: a rank already in it (a replayed join)
        # answers with the run as it is; a new one is refused before it changes the run's
        # window or takes a share of its energy (a second profiler of a launch, a late join)
        if session.get(RunRank, (run_id, rank)) is not None:
            return run
        raise RunFinished(
            f"run {run_id} is already {run.status}; rank {rank} cannot join it",
            details={"status": run.status, "rank": rank},
        )
    if created:
        session.add_all(RunTag(run_id=run_id, tag=t) for t in dict.fromkeys(tags))
    elif now < run.created_at:  # the run starts when its first rank does
        run.created_at = now
    session.execute(
        _insert(session, RunRank),
        [
            {
                "run_id": run_id,
                "rank": rank,
                "node": row["node"] or "",
                "host": row["host"],
                "pid": row["pid"],
                "local_rank": local_rank,
                "joined_at": now,
                "status": "running",
                "finished_at": None,
            }
        ],
    )
    session.flush()
    return run


def run_ranks(session: Session, *, run_id: str) -> list[RunRank]:
    return list(
        session.scalars(select(RunRank).where(RunRank.run_id == run_id).order_by(RunRank.rank))
    )


def rank_batch_counts(session: Session, *, run_id: str) -> dict[int, int]:
    q = (
        select(Batch.rank, func.count())
        .where(Batch.run_id == run_id, Batch.rank.is_not(None))
        .group_by(Batch.rank)
    )
    return {int(r): int(c) for r, c in session.execute(q) if r is not None}


def running_ranks(session: Session, *, node: str) -> list[RunRank]:
    """The ranks on ``node`` of runs that are still running (to follow after a restart)."""
    q = (
        select(RunRank)
        .join(Run, Run.id == RunRank.run_id)
        .where(RunRank.node == node, RunRank.status == "running", Run.status == "running")
    )
    return list(session.scalars(q))


def _finish_rank(session: Session, run: Run, *, rank: int, status: str, now: float) -> None:
    """Mark one rank done; the run ends with its last rank (failed if any rank failed)."""
    session.refresh(run, with_for_update=True)
    if run.status != "running":
        raise RunFinished(f"run {run.id} is already {run.status}", details={"status": run.status})
    rr = session.get(RunRank, (run.id, rank))
    if rr is None:
        raise InvalidInput(f"rank {rank} never joined run {run.id}")
    if rr.status == "running":
        rr.status, rr.finished_at = status, now
    elif rr.status != status:  # as a run's conflicting second status: not a silent 200
        raise RunFinished(
            f"rank {rank} of run {run.id} is already {rr.status}",
            details={"status": rr.status, "rank": rank},
        )
    session.flush()
    ranks = run_ranks(session, run_id=run.id)
    if (
        run.world_size is not None
        and len(ranks) >= run.world_size
        and all(r.status != "running" for r in ranks)
    ):
        run.status = "failed" if any(r.status == "failed" for r in ranks) else "finished"
        run.finished_at = max(r.finished_at or now for r in ranks)
        _keep_idle_baselines(session, run, ranks)


def _keep_idle_baselines(session: Session, run: Run, ranks: Sequence[RunRank]) -> None:
    """At a run's end, store the idle baseline each of its nodes' devices has now (None
    where none is known), so that its energy above idle does not change when a later daemon
    session measures another baseline."""
    q = select(Device.id, Device.idle_power_w)
    if run.node is not None:  # None: a run from before nodes, on the store's one node
        q = q.where(Device.node.in_({run.node} | {r.node for r in ranks}))
    session.execute(delete(RunIdle).where(RunIdle.run_id == run.id))
    session.add_all(
        RunIdle(run_id=run.id, device_id=dev_id, idle_power_w=idle)
        for dev_id, idle in session.execute(q)
    )


def run_idle(session: Session, *, run_id: str) -> dict[int, float | None] | None:
    """The idle baselines stored when the run ended, by device id; None if none were (a
    run still going, or one that ended before h3d stored them)."""
    rows = session.execute(
        select(RunIdle.device_id, RunIdle.idle_power_w).where(RunIdle.run_id == run_id)
    ).all()
    return {dev_id: idle for dev_id, idle in rows} if rows else None


def get_run(session: Session, *, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(run_id)
    return run


RESOLVE_CANDIDATES = 10


def resolve_run(session: Session, *, ref: str) -> Run:
    """What a person types for a run: a full id, a run name (the newest run of that name),
    or a unique id prefix. An ambiguous prefix raises ``AmbiguousRun`` naming the candidates.
    """
    raw, ref = ref, ref.strip()
    if not ref:
        raise InvalidInput("an empty run reference")
    run = session.get(Run, ref)
    if run is not None:
        return run
    # Names are stored stripped, as the ref is; a run named before that may hold spaces
    # around its name, and is found by them, exactly as typed.
    names = Run.name.in_((ref, raw)) if raw != ref else Run.name == ref
    named = session.scalars(
        select(Run).where(names).order_by(Run.created_at.desc(), Run.id.desc()).limit(1)
    ).first()
    prefixed = list(
        session.scalars(
            select(Run)
            .where(Run.id.startswith(ref.lower(), autoescape=True))
            .order_by(Run.created_at.desc())
            .limit(RESOLVE_CANDIDATES + 1)
        )
    )
    if named is not None:
        # a name that is also another run's id prefix (a run named "27b67c60"): which one
        # was meant cannot be told, as for a prefix of several ids; neither silently wins
        others = [r for r in prefixed if r.id != named.id]
        if not others:
            return named
        prefixed = [named, *others]
    if len(prefixed) == 1:
        return prefixed[0]
    if not prefixed:
        raise RunNotFound(ref, by="id, id prefix or name")
    shown = prefixed[:RESOLVE_CANDIDATES]
    more = " and more" if len(prefixed) > RESOLVE_CANDIDATES else ""
    width = _distinct_width([r.id for r in shown])
    listing = ", ".join(f"{r.id[:width]} ({r.name})" for r in shown)
    raise AmbiguousRun(
        f"{ref!r} matches {len(shown)}{more} runs: {listing}; type more of the id",
        details={"ref": ref, "candidates": [{"id": r.id, "name": r.name} for r in shown]},
    )


def _distinct_width(ids: Sequence[str], least: int = 12) -> int:
    """The shortest prefix length, at least ``least``, at which ``ids`` all differ (client-
    chosen ids may share more than 12 leading characters); the longest id's if none is."""
    longest = max((len(i) for i in ids), default=least)
    for width in range(least, longest):
        if len({i[:width] for i in ids}) == len(ids):
            return width
    return max(longest, least)


def run_tags(session: Session, *, run_ids: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {r: [] for r in run_ids}
    if run_ids:
        rows = session.execute(
            select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(run_ids)).order_by(RunTag.tag)
        )
        for rid, tag in rows:
            out[rid].append(tag)
    return out


def update_run(
    session: Session,
    *,
    run_id: str,
    status: str | None,
    name: str | None,
    tags: Sequence[str] | None,
    now: float,
    rank: int | None = None,
    finished_at: float | None = None,
) -> Run:
    """Finish (``status``), rename, retag a run; with ``rank``, finish that rank only.

    The end is ``finished_at`` when the client says when it ended: one before the run began
    (a rank's: before it joined) is ``InvalidInput``, for it would give the run an empty
    window (0 J) for good. Otherwise it is ``now``, the daemon's clock, and at least the
    start: a client clock ahead of the daemon's has sent a ``created_at`` in its future.
    """
    run = get_run(session, run_id=run_id)
    if finished_at is not None and status is None:
        raise InvalidInput("finished_at needs a final status (finished or failed)")
    if rank is not None and run.world_size is None and rank != 0:
        # as a batch's rank: a run of one process has rank 0 only, and a rank that is not
        # one of its own does not end it
        raise InvalidInput(
            f"rank {rank} is not a rank of run {run_id}: its one process (no world_size)",
            details={"rank": rank, "world_size": None},
        )
    by_rank = rank is not None and status is not None and run.world_size is not None
    start, what = run.created_at, f"run {run_id} was created"
    if by_rank:
        rr = session.get(RunRank, (run_id, rank))
        if rr is not None:  # None: _finish_rank says it never joined
            start, what = rr.joined_at, f"rank {rank} of run {run_id} joined"
    if finished_at is not None and finished_at < start:
        raise InvalidInput(
            f"finished_at {finished_at!r} is before the {what} ({start!r}): a run cannot "
            "end before it began",
            details={"finished_at": finished_at, "started_at": start},
        )
    end = finished_at if finished_at is not None else max(now, start)
    if by_rank:
        assert rank is not None and status is not None
        _finish_rank(session, run, rank=rank, status=status, now=end)
    elif status is not None and status != run.status:
        if run.status != "running":
            raise RunFinished(
                f"run {run_id} is already {run.status}", details={"status": run.status}
            )
        run.status = status
        run.finished_at = end if status in ("finished", "failed") else None
        if run.finished_at is not None:
            ranks = run_ranks(session, run_id=run_id)
            for rr in ranks:  # the run ended as a whole (the reaper, a PATCH): so did its ranks
                if rr.status == "running":
                    rr.status, rr.finished_at = status, max(end, rr.joined_at)
            _keep_idle_baselines(session, run, ranks)
    if name is not None:
        run.name = name
    if tags is not None:
        session.execute(delete(RunTag).where(RunTag.run_id == run_id))
        session.add_all(RunTag(run_id=run_id, tag=t) for t in dict.fromkeys(tags))
    session.flush()
    return run


def _encode_cursor(created_at: float, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{run_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        # validate: the lenient decoder drops what is no base64 (a NUL, a space) and reads on
        raw = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True)
        ts, rid = raw.decode().split("|", 1)
        if "\x00" in rid:  # compared with the stored ids: PostgreSQL's text holds no NUL
            raise ValueError(rid)
        if not math.isfinite(created := float(ts)):
            raise ValueError(ts)
        return created, rid
    except (ValueError, UnicodeDecodeError) as exc:  # binascii.Error is a ValueError
        raise InvalidInput("the cursor is not one this daemon issued") from exc


def list_runs(
    session: Session,
    *,
    status: str | None = None,
    name: str | None = None,
    tag: str | None = None,
    since: float | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Run], int, str | None]:
    """Newest first. Returns (page, total matching, cursor of the next page or None)."""
    q = select(Run)
    if status:
        q = q.where(Run.status == status)
    if tag:
        q = q.where(Run.id.in_(select(RunTag.run_id).where(RunTag.tag == tag)))
    if since is not None:
        q = q.where(Run.created_at >= since)
    if name:
        # case-blind on every store, beyond ASCII too, and alike on every store: names are
        # folded by Python's casefold. SQLite's lower() and LIKE fold ASCII only ("école"
        # missed "ÉCOLE"): there engine.py registers it as h3_fold on every connection.
        # PostgreSQL's lower() folds by the database's LC_CTYPE (ASCII only under C) and is
        # not casefold even so (ß, ς), and PostgreSQL 15 has no casefold(): there each
        # distinct name the other filters keep is folded here, and the runs of those taken
        # (no folded column: that would need a migration).
        needle = name.casefold()
        if session.get_bind().dialect.name == "sqlite":
            folded = func.h3_fold(Run.name, type_=Run.name.type)
            q = q.where(folded.contains(needle, autoescape=True))
        else:
            names = session.scalars(q.with_only_columns(Run.name).distinct())
            hits = [n for n in names if n is not None and needle in n.casefold()]
            q = q.where(Run.name == any_(bindparam("name_hits", hits, type_=ARRAY(String))))
    count = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    if cursor:
        c_at, c_id = _decode_cursor(cursor)
        q = q.where(or_(Run.created_at < c_at, and_(Run.created_at == c_at, Run.id < c_id)))
    rows = list(session.scalars(q.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)))
    nxt = (
        _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
        if len(rows) > limit
        else None
    )
    return rows[:limit], count, nxt


# --- ingest ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchRow:
    seq: int
    t: float
    loss: float | None
    n: int | None
    epoch: int | None
    step: int | None
    phase: str | None
    losses: Sequence[float | None] | bytes | None  # bytes: packed float32 from the wire
    indices: Sequence[int] | bytes | None  # bytes: packed int64
    rank: int | None = None


def _at_least(column: Any, value: Any) -> Any:
    """SQL for max(column, value) with NULL as -inf, portable across dialects."""
    return case((or_(column.is_(None), column < value), value), else_=column)


def _f32(values: Sequence[float | None] | bytes) -> bytes:
    if isinstance(values, bytes):  # already packed float32 from the wire
        return values
    return array("f", (math.nan if v is None else v for v in values)).tobytes()


def _i64(values: Sequence[int] | bytes) -> bytes:
    return values if isinstance(values, bytes) else array("q", values).tobytes()


@dataclass(frozen=True, slots=True)
class _Driver:
    """A statement compiled once per dialect, run as driver SQL with its bind processors.

    SQLAlchemy builds, caches and wraps every ``session.execute`` (the ORM's compile
    state, cache keys, result metadata): ~3 ms of Python for the four statements of a
    100-batch ingest, against ~1 ms of SQLite work. The ingest path compiles its statements
    once and hands tuples to the driver.
    """

    sql: str
    names: tuple[str, ...]  # the bind names, in position order if the paramstyle is positional
    positional: bool
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (index in names, processor)
    defaults: dict[str, Any]  # binds the statement fills itself (SQLite's OFFSET 0 of a LIMIT)

    @classmethod
    def of(cls, stmt: Any, dialect: Dialect, column_keys: Sequence[str] | None = None) -> _Driver:
        compiled = stmt.compile(
            dialect=dialect, column_keys=list(column_keys) if column_keys else None
        )
        positional = bool(compiled.positional)
        names = tuple(compiled.positiontup or ()) if positional else tuple(compiled.binds)
        processors = tuple(
            (i, proc)
            for i, name in enumerate(names)
            if (proc := compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
        )
        defaults = {
            name: b.value
            for name, b in compiled.binds.items()
            if b.value is not None and not b.callable
        }
        return cls(str(compiled), names, positional, processors, defaults)

    def params(self, values: Sequence[Any]) -> Any:
        """Driver parameters from ``values`` given in ``names`` order."""
        if self.processors:
            values = list(values)
            for i, proc in self.processors:
                values[i] = proc(values[i])
        return tuple(values) if self.positional else dict(zip(self.names, values, strict=True))

    def execute(self, session: Session, **values: Any) -> Any:
        return session.connection().exec_driver_sql(
            self.sql,
            self.params([values[n] if n in values else self.defaults[n] for n in self.names]),
        )


def _skip_existing_insert(dialect: Dialect, table: Any) -> Any:
    if dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if dialect.name == "postgresql":
        return _pg_insert(table).on_conflict_do_nothing()
    return table.insert()


@functools.lru_cache(maxsize=32)
def _compiled_insert(
    dialect: Dialect, table: Any, columns: tuple[str, ...]
) -> tuple[_Driver, tuple[int, ...] | None]:
    """The skip-existing INSERT of ``columns``, compiled once, and where each of its binds
    takes its value from in a row of ``columns`` (None: the same order)."""
    d = _Driver.of(_skip_existing_insert(dialect, table), dialect, columns)
    order = None if d.names == columns else tuple(columns.index(n) for n in d.names)
    return d, order


def _fast_insert(
    session: Session, table: Any, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
) -> None:
    """executemany of a skip-existing INSERT straight to the driver; ``rows`` hold the
    values of ``columns`` in that order."""
    conn = session.connection()
    d, order = _compiled_insert(conn.dialect, table.__table__, columns)
    if order is not None:  # the statement binds the columns in another order
        rows = [tuple(r[i] for i in order) for r in rows]
    if d.processors or not d.positional:
        params: Any = [d.params(r) for r in rows]
    else:
        params = rows
    conn.exec_driver_sql(d.sql, params)


@functools.lru_cache(maxsize=8)
def _status_sql(dialect: Dialect) -> _Driver:
    """The run's status, locking its row until the transaction ends (PostgreSQL; SQLite's
    writer holds the whole database already): every ingest into one run, from any daemon
    on a shared store, runs one after the other, so the keys it finds present stay true
    until it commits."""
    runs = Run.__table__
    return _Driver.of(
        select(runs.c.status).where(runs.c.id == bindparam("run_id")).with_for_update(), dialect
    )


@functools.lru_cache(maxsize=16)
def _present_sql(dialect: Dialect, table: Any, key: str) -> _Driver:
    """The keys of one run's rows in [lo, hi]: an index range scan."""
    col = table.c[key]
    return _Driver.of(
        select(col).where(
            table.c.run_id == bindparam("run_id"), col.between(bindparam("lo"), bindparam("hi"))
        ),
        dialect,
    )


@functools.lru_cache(maxsize=8)
def _count_batches_sql(dialect: Dialect) -> _Driver:
    runs: Any = Run.__table__
    seq, t = bindparam("p_seq", type_=BigInt), bindparam("p_t", type_=Float)
    return _Driver.of(
        update(runs)
        .where(runs.c.id == bindparam("run_id"))
        .values(
            n_batches=runs.c.n_batches + bindparam("p_added", type_=BigInt),
            n_nonfinite=runs.c.n_nonfinite + bindparam("p_nonfinite", type_=BigInt),
            last_seq=_at_least(runs.c.last_seq, seq),
            last_t=_at_least(runs.c.last_t, t),
        ),
        dialect,
    )


def _inserted(
    session: Session, table: Any, key: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> set[Any]:
    """Insert ``rows`` (values of ``columns``, one run's), skipping those whose key exists;
    the keys of the rows really inserted.

    The counters are moved by what the store says was inserted, never by what a request
    carried: two overlapping requests (a client retrying after its timeout while the first
    is still in flight), or two daemons on one PostgreSQL store, must not both count the
    same rows. The caller holds the run's row lock (``_check_ingestable``), and on SQLite the
    writer's transaction began IMMEDIATE: nobody else inserts into this run until it
    commits, so the SELECT of the keys present is exact, and a plain executemany of the
    rest is the fast path on both (a RETURNING insert costs PostgreSQL's driver ~4 ms a
    request to parse its 900 placeholders).
    """
    tbl = table.__table__
    dialect = session.get_bind().dialect
    k, r_id = columns.index(key), columns.index("run_id")
    keys = [r[k] for r in rows]
    present = set(
        _present_sql(dialect, tbl, key)
        .execute(session, run_id=rows[0][r_id], lo=min(keys), hi=max(keys))
        .scalars()
    )
    fresh = [r for r in rows if r[k] not in present] if present else rows
    if fresh:
        _fast_insert(session, table, columns, fresh)
    return {r[k] for r in fresh}


def _check_ingestable(session: Session, run_id: str, table: Any, key: str, keys: list[int]) -> bool:
    """Whether the run takes data: True if running. A run that ended takes nothing new
    (409), but a replay of rows it already holds is acknowledged (False: all duplicates),
    so a spool replayed after its run was finished, or reaped, is told the truth: the 409
    means "not stored", never "already stored". One indexed column read, no ORM load."""
    dialect = session.get_bind().dialect
    status = _status_sql(dialect).execute(session, run_id=run_id).scalar()
    if status is None:
        raise RunNotFound(run_id)
    if status == "running":
        return True
    wanted = set(keys)
    if wanted:
        present = _present_sql(dialect, table.__table__, key).execute(
            session, run_id=run_id, lo=min(wanted), hi=max(wanted)
        )
        missing = len(wanted - set(present.scalars()))
    else:
        missing = 0
    if missing:
        what = "batches" if table is Batch else "epochs"
        raise RunFinished(
            f"run {run_id} is {status}; it takes no more data: {missing} of the {len(wanted)} "
            f"{what} sent are not stored",
            details={"status": status, "not_stored": missing},
        )
    return False


BATCH_COLUMNS = ("run_id", "seq", "t", "loss", "n", "epoch", "step", "phase", "rank")
VECTOR_COLUMNS = ("run_id", "seq", "count", "losses", "indices")


def _check_rank(session: Session, run_id: str, batch: BatchRow) -> None:
    """A batch's rank is one of its run's: below its world_size (a run of one process: 0).
    A rank of it that has not joined yet is taken (a replayed spool may come before its
    rank's join reaches this store); one no rank of the run can have is refused, for its
    rows would belong to no rank (the ranks' counts would not add up to the run's)."""
    size = session.execute(select(Run.world_size).where(Run.id == run_id)).scalar()
    assert batch.rank is not None
    if batch.rank >= (size or 1):
        what = f"world_size is {size}" if size else "one process (no world_size)"
        raise InvalidInput(
            f"batch seq={batch.seq}: rank {batch.rank} is not a rank of run {run_id}: its {what}",
            details={"seq": batch.seq, "rank": batch.rank, "world_size": size},
        )


def add_batches(session: Session, *, run_id: str, batches: Sequence[BatchRow]) -> tuple[int, int]:
    """Insert the batches not stored yet; returns (accepted, duplicates)."""
    if not _check_ingestable(session, run_id, Batch, "seq", [b.seq for b in batches]):
        return 0, len(batches)
    if not batches:
        return 0, 0
    ranks = {b.rank for b in batches}  # one rank a request, as the client sends them
    ranks.discard(None)
    if ranks:
        top = max(r for r in ranks if r is not None)
        _check_rank(session, run_id, next(b for b in batches if b.rank == top))
    candidates: dict[int, BatchRow] = {}
    for b in batches:  # a seq repeated inside one request counts once
        candidates.setdefault(b.seq, b)
    inserted = _inserted(
        session,
        Batch,
        "seq",
        BATCH_COLUMNS,
        [
            (run_id, b.seq, b.t, b.loss, b.n, b.epoch, b.step, b.phase, b.rank)
            for b in candidates.values()
        ],
    )
    new = [b for seq, b in candidates.items() if seq in inserted]
    if new:
        vectors = [
            (
                run_id,
                b.seq,
                len(b.losses) // 4 if isinstance(b.losses, bytes) else len(b.losses),
                _f32(b.losses),
                _i64(b.indices) if b.indices is not None else None,
            )
            for b in new
            if b.losses is not None
        ]
        if vectors:
            _fast_insert(session, SampleLosses, VECTOR_COLUMNS, vectors)
        # Counters move in SQL, not read-modify-write in Python: concurrent ingests into
        # one run must not lose updates.
        _count_batches_sql(session.get_bind().dialect).execute(
            session,
            run_id=run_id,
            p_added=len(new),
            p_nonfinite=sum(1 for b in new if b.loss is None),
            p_seq=max(b.seq for b in new),
            p_t=max(b.t for b in new),
        )
    return len(new), len(batches) - len(new)


def add_epochs(
    session: Session, *, run_id: str, epochs: Sequence[dict[str, Any]]
) -> tuple[int, int]:
    """Insert the epochs not stored yet; returns (accepted, duplicates).

    No statement binds one parameter per epoch (an IN list of them went past the limit of
    parameters a statement takes: SQLite's SQLITE_MAX_VARIABLE_NUMBER, PostgreSQL's 65 535,
    a 503 then): the ones stored already are found by a range scan of the run's keys
    (``_inserted``), as for batches."""
    keys = {e["epoch"] for e in epochs}
    if not _check_ingestable(session, run_id, Epoch, "epoch", list(keys)):
        return 0, len(epochs)
    candidates: dict[int, dict[str, Any]] = {}
    for e in epochs:  # an epoch repeated inside one request counts once
        candidates.setdefault(e["epoch"], {"run_id": run_id, **e})
    rows = list(candidates.values())  # every one has the keys of EpochIn, in one order
    columns = tuple(rows[0]) if rows else ()
    new = (
        _inserted(session, Epoch, "epoch", columns, [tuple(r[k] for k in columns) for r in rows])
        if rows
        else set()
    )
    if new:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(n_epochs=Run.n_epochs + len(new))
            .execution_options(synchronize_session=False)
        )
        loaded = session.identity_map.get(session.identity_key(Run, run_id))
        if loaded is not None:  # a job earlier in this transaction loaded the run
            session.expire(loaded)
    session.flush()
    return len(new), len(epochs) - len(new)


# --- reads ----------------------------------------------------------------------------


def batch_points(
    session: Session, *, run_id: str, t0: float | None = None, t1: float | None = None
) -> list[tuple[int, float, float | None, int | None, int | None, str | None, int | None]]:
    """(seq, t, loss, n, epoch, phase, rank) ordered by seq."""
    q = select(Batch.seq, Batch.t, Batch.loss, Batch.n, Batch.epoch, Batch.phase, Batch.rank).where(
        Batch.run_id == run_id
    )
    if t0 is not None:
        q = q.where(Batch.t >= t0)
    if t1 is not None:
        q = q.where(Batch.t <= t1)
    return [tuple(r) for r in session.execute(q.order_by(Batch.seq))]  # type: ignore[misc]


def batch_page(session: Session, *, run_id: str, after_seq: int, limit: int) -> list[Batch]:
    """The next ``limit`` batches with seq > ``after_seq`` (keyset paging)."""
    return list(
        session.scalars(
            select(Batch)
            .where(Batch.run_id == run_id, Batch.seq > after_seq)
            .order_by(Batch.seq)
            .limit(limit)
        )
    )


def _vectors(losses: bytes, indices: bytes | None) -> tuple[list[float], list[int] | None]:
    vals = array("f")
    vals.frombytes(losses)
    if indices is None:
        return vals.tolist(), None
    idx = array("q")
    idx.frombytes(indices)
    return vals.tolist(), idx.tolist()


def sample_losses(
    session: Session, *, run_id: str, seq: int
) -> tuple[list[float], list[int] | None]:
    """Batch ``seq``'s per-sample losses (NaN where one was not finite) and indices."""
    row = session.get(SampleLosses, (run_id, seq))
    if row is None:
        raise InvalidInput(f"batch {seq} of run {run_id} has no per-sample losses")
    return _vectors(row.losses, row.indices)


def sample_loss_page(
    session: Session, *, run_id: str, after_seq: int, limit: int
) -> list[tuple[int, int | None, list[float], list[int] | None]]:
    """(seq, epoch, losses, indices) of the next ``limit`` batches with per-sample losses
    and seq > ``after_seq`` (keyset paging, as :func:`batch_page`)."""
    q = (
        select(SampleLosses.seq, Batch.epoch, SampleLosses.losses, SampleLosses.indices)
        .join(Batch, (Batch.run_id == SampleLosses.run_id) & (Batch.seq == SampleLosses.seq))
        .where(SampleLosses.run_id == run_id, SampleLosses.seq > after_seq)
        .order_by(SampleLosses.seq)
        .limit(limit)
    )
    return [(seq, epoch, *_vectors(blob, idx)) for seq, epoch, blob, idx in session.execute(q)]


def running_runs(session: Session) -> list[Run]:
    return list(session.scalars(select(Run).where(Run.status == "running")))


def running_heartbeats(session: Session) -> dict[str, float | None]:
    """Each running run's id and its heartbeat on the store (``seen_at``; None: none yet)."""
    q = select(Run.id, Run.seen_at).where(Run.status == "running")
    return {rid: seen for rid, seen in session.execute(q)}


def ranks_all_ended(session: Session) -> set[str]:
    """The running distributed runs whose every joined rank has ended (finished or failed):
    each waits only for ranks that never joined (a job that made a profiler on rank 0
    alone, or a rank that died before its own). The reaper gives them the exit grace."""
    q = (
        select(Run.id)
        .join(RunRank, RunRank.run_id == Run.id)
        .where(Run.status == "running", Run.world_size.is_not(None))
        .group_by(Run.id)
        .having(func.sum(case((RunRank.status == "running", 1), else_=0)) == 0)
    )
    return set(session.scalars(q))


def write_heartbeats(session: Session, seen: dict[str, float]) -> None:
    """Move each run's heartbeat forward to the time given for it (never back: another
    daemon may have written a later one)."""
    if not seen:
        return
    runs: Any = Run.__table__
    at = bindparam("at", type_=Float)
    session.execute(
        update(runs)
        .where(runs.c.id == bindparam("rid"), or_(runs.c.seen_at.is_(None), runs.c.seen_at < at))
        .values(seen_at=at),
        # in one order on every daemon (by id): daemons serving ranks of the same runs
        # lock the rows in the same order, and so never deadlock each other
        [{"rid": rid, "at": t} for rid, t in sorted(seen.items())],
    )


@functools.lru_cache(maxsize=8)
def _loss_end_sql(dialect: Dialect, *, last: bool) -> _Driver:
    t: Any = Batch.__table__
    return _Driver.of(
        select(t.c.t, t.c.loss, t.c.n)
        .where(t.c.run_id == bindparam("run_id"), t.c.loss.is_not(None))
        .order_by(t.c.seq.desc() if last else t.c.seq)
        .limit(bindparam("k", type_=Integer)),
        dialect,
    )


def loss_ends(
    session: Session, *, run_id: str, k0: int, k: int
) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """The first ``k0`` and last ``k`` finite (t, loss, weight) points, by index seeks.

    Driver SQL compiled once: /metrics asks this of every running run on every scrape.
    """
    dialect = session.get_bind().dialect
    first = _loss_end_sql(dialect, last=False).execute(session, run_id=run_id, k=k0).all()
    last = _loss_end_sql(dialect, last=True).execute(session, run_id=run_id, k=k).all()

    def pts(rows: Sequence[Any]) -> list[tuple[float, float, float]]:
        # weighed by samples, n = 1 when not sent; a batch of none has no part in the loss
        return [
            (t, loss, 1.0 if n is None else float(n))
            for t, loss, n in rows
            if math.isfinite(loss) and n != 0
        ]

    return pts(first), pts(list(reversed(last)))


def epochs(session: Session, *, run_id: str) -> list[Epoch]:
    return list(session.scalars(select(Epoch).where(Epoch.run_id == run_id).order_by(Epoch.epoch)))


# --- devices and power ------------------------------------------------------------------


def upsert_device(
    session: Session,
    *,
    name: str,
    kind: str,
    source: str,
    model: str,
    uuid_: str | None,
    now: float,
    granularity_s: float | None = None,
    node: str = "",
) -> Device:
    dev = session.scalar(select(Device).where(Device.node == node, Device.name == name))
    if dev is None:
        dev = Device(
            node=node,
            name=name,
            kind=kind,
            source=source,
            model=model,
            uuid=uuid_,
            first_seen=now,
            last_seen=now,
            granularity_s=granularity_s,
        )
        session.add(dev)
    else:
        dev.granularity_s = granularity_s
        dev.kind, dev.source, dev.model, dev.uuid, dev.last_seen = kind, source, model, uuid_, now
    session.flush()
    return dev


def add_power_samples(session: Session, *, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(_insert(session, PowerSample), list(rows))


def devices(session: Session, *, nodes: Iterable[str] | None = None) -> list[Device]:
    """Every node's devices, or only those of ``nodes``."""
    q = select(Device)
    if nodes is not None:
        q = q.where(Device.node.in_(list(nodes)))
    return list(session.scalars(q.order_by(Device.id)))


def power_window(
    session: Session, *, device_id: int, t0: float, t1: float
) -> list[tuple[float, float | None, float | None]]:
    """Samples in [t0, t1] plus the nearest one on each side, for edge interpolation."""
    cols = (PowerSample.t, PowerSample.power_w, PowerSample.energy_j)
    inside = select(*cols).where(
        PowerSample.device_id == device_id, PowerSample.t >= t0, PowerSample.t <= t1
    )
    before = (
        select(*cols)
        .where(PowerSample.device_id == device_id, PowerSample.t < t0)
        .order_by(PowerSample.t.desc())
        .limit(1)
    )
    after = (
        select(*cols)
        .where(PowerSample.device_id == device_id, PowerSample.t > t1)
        .order_by(PowerSample.t)
        .limit(1)
    )
    rows: list[tuple[float, float | None, float | None]] = [
        (r[0], r[1], r[2]) for r in session.execute(before)
    ]
    rows += [(r[0], r[1], r[2]) for r in session.execute(inside.order_by(PowerSample.t))]
    rows += [(r[0], r[1], r[2]) for r in session.execute(after)]
    unstored = session.info.get("unstored_power", {}).get(device_id)
    if not unstored:
        return rows
    # Readings the sampler holds but the writer has not committed yet (a read overlay, so
    # that a query sees up to now without waiting behind writes).
    merged = sorted({r[0]: r for r in (*rows, *unstored)}.values())
    inside_rows = [r for r in merged if t0 <= r[0] <= t1]
    before_rows = [r for r in merged if r[0] < t0][-1:]
    after_rows = [r for r in merged if r[0] > t1][:1]
    return before_rows + inside_rows + after_rows


def prune_power_samples(
    session: Session, *, cutoff: float, bucket_s: float, since: float = float("-inf")
) -> int:
    """Thin power samples in [since, cutoff) to about one per device per ``bucket_s``,
    keeping every run's energy (docs/power.md "Retention"), in one transaction. The daemon
    thins in slices instead (:func:`prune_power_slice`), with the same result.

    Samples inside the window of a run that is still running, or that finished after
    ``cutoff``, keep full resolution. A kept row stands for the samples thinned after it: its
    ``power_w`` becomes the mean power up to the next kept row and ``energy_j`` carries the
    cumulative energy (the counter, or, for a device that reports power only, the energy
    integrated here), so the energy model counts the thinned steps exactly
    (:func:`h3d.energy.thinned_step`). Kept too: the two samples around each gap and counter
    reset, and around each run's start and end and each epoch's end. Steps an older version
    thinned without marking them are marked, with the trapezoid over the thinned rows.
    Returns the number of rows deleted.
    """
    protected = _protected(session, cutoff=cutoff)
    deleted = 0
    for dev in session.scalars(
        select(PowerSample.device_id)
        .where(PowerSample.t >= since, PowerSample.t < cutoff)
        .distinct()
    ).all():
        deleted += _prune_device(
            session,
            dev,
            since=since,
            until=cutoff,
            cutoff=cutoff,
            bucket_s=bucket_s,
            protected=protected,
        )
    session.flush()
    return deleted


def prune_power_slice(
    session: Session,
    *,
    device_id: int,
    since: float,
    cutoff: float,
    bucket_s: float,
    max_rows: int,
    max_gap_s: float | None = None,
) -> tuple[int, float]:
    """Thin one slice of one device's samples: :func:`prune_power_samples` from ``since``
    over about ``max_rows`` samples, up to a bucket's start (or ``cutoff``). Returns (rows
    deleted, where the next slice begins: ``cutoff`` once the device is done).

    Slices in turn, each in its own transaction, thin as one pass over [since, cutoff)
    does: a slice ends where a bucket begins, so a bucket is never split; the last sample
    before a slice (which the previous slice kept, holding the cumulative energy up to the
    slice's first sample) and the first after it are read as context and never thinned; and
    a run or epoch edge between a slice's last sample and the next one keeps both. A slice
    without a step of a second or less (all of it thinned already) reads steps longer than
    ``max_gap_s`` as gaps, not by a period estimated from its thinned steps.
    """
    if since >= cutoff:
        return 0, cutoff
    mine = PowerSample.device_id == device_id
    nth = session.scalar(
        select(PowerSample.t)
        .where(mine, PowerSample.t >= since, PowerSample.t < cutoff)
        .order_by(PowerSample.t)
        .offset(max(1, max_rows))
        .limit(1)
    )
    until = cutoff
    if nth is not None:
        bucket = math.floor(nth / bucket_s)
        if bucket * bucket_s <= since:  # more than max_rows in one bucket: all of the bucket
            bucket += 1
        until = min(cutoff, bucket * bucket_s)
        if until <= since:  # rounding (a bucket not a whole number of seconds): go on anyway
            until = min(cutoff, nth)
    deleted = _prune_device(
        session,
        device_id,
        since=since,
        until=until,
        cutoff=cutoff,
        bucket_s=bucket_s,
        protected=_protected(session, cutoff=cutoff),
        max_gap_s=max_gap_s,
    )
    session.flush()
    return deleted, until


def _protected(session: Session, *, cutoff: float) -> list[tuple[float, float]]:
    """The windows whose samples keep full resolution: runs still running, or that finished
    after ``cutoff``."""
    return [
        (a, b if b is not None else float("inf"))
        for a, b in session.execute(
            select(Run.created_at, Run.finished_at).where(
                or_(Run.finished_at.is_(None), Run.finished_at >= cutoff), Run.created_at < cutoff
            )
        )
    ]


def _prune_device(
    session: Session,
    dev: int,
    *,
    since: float,
    until: float,
    cutoff: float,
    bucket_s: float,
    protected: list[tuple[float, float]],
    max_gap_s: float | None = None,
) -> int:
    """Thin one device's samples in [since, until) (``until`` ≤ ``cutoff``, the pass's)."""
    mine = PowerSample.device_id == dev
    cols = (PowerSample.t, PowerSample.power_w, PowerSample.energy_j)
    inside = session.execute(
        select(*cols)
        .where(mine, PowerSample.t >= since, PowerSample.t < until)
        .order_by(PowerSample.t)
    ).all()
    if not inside:
        return 0
    before = session.execute(
        select(*cols).where(mine, PowerSample.t < since).order_by(PowerSample.t.desc()).limit(1)
    ).all()
    after = session.execute(
        select(*cols).where(mine, PowerSample.t >= until).order_by(PowerSample.t).limit(1)
    ).all()
    rows: list[Sample] = [(r[0], r[1], r[2]) for r in (*before, *inside, *after)]
    thinnable = [
        bool(before) <= i < len(rows) - len(after)
        and not any(a <= rows[i][0] <= b for a, b in protected)
        for i in range(len(rows))
    ]
    # the edges up to the next sample: one between the last sample and it keeps both (a
    # pass's edges end at its cutoff)
    edges = _edge_times(session, since=since, cutoff=min(cutoff, after[0][0]) if after else cutoff)
    doomed, updates = _thin_device(rows, thinnable, bucket_s, edges, max_gap_s=max_gap_s)
    for i in range(0, len(doomed), 500):
        session.execute(delete(PowerSample).where(mine, PowerSample.t.in_(doomed[i : i + 500])))
    for t, p, e in updates:
        session.execute(
            update(PowerSample).where(mine, PowerSample.t == t).values(power_w=p, energy_j=e)
        )
    return len(doomed)


def _edge_times(session: Session, *, since: float, cutoff: float) -> list[float]:
    """Starts and ends of runs, and ends of epochs, in [since, cutoff): the samples around
    them are kept, so a counter's energy over a run or an epoch stays exact."""
    out: list[float] = []
    for a, b in session.execute(
        select(Run.created_at, Run.finished_at).where(
            Run.created_at < cutoff, or_(Run.finished_at.is_(None), Run.finished_at >= since)
        )
    ):
        out += [a] if b is None else [a, b]
    out += session.scalars(select(Epoch.t).where(Epoch.t >= since, Epoch.t < cutoff)).all()
    return sorted(t for t in out if since <= t < cutoff)


def _thin_device(
    rows: list[Sample],
    thinnable: list[bool],
    bucket_s: float,
    edges: list[float],
    *,
    max_gap_s: float | None = None,
) -> tuple[list[float], list[tuple[float, float | None, float | None]]]:
    """(times to delete, (t, power_w, energy_j) to write) for one device's rows in time
    order; ``thinnable[i]``: row i may go. ``max_gap_s``: the longest step bridged where no
    step is a second or less (else estimated from the steps)."""
    n = len(rows)
    ts = [r[0] for r in rows]
    steps = [b - a for a, b in itertools.pairwise(ts)]
    short = sorted(s for s in steps if s <= 1.0)
    if short or max_gap_s is None:
        short = short or sorted(steps) or [0.1]
        gap = max_gap(short[len(short) // 2])  # the rule the energy model reads them by
    else:
        gap = max_gap_s
    curve = EnergyCurve(rows, max_gap_s=gap)
    # the energy of each step, None where the model counts nothing (a gap, a reset)
    index = {t: k for k, t in enumerate(curve.ts)}
    energy: list[float | None] = []
    legacy: list[bool] = []
    for i in range(1, n):
        a, b = index.get(ts[i - 1]), index.get(ts[i])
        legacy.append(False)
        if a is not None and b is not None and curve.seg[a] == curve.seg[b]:
            energy.append(curve.cum[b] - curve.cum[a])
        elif _legacy_thinned(rows, steps, i, gap, bucket_s):
            legacy[-1] = True
            (_ta, pa, ea), (_tb, pb, eb) = rows[i - 1], rows[i]
            if ea is not None and eb is not None:
                energy.append(eb - ea if eb >= ea else None)
            else:
                energy.append(0.5 * (pa + pb) * steps[i - 1])  # type: ignore[operator]
        else:
            energy.append(None)
    keep = [True] * n
    last_bucket: int | None = None
    for i in range(n):
        if not thinnable[i]:
            last_bucket = None  # the first thinnable row after a kept stretch stays
            continue
        bucket = int(ts[i] // bucket_s)
        # a row beside a gap or a reset stays, and so does the last (nothing after it holds
        # the energy of the samples thinned before it)
        bounds = (i > 0 and energy[i - 1] is None) or i + 1 == n or energy[i] is None
        if bucket != last_bucket or bounds:
            last_bucket = bucket
        else:
            keep[i] = False
    for t in edges:  # the sample at an edge, else the two around it
        j = bisect.bisect_left(ts, t)
        for k in (j,) if j < n and ts[j] == t else (j - 1, j):
            if 0 <= k < n:
                keep[k] = True
    kept = [i for i in range(n) if keep[i]]
    # merged[k]: kept[k] -> kept[k + 1] stands for thinned samples: some go now, an older
    # version thinned it unmarked, or it was marked before (its mark is written anew)
    merged = [
        j - i > 1 or legacy[i] or thinned_step(rows[i], rows[j])
        for i, j in itertools.pairwise(kept)
    ]
    power_only = any(p is not None and e is None for _t, p, e in rows)
    new_e = [r[2] for r in rows]
    if power_only:  # the energy retention integrated, carried from row to row
        cur: float | None = None
        for k, i in enumerate(kept):
            span = [energy[j] for j in range(kept[k - 1], i)] if k else []
            joined = bool(span) and all(x is not None for x in span)
            need = (k > 0 and merged[k - 1]) or (k < len(merged) and merged[k])
            if cur is not None and joined and (need or rows[i][2] is not None):
                value = cur + sum(span)  # type: ignore[arg-type]
                old = rows[i][2]
                same = old is not None and abs(value - old) <= 1e-9 * max(1.0, abs(old))
                new_e[i] = old if same else value
            elif need and new_e[i] is None:
                new_e[i] = 0.0
            cur = new_e[i]
    new_p = [r[1] for r in rows]
    for k in range(len(kept) - 1):
        i, j = kept[k], kept[k + 1]
        if merged[k] and new_e[i] is not None and new_e[j] is not None and thinnable[i]:
            new_p[i] = (new_e[j] - new_e[i]) / (ts[j] - ts[i])  # type: ignore[operator]
    doomed = [ts[i] for i in range(n) if not keep[i]]
    updates = [
        (ts[i], new_p[i], new_e[i])
        for i in kept
        if (new_p[i], new_e[i]) != (rows[i][1], rows[i][2])
    ]
    return doomed, updates


def _legacy_thinned(
    rows: list[Sample], steps: list[float], i: int, max_gap: float, bucket_s: float
) -> bool:
    """Whether the step into row i is one an older version thinned without marking it: no
    longer than two buckets, both rows with power, and a neighbouring step as long and
    unmarked too (a stretch thinned the old way, not a lone stall)."""
    s = steps[i - 1]
    if not max_gap < s <= 2.0 * bucket_s + max_gap or rows[i - 1][1] is None or rows[i][1] is None:
        return False
    near = [k for k in (i - 2, i) if 0 <= k < len(steps) and steps[k] > max_gap]
    return any(not thinned_step(rows[k], rows[k + 1]) for k in near)


def add_run_shares(session: Session, *, rows: Sequence[dict[str, Any]]) -> None:
    """Store share rows; a row whose key is stored already replaces it (the later one of a
    batch wins too: PostgreSQL refuses one statement that updates a row twice). Rows of a
    run deleted meanwhile are left out: their foreign key would fail the sampler's whole
    write, power readings and all, on every retry."""
    if rows:
        last = {(r["run_id"], r["node"], r["rank"], r["kind"], r["t0"]): r for r in rows}
        ids = {r["run_id"] for r in last.values()}
        kept = set(session.scalars(select(Run.id).where(Run.id.in_(ids))))
        if kept:
            session.execute(
                _upsert_shares(session), [r for r in last.values() if r["run_id"] in kept]
            )


def delete_run(session: Session, *, run_id: str) -> None:
    """Delete an ended run and everything stored of it (batches, per-sample losses, epochs,
    tags, ranks, shares, idle baselines: the foreign keys cascade).

    Raises:
        RunNotFound: no run has that id.
        RunRunning: the run is still running (end it first: its client would go on
            sending to it).
    """
    run = get_run(session, run_id=run_id)
    if run.status == "running":
        raise RunRunning(
            f"run {run_id!r} is still running: finish it (PATCH status) or let the reaper "
            "end it, then delete it",
            details={"run_id": run_id},
        )
    session.execute(delete(Run).where(Run.id == run_id))


ShareKey = tuple[str, int, str]  # (node, rank; -1 the node's union, -2 its split; kind)
SharePiece = tuple[float, float, float]  # (t0, t1, share)


def run_share_rows(session: Session, *, run_id: str) -> dict[ShareKey, list[SharePiece]]:
    """(node, rank, kind) -> [(t0, t1, share)] ordered by t0, including the sampler's rows
    not committed yet (see power_window; a pending row replaces a stored one of its key)."""
    out: dict[ShareKey, dict[float, SharePiece]] = {}
    q = select(
        RunShare.node, RunShare.rank, RunShare.kind, RunShare.t0, RunShare.t1, RunShare.share
    ).where(RunShare.run_id == run_id)
    for node, rank, kind, t0, t1, share in session.execute(q):
        out.setdefault((node, rank, kind), {})[t0] = (t0, t1, share)
    for node, rank, kind, t0, t1, share in session.info.get("unstored_shares", {}).get(run_id, ()):
        out.setdefault((node, rank, kind), {})[t0] = (t0, t1, share)
    return {k: sorted(v.values()) for k, v in out.items()}


def run_shares(session: Session, *, run_id: str) -> dict[ShareKey, list[tuple[float, float]]]:
    """(node, rank, kind) -> [(interval start, share)] ordered by time (see run_share_rows)."""
    return {
        k: [(t0, share) for t0, _t1, share in v]
        for k, v in run_share_rows(session, run_id=run_id).items()
    }


def set_idle_power(session: Session, *, device_id: int, idle_power_w: float) -> None:
    session.execute(update(Device).where(Device.id == device_id).values(idle_power_w=idle_power_w))


# --- node leases: one live daemon per node name ------------------------------------------


def node_lease(session: Session, node: str) -> tuple[str, int, float, float, str | None] | None:
    """``node``'s lease as (host, pid, started_at, seen_at, proc), or None."""
    lease = session.get(NodeLease, node)
    if lease is None:
        return None
    return lease.host, lease.pid, lease.started_at, lease.seen_at, lease.proc


def take_node(
    session: Session,
    *,
    node: str,
    host: str,
    pid: int,
    started_at: float,
    proc: str | None,
    now: float,
    expect_seen_at: float | None,
) -> bool:
    """Take ``node``'s lease for this daemon if it is still as last read (renewed at
    ``expect_seen_at``; None: no lease); False if it changed meanwhile. Two daemons that
    both insert it: the second's commit fails (IntegrityError), and it reads again."""
    lease = session.get(NodeLease, node, with_for_update=True)
    if (None if lease is None else lease.seen_at) != expect_seen_at:
        return False
    if lease is None:
        session.add(
            NodeLease(node=node, host=host, pid=pid, started_at=started_at, seen_at=now, proc=proc)
        )
        session.flush()
    else:
        lease.host, lease.pid, lease.started_at = host, pid, started_at
        lease.seen_at, lease.proc = now, proc
    return True


def _lease_is(node: str, host: str, pid: int, started_at: float) -> Any:
    return and_(
        NodeLease.node == node,
        NodeLease.host == host,
        NodeLease.pid == pid,
        NodeLease.started_at == started_at,
    )


def renew_node(
    session: Session, *, node: str, host: str, pid: int, started_at: float, now: float
) -> bool:
    """Renew this daemon's lease; False if it no longer holds it (taken after it lapsed)."""
    res = session.execute(
        update(NodeLease).where(_lease_is(node, host, pid, started_at)).values(seen_at=now)
    )
    return cast(CursorResult[Any], res).rowcount == 1


def release_node(session: Session, *, node: str, host: str, pid: int, started_at: float) -> None:
    session.execute(delete(NodeLease).where(_lease_is(node, host, pid, started_at)))
