"""Read models: users, projects, tasks, sessions, project stats, user activity.

Users come with their roles and permissions, projects with their members. Every table is written by one projector only (``projections.readmodels``); a rebuild
fills shadow copies of them and swaps them in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
ID = sa.String(64)

# table -> ((index columns, unique), ...); names follow ix_<table>_<columns>.
INDEXES: dict[str, tuple[tuple[tuple[str, ...], bool], ...]] = {
    "users": ((("email_lower",), False), (("username_lower",), False), (("created_at",), False)),
    "user_roles": ((("role",), False),),
    "user_permissions": ((("permission",), False),),
    "projects": (
        (("owner_id",), False),
        (("visibility",), False),
        (("name",), False),
        (("created_at",), False),
    ),
    "project_members": ((("user_id",), False),),
    "tasks": (
        (("project_id", "status"), False),
        (("project_id", "created_at"), False),
        (("project_id", "priority_rank"), False),
        (("assignee_id", "status"), False),
        (("created_by",), False),
        (("due_at",), False),
    ),
    "sessions": (
        (("token_hash",), True),
        (("user_id", "started_at"), False),
        (("expires_at",), False),
        (("last_seen_at",), False),
    ),
    "project_stats": (),
    "user_activity": ((("last_active_at",), False),),
}


def _index_name(table: str, columns: tuple[str, ...]) -> str:
    return f"ix_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("email_lower", sa.String(254), nullable=False),
        sa.Column("username", sa.String(32), nullable=False),
        sa.Column("username_lower", sa.String(32), nullable=False),
        sa.Column("display_name", sa.String(100)),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("locked_until", TIMESTAMP),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("last_login_at", TIMESTAMP),
        sa.Column("sessions_valid_after", TIMESTAMP),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )
    op.create_table(
        "user_roles",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "role", name="pk_user_roles"),
    )
    op.create_table(
        "user_permissions",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("permission", sa.String(50), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "permission", name="pk_user_permissions"),
    )
    op.create_table(
        "projects",
        sa.Column("project_id", ID, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("visibility", sa.String(20), nullable=False),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("archived_at", TIMESTAMP),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("project_id", name="pk_projects"),
    )
    op.create_table(
        "project_members",
        sa.Column("project_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("added_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("project_id", "user_id", name="pk_project_members"),
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", ID, nullable=False),
        sa.Column("project_id", ID, nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("priority", sa.String(20), nullable=False),
        sa.Column("priority_rank", sa.SmallInteger(), nullable=False),
        sa.Column("due_at", TIMESTAMP),
        sa.Column("assignee_id", ID),
        sa.Column("created_by", ID, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("task_id", name="pk_tasks"),
    )
    op.create_table(
        "sessions",
        sa.Column("session_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP),
        sa.Column("revoked_by", ID),
        sa.Column("revoked_reason", sa.String(50)),
        sa.PrimaryKeyConstraint("session_id", name="pk_sessions"),
    )
    op.create_table(
        "project_stats",
        sa.Column("project_id", ID, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("todo", sa.Integer(), nullable=False),
        sa.Column("in_progress", sa.Integer(), nullable=False),
        sa.Column("review", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("cancelled", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("project_id", name="pk_project_stats"),
    )
    op.create_table(
        "user_activity",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("logins", sa.Integer(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("tasks_created", sa.Integer(), nullable=False),
        sa.Column("tasks_completed", sa.Integer(), nullable=False),
        sa.Column("tasks_assigned", sa.Integer(), nullable=False),
        sa.Column("last_active_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_activity"),
    )
    for table, indexes in INDEXES.items():
        for columns, unique in indexes:
            op.create_index(_index_name(table, columns), table, list(columns), unique=unique)


def downgrade() -> None:
    for table, indexes in reversed(INDEXES.items()):
        for columns, _unique in indexes:
            op.drop_index(_index_name(table, columns), table_name=table)
        op.drop_table(table)
