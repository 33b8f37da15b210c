"""runs.seen_at: a run's heartbeat that every daemon of a shared store can read

The reaper failed a running run after H3D_RUN_TIMEOUT_S without a request to *its own*
daemon. On a store shared by several nodes, a daemon that never served a run (or whose ranks
of it had finished) failed it while another node's daemon was still receiving its data. Each
reaper now writes the time of the last request it served for a run here, and every reaper
times a run from the latest heartbeat of any daemon. Existing rows start at NULL (no
heartbeat yet): a running run is then timed from the moment a daemon first sees it, as before.

Revision ID: 0006_run_seen_at
Revises: 0005_run_idle
Create Date: 2026-12-03 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_run_seen_at"
down_revision = "0005_run_idle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seen_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("seen_at")
