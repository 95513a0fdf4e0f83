"""The station's database schema as alembic revisions (versions/), applied by station/schema.py."""
