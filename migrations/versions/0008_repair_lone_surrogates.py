"""repair lone surrogates in stored JSON: a run list that answers 500 answers again

Before 0983a7c the daemon accepted a run config (or an epoch's metric name) holding a lone
surrogate such as ``"\\ud800"``: valid JSON, but no Unicode text. SQLite stored it; every
answer that held it then failed to serialise, so one such run turned *every* run list into
a 500. The API refuses such text now; this revision repairs what was stored before, by
replacing each lone surrogate with U+FFFD (the replacement character), the one code unit
that never was text. Everything else in the row is kept as it was.

PostgreSQL's json type refuses a lone surrogate on input, so only SQLite stores can hold
one: on PostgreSQL this revision changes nothing.

Revision ID: 0008_repair_lone_surrogates
Revises: 0007_bigint_counts
Create Date: 2026-12-03 11:40:00
"""

from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_repair_lone_surrogates"
down_revision = "0007_bigint_counts"
branch_labels = None
depends_on = None

# json.loads pairs a high surrogate with the low one after it into one code point, so any
# surrogate left in a decoded str is a lone one
_LONE = re.compile("[\ud800-\udfff]")


def _repaired(node: Any) -> Any:
    if isinstance(node, str):
        return _LONE.sub("\ufffd", node)
    if isinstance(node, dict):
        return {_repaired(k): _repaired(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_repaired(v) for v in node]
    return node


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    # (table, JSON column, primary key columns); SQLAlchemy's JSON is stored as json.dumps
    # text with ASCII escapes, so only rows whose text holds a \u escape of a surrogate
    # (\ud800-\udfff; LIKE is case-blind for ASCII) can need a repair
    for table, column, keys in (
        ("runs", "config", ("id",)),
        ("epochs", "metrics", ("run_id", "epoch")),
    ):
        select = sa.text(
            f"SELECT {', '.join(keys)}, {column} FROM {table} "
            f"WHERE {column} LIKE '%\\ud8%' OR {column} LIKE '%\\ud9%' "
            f"OR {column} LIKE '%\\uda%' OR {column} LIKE '%\\udb%' "
            f"OR {column} LIKE '%\\udc%' OR {column} LIKE '%\\udd%' "
            f"OR {column} LIKE '%\\ude%' OR {column} LIKE '%\\udf%'"
        )
        update = sa.text(
            f"UPDATE {table} SET {column} = :value WHERE "
            + " AND ".join(f"{k} = :{k}" for k in keys)
        )
        for row in bind.execute(select).all():
            *key_values, raw = row
            try:
                value = json.loads(raw)
            except (TypeError, ValueError):
                continue  # not JSON text: nothing this revision knows how to repair
            fixed = _repaired(value)
            if fixed != value:
                params = dict(zip(keys, key_values, strict=True))
                bind.execute(update, {**params, "value": json.dumps(fixed)})


def downgrade() -> None:
    pass  # a repair: the lone surrogates are not put back
