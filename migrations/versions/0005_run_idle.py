"""run_idle: each device's idle baseline as it stood when a run ended

A finished run's energy above idle used the device's current baseline, which every daemon
start measures anew, so the figure of a finished run changed from session to session.
Runs that ended before this revision have no rows and keep the current baseline.

Revision ID: 0005_run_idle
Revises: 0004_nodes_and_ranks
Create Date: 2026-12-01 16:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_run_idle"
down_revision = "0004_nodes_and_ranks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_idle",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("idle_power_w", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_run_idle_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_idle_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "device_id", name=op.f("pk_run_idle")),
    )


def downgrade() -> None:
    op.drop_table("run_idle")
