"""The station's database connection: SQLite in the data folder (the embedded default: the demo, one line) or
PostgreSQL (`station.database = "postgresql://..."`: many workers, many machines), behind one small interface so
the store's SQL is written once.

The SQL is the subset both engines share; `?` placeholders become `%s` for psycopg. What differs is here: how a
writer takes the one lock that orders the audit chain (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped
advisory lock) and the row order of the audit table. The tables themselves are alembic revisions
(station/schema.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from bouncer.runtime.errors import BouncerError

log = logging.getLogger("bouncer.station.db")
AUDIT_LOCK = 0x626F756E  # the advisory lock key that orders audit writers across processes and machines
SCHEMA_LOCK = 0x626F7500  # workers starting together migrate the schema one at a time
ROLE_LOCKS = {"retrain": 0x626F7501}  # session advisory locks: one holder of each role across the fleet


class DatabaseUnavailable(OSError):
    """The database cannot be reached or refused the connection: an OSError, so the ingest worker waits, retries
    and does not acknowledge the message."""


class Database(Protocol):
    dialect: str
    audit_order: str  # the column that orders the audit table as written

    def execute(self, sql: str, args: tuple = ()) -> int: ...

    def all(self, sql: str, args: tuple = ()) -> list[tuple]: ...

    def insert_new(self, sql: str, rows: list[tuple]) -> set[str]: ...

    def exclusive(self) -> Any: ...

    def role(self, name: str) -> Any: ...

    def close(self) -> None: ...


class SqliteDb:
    dialect, audit_order = "sqlite", "rowid"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            raise BouncerError(f"{path}: unusable station database ({exc})") from None

    def execute(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def insert_new(self, sql: str, rows: list[tuple]) -> set[str]:
        """Rows in one transaction; `sql` ends in RETURNING id: the ids inserted (not those already there)."""
        if not rows:
            return set()
        new: set[str] = set()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for row in rows:
                    new.update(r[0] for r in self._db.execute(sql, row).fetchall())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    @contextmanager
    def exclusive(self) -> Iterator[Any]:
        """One writer at a time across processes (BEGIN IMMEDIATE); yields an object with `all` and `execute`."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Bound(lambda s, a: self._db.execute(s, a))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def role(self, name: str) -> Iterator[bool]:
        """Try to hold the `name` role (an exclusive file lock beside the database) while the block runs."""
        import fcntl

        with open(self.path.with_name(f"{name}.lock"), "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDb:
    dialect, audit_order = "postgresql", "seq"

    def __init__(self, url: str, max_size: int = 8, timeout: float = 30.0) -> None:
        try:
            import psycopg  # noqa: F401  # the driver the pool uses
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise BouncerError(
                "station.database on PostgreSQL needs psycopg: pip install 'bouncer[station-scale]'"
            ) from None
        self.url, self.timeout = url, timeout
        deadline = time.monotonic() + timeout
        while True:  # a database still starting (or restarting) at the worker's start: wait, saying so
            self.pool = ConnectionPool(url, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False,
                                       reconnect_timeout=24 * 3600)  # fmt: skip
            try:
                self.pool.open(wait=True, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                return
            except Exception as exc:  # psycopg_pool.PoolTimeout, and the driver's own errors
                self.pool.close()
                if time.monotonic() >= deadline:
                    raise BouncerError(
                        f"station.database: PostgreSQL at {safe_url(url)} unreachable for {timeout:.0f} s ({exc})"
                    ) from None
                log.warning("PostgreSQL at %s not reachable yet (%s), retrying for %.0f s more", safe_url(url),
                            exc, deadline - time.monotonic())  # fmt: skip
                time.sleep(1.0)

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection; the server down or gone mid-statement is a DatabaseUnavailable naming it."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailable(f"PostgreSQL at {safe_url(self.url)}: {first}") from None

    def execute(self, sql: str, args: tuple = ()) -> int:
        with self._connection() as conn:
            return conn.execute(self._sql(sql), args).rowcount

    def all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(self._sql(sql), args).fetchall()

    def insert_new(self, sql: str, rows: list[tuple]) -> set[str]:
        """Rows in one transaction, pipelined (one round trip for the batch, not one per row)."""
        if not rows:
            return set()
        new: set[str] = set()
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows, returning=True)
            while True:
                new.update(r[0] for r in cur.fetchall())
                if not cur.nextset():
                    break
        return new

    @contextmanager
    def exclusive(self) -> Iterator[Any]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
            yield _Bound(lambda s, a: conn.execute(self._sql(s), a))

    @contextmanager
    def role(self, name: str) -> Iterator[bool]:
        """Try to hold the fleet-wide `name` role (a session advisory lock) while the block runs: True if this
        process holds it, False if another does. The lock goes with the session if the holder dies."""
        with self._connection() as conn:
            (got,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (ROLE_LOCKS[name],)).fetchone()
            try:
                yield bool(got)
            finally:
                if got:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (ROLE_LOCKS[name],))

    def close(self) -> None:
        self.pool.close()


class _Bound:
    """Statements inside one transaction."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def execute(self, sql: str, args: tuple = ()) -> int:
        return self._run(sql, args).rowcount

    def all(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._run(sql, args).fetchall()


def safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    host = u.hostname or ""
    netloc = f"{u.username}@{host}" if u.username else host
    return urlunsplit((u.scheme, f"{netloc}:{u.port}" if u.port else netloc, u.path, "", ""))


def connect(database: str, root: Path, timeout: float = 30.0) -> Database:
    """`database`: empty for SQLite in `root`, or a postgresql:// URL (waited for up to `timeout` seconds)."""
    if not database:
        return SqliteDb(root / "station.sqlite")
    if database.startswith(("postgresql://", "postgres://")):
        return PostgresDb(database, timeout=timeout)
    raise BouncerError(
        f"station.database: empty (SQLite in the data folder) or postgresql://..., got {safe_url(database)!r}"
    )
