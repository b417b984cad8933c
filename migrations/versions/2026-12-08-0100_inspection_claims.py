"""inspection claims: when a worker started inspecting an upload

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 01:00:00

Inspections are picked fairly across tenants (app/services/stored.py, claim_next_inspection): a worker claims
the upload it inspects by setting inspection_started_at with a conditional UPDATE.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("model", "dataset"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("inspection_started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("dataset", "model"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("inspection_started_at")
