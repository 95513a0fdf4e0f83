"""Alembic's environment for the station: station/schema.py hands it an open connection; it runs the revisions in
one transaction, under the schema lock on PostgreSQL (workers starting together migrate one at a time)."""

from alembic import context

from bouncer.station.db import SCHEMA_LOCK

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
    context.run_migrations()
