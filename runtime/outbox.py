"""A durable outbox: flagged frames and events wait in SQLite (WAL) until the broker acknowledged them.

- `put` commits before it returns: a message put survives kill -9 of the process (the device's writer marks
  a frame done only after its put). WAL with synchronous=NORMAL: a power cut may lose the last transactions,
  see docs/mqtt.md.
- Rows are deleted only by `ack`, called when the broker's PUBACK arrives; anything unacked is sent
  again after a restart (duplicates carry the same id; the station keeps one).
- A disk budget bounds the database: over it, the oldest `reject` rows go first, then the oldest
  `review` rows (audit samples of accepted frames go before both); events are never evicted.
  Every eviction is counted and reported.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bouncer.runtime.errors import BouncerError

EVICTION_ORDER = ("accept", "reject", "review")  # oldest of each, in this order (accept: audit samples)


@dataclass(frozen=True)
class Pending:
    rowid: int
    msg_id: str
    topic: str
    payload: bytes
    kind: str


class Outbox:
    def __init__(self, path: Path, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS outbox (
                    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
                    msg_id TEXT NOT NULL UNIQUE,
                    topic TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    kind TEXT NOT NULL,
                    created REAL NOT NULL
                );
                CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS progress (
                    source TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (source, item)
                );
                """
            )
        except sqlite3.DatabaseError as exc:
            raise BouncerError(f"{self.path}: unusable outbox database ({exc})") from None
        self._bytes, self._depth = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox"
        ).fetchone()

    # ---- writing ---------------------------------------------------------------------------------

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Under the lock, in one transaction; a write SQLite cannot make (a full disk, a file at its size limit:
        'disk I/O error') is one error naming the outbox, and nothing of it stays."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:  # nothing of it stays, whatever stopped it (the next write must begin)
                if self._db.in_transaction:
                    with suppress(sqlite3.DatabaseError):  # then SQLite has rolled back itself
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.DatabaseError):
                    raise BouncerError(f"{self.path}: cannot {what} ({exc}); is the disk full?") from None
                raise

    def put(self, msg_id: str, topic: str, payload: bytes, kind: str) -> list[str]:
        """Store a message durably; returns the ids evicted to stay within the budget."""
        evicted: list[str] = []
        with self._writing("store a message"):
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox (msg_id, topic, payload, kind, created) VALUES (?, ?, ?, ?, ?)",
                (msg_id, topic, payload, kind, time.time()),
            )
            size, depth = (len(payload), 1) if cur.rowcount else (0, 0)
            while self._bytes + size > self.max_bytes:
                victim = self._victim()
                if victim is None:
                    break
                rowid, vid, vsize = victim
                self._db.execute("DELETE FROM outbox WHERE rowid = ?", (rowid,))
                size, depth = size - vsize, depth - 1
                evicted.append(vid)
            if evicted:
                self._bump("evicted", len(evicted))
        self._bytes += size  # committed: only now
        self._depth += depth
        return evicted

    def _victim(self) -> tuple[int, str, int] | None:
        for kind in EVICTION_ORDER:
            row = self._db.execute(
                "SELECT rowid, msg_id, LENGTH(payload) FROM outbox WHERE kind = ? ORDER BY rowid LIMIT 1", (kind,)
            ).fetchone()
            if row:
                return row
        return None

    def _bump(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    # ---- delivery --------------------------------------------------------------------------------

    def pending(self, limit: int = 100, after: int = 0) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, msg_id, topic, payload, kind FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Pending(*r) for r in rows]

    def ack(self, rowid: int) -> None:
        with self._writing("delete a delivered message"):
            row = self._db.execute("SELECT LENGTH(payload) FROM outbox WHERE rowid = ?", (rowid,)).fetchone()
            if row:
                self._db.execute("DELETE FROM outbox WHERE rowid = ?", (rowid,))
        if row:  # committed
            self._bytes -= row[0]
            self._depth -= 1

    # ---- state -----------------------------------------------------------------------------------

    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def mark_done(self, source: str, item: str) -> None:
        """Remember that a frame of a finite source was processed (a restart skips it)."""
        with self._writing("mark a frame done"):
            self._db.execute("INSERT OR IGNORE INTO progress (source, item) VALUES (?, ?)", (source, item))

    def done(self, source: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT item FROM progress WHERE source = ?", (source,))}

    def close(self) -> None:
        with self._lock:
            self._db.close()
