"""Indexes in ``projections.query``'s string order for task lists and project searches.

``Query`` orders and compares strings with ``COLLATE "C"`` on PostgreSQL (code-point
order, as SQLite's BINARY), and a btree in the database's default collation cannot serve
``ORDER BY ... COLLATE "C"``. EXPLAIN showed task lists and pages across projects
(ordered by ``created_at``, then ``task_id``; no index led with ``created_at``)
reading ``tasks`` with a Seq Scan and sorting every visible row for each page, and
project lists by name reading ``projects`` with a Seq Scan and sorting them
(``tests/projections/test_query_plans.py``). These two indexes serve those
orders; on PostgreSQL their string columns are in the "C" collation, SQLite ignores
``postgresql_ops`` and builds plain ones (its BINARY order already is code-point order).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

C = 'COLLATE "C"'

# (name, table, columns, the columns in the "C" collation on PostgreSQL)
INDEXES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("ix_tasks_created_at_task_id", "tasks", ("created_at", "task_id"), ("task_id",)),
    ("ix_projects_name_project_id", "projects", ("name", "project_id"), ("name", "project_id")),
)


def upgrade() -> None:
    for name, table, columns, collated in INDEXES:
        op.create_index(
            name, table, list(columns), postgresql_ops=dict.fromkeys(collated, C)
        )


def downgrade() -> None:
    for name, table, _columns, _collated in reversed(INDEXES):
        op.drop_index(name, table_name=table)
