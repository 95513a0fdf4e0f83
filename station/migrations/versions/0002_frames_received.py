"""An index on when frames arrived, for the retention job (unlabelled frames older than N days, every group).

Revision ID: 0002
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("frames_received", "frames", ["received"])


def downgrade() -> None:
    op.drop_index("frames_received", table_name="frames")
