"""nodes and ranks: many daemons on one store, one run over many ranks

Devices, runs and run shares carry the node whose daemon wrote them (a device name is
unique per node, not per store); batches carry their rank; ``run_ranks`` lists the ranks
of a distributed run. Rows written before this revision were written by the one daemon
that used the store, so they are given this host's name, which is a daemon's default node.

Revision ID: 0004_nodes_and_ranks
Revises: 0003
Create Date: 2026-11-30 05:50:00
"""

from __future__ import annotations

import socket

import sqlalchemy as sa
from alembic import op

revision = "0004_nodes_and_ranks"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    node = socket.gethostname()[:255]
    op.create_table(
        "run_ranks",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("local_rank", sa.Integer(), nullable=True),
        sa.Column("joined_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_ranks_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "rank", name=op.f("pk_run_ranks")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("world_size", sa.Integer(), nullable=True))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rank", sa.Integer(), nullable=True))

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node", sa.String(length=255), nullable=True))
    with op.batch_alter_table("run_shares", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("rank", sa.Integer(), nullable=True))
    op.execute(sa.text("UPDATE devices SET node = :n").bindparams(n=node))
    op.execute(sa.text("UPDATE runs SET node = :n").bindparams(n=node))
    op.execute(sa.text("UPDATE run_shares SET node = :n, rank = -1").bindparams(n=node))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.alter_column("node", existing_type=sa.String(length=255), nullable=False)
        batch_op.drop_constraint("uq_devices_name", type_="unique")
        batch_op.create_unique_constraint(op.f("uq_devices_node_name"), ["node", "name"])
    with op.batch_alter_table("run_shares", schema=None) as batch_op:
        batch_op.alter_column("node", existing_type=sa.String(length=255), nullable=False)
        batch_op.alter_column("rank", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_constraint("pk_run_shares", type_="primary")
        batch_op.create_primary_key("pk_run_shares", ["run_id", "node", "rank", "kind", "t0"])


def downgrade() -> None:
    # Loses the per-rank shares, every node's devices but one per name, and rank labels:
    # a store shared by several nodes cannot be expressed in the older schema.
    op.execute(sa.text("DELETE FROM run_shares WHERE rank <> -1"))
    op.execute(
        sa.text(
            "DELETE FROM run_shares WHERE EXISTS (SELECT 1 FROM run_shares o "
            "WHERE o.run_id = run_shares.run_id AND o.kind = run_shares.kind "
            "AND o.t0 = run_shares.t0 AND o.node < run_shares.node)"
        )
    )
    op.execute(
        sa.text(
            "DELETE FROM devices WHERE EXISTS (SELECT 1 FROM devices o "
            "WHERE o.name = devices.name AND o.id < devices.id)"
        )
    )
    with op.batch_alter_table("run_shares", schema=None) as batch_op:
        batch_op.drop_constraint("pk_run_shares", type_="primary")
        batch_op.create_primary_key("pk_run_shares", ["run_id", "kind", "t0"])
        batch_op.drop_column("rank")
        batch_op.drop_column("node")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_constraint("uq_devices_node_name", type_="unique")
        batch_op.create_unique_constraint("uq_devices_name", ["name"])
        batch_op.drop_column("node")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("rank")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("world_size")
        batch_op.drop_column("node")
    op.drop_table("run_ranks")
