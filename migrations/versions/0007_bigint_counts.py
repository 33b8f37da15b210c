"""64-bit integers on PostgreSQL for everything a client numbers or counts

The API takes integers up to 2**53 - 1, but PostgreSQL's INTEGER is 32-bit: a batch with
seq 2**31 (a rank's k-th batch is k * world_size + rank, 2**31 after 262 144 steps on 8 192
ranks), an n_train of three billion, or such a step or epoch, was a 500. SQLite's INTEGER is
64-bit already: there the revision changes nothing (and copies no table).

On PostgreSQL each ALTER rewrites its table: on a store with many batches the upgrade takes
a while, once, under the migration lock.

Revision ID: 0007_bigint_counts
Revises: 0006_run_seen_at
Create Date: 2026-12-03 08:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_bigint_counts"
down_revision = "0006_run_seen_at"
branch_labels = None
depends_on = None

COLUMNS = {
    "runs": (
        "pid",
        "n_train",
        "world_size",
        "n_batches",
        "n_epochs",
        "n_nonfinite",
        "last_seq",
    ),
    "batches": ("seq", "n", "epoch", "step", "rank"),
    "run_ranks": ("rank", "pid", "local_rank"),
    "sample_losses": ("seq", "count"),
    "epochs": ("epoch",),
    "run_shares": ("rank",),
}


def _alter(to: type[sa.types.TypeEngine[int]], was: type[sa.types.TypeEngine[int]]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            op.alter_column(table, column, type_=to(), existing_type=was())


def upgrade() -> None:
    _alter(sa.BigInteger, sa.Integer)


def downgrade() -> None:
    _alter(sa.Integer, sa.BigInteger)
