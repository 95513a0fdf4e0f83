"""The station's schema, kept with alembic (the revisions in station/migrations/versions). Every station start
and `bouncer station migrate` bring the database to the newest revision: on PostgreSQL in one transaction under
an advisory lock (workers starting together migrate once), on SQLite under a file lock. A database at a revision
this bouncer does not know (migrated by a newer one) is refused rather than written with an older idea of it."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bouncer.runtime.errors import BouncerError
from bouncer.station.db import safe_url

MIGRATIONS = Path(__file__).parent / "migrations"


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_config()).get_current_head())


def _engine(database: str, root: Path) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    if not database:
        return create_engine(f"sqlite:///{root / 'station.sqlite'}", poolclass=NullPool)
    return create_engine(make_url(database).set(drivername="postgresql+psycopg"), poolclass=NullPool)


@contextmanager
def _sqlite_lock(database: str, root: Path) -> Iterator[None]:
    if database:  # PostgreSQL: the advisory lock in migrations/env.py
        yield
        return
    with open(root / "station.sqlite.migrate.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _where(database: str, root: Path) -> str:
    return safe_url(database) if database else str(root / "station.sqlite")


def current(database: str, root: Path) -> str | None:
    """The database's revision; None for one never migrated (empty, or made before migrations)."""
    from alembic.runtime.migration import MigrationContext

    engine = _engine(database, root)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:
        raise _error(database, root, exc) from None
    finally:
        engine.dispose()


def upgrade(database: str, root: Path) -> tuple[str | None, str]:
    """Bring the database to the newest revision; returns (revision before, revision now)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    known, newest = {rev.revision for rev in script.walk_revisions()}, str(script.get_current_head())
    engine = _engine(database, root)
    try:
        with _sqlite_lock(database, root), engine.begin() as conn:
            before = MigrationContext.configure(conn).get_current_revision()
            if before is not None and before not in known:
                raise BouncerError(
                    f"station database {_where(database, root)} is at schema revision {before}, which this bouncer "
                    f"does not know (its newest is {newest}): it was migrated by a newer bouncer; upgrade this one"
                )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return before, newest
    except BouncerError:
        raise
    except Exception as exc:
        raise _error(database, root, exc) from None
    finally:
        engine.dispose()


def _error(database: str, root: Path, exc: Exception) -> BouncerError:
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if not database:
        return BouncerError(f"{root / 'station.sqlite'}: unusable station database ({first})")
    return BouncerError(f"station.database {safe_url(database)}: cannot set up the station's tables ({first})")
