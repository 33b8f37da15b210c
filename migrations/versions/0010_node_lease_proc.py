"""node_leases.proc: which process holds a node's lease, beyond its host and pid

A daemon took a node whose holder ran on its host when the holder's pid did not answer.
Two containers that share a host name each see only their own pid namespace (the other's
daemon looked dead), and a container's daemon is pid 1 again after a restart (the dead one
looked alive). The holder is now named by boot id, pid namespace and start time: a daemon
takes the node at once only from a holder it can see has exited; otherwise it waits for
the holder to renew (alive: refused) or for its lease to lapse.

Revision ID: 0010_node_lease_proc
Revises: 0009_node_leases
Create Date: 2026-12-03 13:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_node_lease_proc"
down_revision = "0009_node_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("proc", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("node_leases", schema=None) as batch_op:
        batch_op.drop_column("proc")
