"""Tables. Every schema change goes through an Alembic revision in ``migrations/versions``.

No ``from __future__ import annotations`` here: SQLAlchemy would evaluate each ``Mapped[...]``
string again at class creation (about 3.5 ms of every daemon start).
"""

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The integers a client sends (sequence numbers, steps, epochs, sizes, pids, ranks) go up to
# the API's 2**53 - 1: 64-bit on PostgreSQL, where INTEGER is 32-bit (a rank's seq is
# k * world_size + rank, past 2**31 after 262 144 steps on 8 192 ranks). SQLite's INTEGER
# is 64-bit already, so the column stays INTEGER there (migration 0007).
BigInt = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    pid: Mapped[int | None] = mapped_column(BigInt)
    host: Mapped[str | None] = mapped_column(String(255))
    n_train: Mapped[int | None] = mapped_column(BigInt)
    # The node whose daemon created the run; a distributed run lists its ranks in run_ranks.
    node: Mapped[str | None] = mapped_column(String(255))
    world_size: Mapped[int | None] = mapped_column(BigInt)  # None: a single process
    # Denormalised counters, updated in the same transaction as the ingest they count.
    n_batches: Mapped[int] = mapped_column(BigInt, default=0)
    n_epochs: Mapped[int] = mapped_column(BigInt, default=0)
    n_nonfinite: Mapped[int] = mapped_column(BigInt, default=0)
    last_seq: Mapped[int | None] = mapped_column(BigInt)
    last_t: Mapped[float | None] = mapped_column(Float)
    # The run's heartbeat on a shared store: the clock of the daemon that last served a
    # request for it, at that request, as its reaper writes it every few seconds
    # (h3d/reaper.py). NULL: no daemon has written one yet.
    seen_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_runs_created_at_id", "created_at", "id"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_name", "name"),
    )


class RunTag(Base):
    __tablename__ = "run_tags"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)

    __table_args__ = (Index("ix_run_tags_tag", "tag"),)


class Batch(Base):
    __tablename__ = "batches"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInt, primary_key=True)
    t: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)  # NULL: sent as non-finite
    n: Mapped[int | None] = mapped_column(BigInt)
    epoch: Mapped[int | None] = mapped_column(BigInt)
    step: Mapped[int | None] = mapped_column(BigInt)
    phase: Mapped[str | None] = mapped_column(String(32))
    rank: Mapped[int | None] = mapped_column(BigInt)  # which rank of a distributed run

    __table_args__ = (Index("ix_batches_run_id_t", "run_id", "t"),)


class RunRank(Base):
    """One rank of a distributed run: where it ran, and whether it is done."""

    __tablename__ = "run_ranks"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(BigInt, primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(BigInt)
    local_rank: Mapped[int | None] = mapped_column(BigInt)
    joined_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    finished_at: Mapped[float | None] = mapped_column(Float)


class SampleLosses(Base):
    """Per-sample losses of one batch: float32 and int64 little-endian blobs, not rows."""

    __tablename__ = "sample_losses"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInt, primary_key=True)
    count: Mapped[int] = mapped_column(BigInt)
    losses: Mapped[bytes] = mapped_column(LargeBinary)  # float32; NaN marks a missing value
    indices: Mapped[bytes | None] = mapped_column(LargeBinary)  # int64


class Epoch(Base):
    __tablename__ = "epochs"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInt, primary_key=True)
    t: Mapped[float] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(32))
    accuracy: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(255))  # the daemon that samples it
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200), default="")
    uuid: Mapped[str | None] = mapped_column(String(100))
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    # Median power while no run was active (the idle baseline); None until measured.
    idle_power_w: Mapped[float | None] = mapped_column(Float)
    # How often the device's counter or power reading actually changes (measured or known).
    granularity_s: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("node", "name"),)


class RunIdle(Base):
    """A device's idle baseline as it stood when a run ended, so that the run's energy
    above idle stays what it was when later daemon sessions measure other baselines.
    ``idle_power_w`` None: no baseline was known then (the figure stays unknown)."""

    __tablename__ = "run_idle"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    idle_power_w: Mapped[float | None] = mapped_column(Float)


class PowerSample(Base):
    """One reading of one device (and so of the device's node). ``t`` is the sampler's
    monotonic-anchored Unix time."""

    __tablename__ = "power_samples"

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    t: Mapped[float] = mapped_column(Float, primary_key=True)
    power_w: Mapped[float | None] = mapped_column(Float)
    energy_j: Mapped[float | None] = mapped_column(Float)  # cumulative counter, if any


class RunShare(Base):
    """A run's share of a kind of device on one node over one sampler interval (process
    attribution). ``rank`` -1 is the measured share of the union of the run's processes on
    the node, ``rank`` -2 (``h3d.attribution.SPLIT_RANK``) its split where none was measured
    (together, what its devices are attributed by); ``rank`` r ≥ 0 is one rank's part."""

    __tablename__ = "run_shares"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    rank: Mapped[int] = mapped_column(BigInt, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)  # "cpu" | "gpu:<device>"
    t0: Mapped[float] = mapped_column(Float, primary_key=True)
    t1: Mapped[float] = mapped_column(Float)
    share: Mapped[float] = mapped_column(Float)


class NodeLease(Base):
    """Which daemon samples as ``node`` in this store. Devices are keyed by (node, name), so
    two live daemons with one node name would write one device's samples twice over and
    split every run's share of it: a daemon claims its node at start (refused while another
    live daemon holds it), renews the lease once a reaper pass, and releases it at stop."""

    __tablename__ = "node_leases"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(BigInt)
    started_at: Mapped[float] = mapped_column(Float)  # with host and pid: one daemon session
    seen_at: Mapped[float] = mapped_column(Float)  # renewed every reaper pass
    # "boot id/pid namespace/start time" of the holder (Linux; NULL elsewhere): says whether
    # the process pid names on this host is still the holder (migration 0010)
    proc: Mapped[str | None] = mapped_column(String(200))
