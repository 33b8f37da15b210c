"""node_leases: one live daemon per node name in a store

Devices are keyed by (node, name). Two daemons started with one node name on one store (two
data dirs on one host sharing a PostgreSQL database, or containers with one host name)
wrote the same devices' samples twice over and split every run's share between them: a
5 s run at 100 W was stored as 11.8 J. A daemon now claims its node at start, renews the
claim once a reaper pass and releases it at stop; a second one is refused while the first
is alive.

Revision ID: 0009_node_leases
Revises: 0008_repair_lone_surrogates
Create Date: 2026-12-03 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_node_leases"
down_revision = "0008_repair_lone_surrogates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_leases",
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("node", name=op.f("pk_node_leases")),
    )


def downgrade() -> None:
    op.drop_table("node_leases")
