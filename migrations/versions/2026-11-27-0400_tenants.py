"""tenants, API keys, retention marks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 04:00:00

Every row stored before tenancy existed goes to the built-in tenant `default` (what QAAS_AUTH=disabled
requests act as), so upgrading keeps everything visible to whoever used the service before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_TENANT_ID = "ten_default"
# Names SQLite's unnamed unique constraint on job.idempotency_key so that batch mode can drop it.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    op.create_table(
        "tenant",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.execute(
        sa.text(
            "INSERT INTO tenant (id, name, created_at) VALUES (:id, 'default', CURRENT_TIMESTAMP)"
        ).bindparams(id=DEFAULT_TENANT_ID)
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_key_tenant_id"), ["tenant_id"], unique=False)

    for table in ("model", "dataset"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("tenant_id", sa.String(length=40), nullable=False, server_default=DEFAULT_TENANT_ID)
            )
            batch_op.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        with op.batch_alter_table(table, schema=None) as batch_op:
            # No default from here on: code that forgets the tenant must fail, not file rows under `default`.
            batch_op.alter_column("tenant_id", server_default=None)
            batch_op.create_index(batch_op.f(f"ix_{table}_tenant_id"), ["tenant_id"], unique=False)
            batch_op.create_foreign_key(
                batch_op.f(f"fk_{table}_tenant_id_tenant"),
                "tenant",
                ["tenant_id"],
                ["id"],
                ondelete="RESTRICT",
            )

    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("job", schema=None, naming_convention=_NAMING if sqlite else None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant_id", sa.String(length=40), nullable=False, server_default=DEFAULT_TENANT_ID)
        )
        batch_op.drop_constraint(
            "uq_job_idempotency_key" if sqlite else "job_idempotency_key_key", type_="unique"
        )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.alter_column("tenant_id", server_default=None)
        batch_op.create_index(batch_op.f("ix_job_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_job_tenant_id_tenant"), "tenant", ["tenant_id"], ["id"], ondelete="RESTRICT"
        )
        batch_op.create_unique_constraint(
            "uq_job_tenant_id_idempotency_key", ["tenant_id", "idempotency_key"]
        )

    with op.batch_alter_table("artifact", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifact", schema=None) as batch_op:
        batch_op.drop_column("expired_at")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint("uq_job_tenant_id_idempotency_key", type_="unique")
        batch_op.drop_constraint(batch_op.f("fk_job_tenant_id_tenant"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_job_tenant_id"))
        batch_op.drop_column("tenant_id")
        batch_op.create_unique_constraint("job_idempotency_key_key", ["idempotency_key"])
    for table in ("dataset", "model"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"fk_{table}_tenant_id_tenant"), type_="foreignkey")
            batch_op.drop_index(batch_op.f(f"ix_{table}_tenant_id"))
            batch_op.drop_column("expired_at")
            batch_op.drop_column("tenant_id")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_key_tenant_id"))
    op.drop_table("api_key")
    op.drop_table("tenant")
