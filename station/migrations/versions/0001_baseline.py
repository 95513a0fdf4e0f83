"""Baseline: every table as the station made them before it had migrations, the columns added since, and the
append-only audit log. It runs on an empty database and on one an earlier station made (CREATE ... IF NOT
EXISTS, columns added only where missing), which is how such a database joins the migrations.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE IF NOT EXISTS frames (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    device TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    source TEXT,
    decision TEXT NOT NULL,
    predicted TEXT,
    confidence DOUBLE PRECISION,
    ood_score DOUBLE PRECISION,
    reasons TEXT NOT NULL,
    details TEXT NOT NULL,
    quality TEXT NOT NULL,
    gate_version TEXT NOT NULL,
    backbone_hash TEXT NOT NULL,
    jpeg_path TEXT NOT NULL,
    heatmap_path TEXT,
    audit BIGINT NOT NULL DEFAULT 0,
    features BYTEA,
    label_kind TEXT,
    label TEXT,
    labelled_by TEXT,
    labelled_at DOUBLE PRECISION,
    boxes TEXT,
    size TEXT,
    candidates BYTEA
);
CREATE INDEX IF NOT EXISTS frames_queue ON frames (grp, label_kind, received);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    received DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size BIGINT NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    stats TEXT
);
CREATE TABLE IF NOT EXISTS device_stats (
    device TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    stats TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_stats_ts ON device_stats (device, ts);
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    gate_version TEXT NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    device TEXT,
    details TEXT NOT NULL,
    prev_hash TEXT,
    hash TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS retrains (
    grp TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    result TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gates (
    version TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    serial BIGINT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    role TEXT NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    pw_hash TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
"""
# columns that stations before this revision added as they grew: (table, ((column, type), ...))
LATER_COLUMNS = (
    ("audit", (("prev_hash", "TEXT"), ("hash", "TEXT"))),  # the hash chain
    ("frames", (("boxes", "TEXT"), ("size", "TEXT"), ("candidates", "BYTEA"))),  # detectors
)
# the audit log is append-only: the database itself refuses to change or delete a row. (SQLite's INSERT OR
# REPLACE deletes the old row without firing a delete trigger: the insert trigger refuses it first.)
SQLITE_APPEND_ONLY = """
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_replace BEFORE INSERT ON audit
WHEN EXISTS (SELECT 1 FROM audit WHERE id = NEW.id)
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
# PostgreSQL orders the audit chain by a sequence column of its own
POSTGRES_APPEND_ONLY = """
ALTER TABLE audit ADD COLUMN IF NOT EXISTS seq BIGSERIAL;
CREATE OR REPLACE FUNCTION bouncer_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$;
DROP TRIGGER IF EXISTS audit_no_change ON audit;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
FOR EACH ROW EXECUTE FUNCTION bouncer_audit_append_only();
DROP TRIGGER IF EXISTS audit_no_truncate ON audit;
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
FOR EACH STATEMENT EXECUTE FUNCTION bouncer_audit_append_only();
"""


def _run(sql: str) -> None:
    """Statement by statement, as the driver's own SQL (no bind-parameter parsing); each ends with `;` and a line
    end, the semicolons inside trigger bodies do not."""
    bind = op.get_bind()
    for statement in sql.split(";\n"):
        if statement.strip():
            bind.exec_driver_sql(statement)


def _columns(table: str) -> set[str]:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        return {r[1] for r in bind.exec_driver_sql(f"PRAGMA table_info({table})")}
    rows = bind.exec_driver_sql(
        f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' "
        "AND table_schema = current_schema()"
    )
    return {r[0] for r in rows}


def upgrade() -> None:
    _run(TABLES)
    for table, added in LATER_COLUMNS:
        have = _columns(table)
        for col, kind in added:
            if col not in have:
                op.get_bind().exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")
    _run(SQLITE_APPEND_ONLY if op.get_bind().dialect.name == "sqlite" else POSTGRES_APPEND_ONLY)


def downgrade() -> None:
    raise NotImplementedError("the baseline is not undone: restore the database from a backup instead")
