"""Frames name their part: a triggered camera's trigger count (docs/cameras.md), what the verdict to the line names.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("frames", sa.Column("part", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("frames", "part")
