"""The broker identities the station issues: one per device and per station worker (station/broker_auth.py).

Revision ID: 0003
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE IF NOT EXISTS broker_identities (name TEXT PRIMARY KEY, kind TEXT NOT NULL, "
        "pw_hash TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE broker_identities")
