"""The station's schema under alembic, on SQLite and on a real PostgreSQL: a fresh database and one an earlier
station made (before migrations) reach the newest revision with their rows; `station migrate --check` says when
a database is behind; a database migrated by a newer bouncer is refused with one clear line."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from helpers import run_cli, station_config

from bouncer.runtime.errors import BouncerError
from bouncer.station import schema
from bouncer.station.store import Store

# the tables as a station made them before it had migrations: no detector columns, no hash chain, no triggers
OLD = """
CREATE TABLE frames (id TEXT PRIMARY KEY, grp TEXT NOT NULL, device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL, source TEXT, decision TEXT NOT NULL, predicted TEXT,
    confidence DOUBLE PRECISION, ood_score DOUBLE PRECISION, reasons TEXT NOT NULL, details TEXT NOT NULL,
    quality TEXT NOT NULL, gate_version TEXT NOT NULL, backbone_hash TEXT NOT NULL, jpeg_path TEXT NOT NULL,
    heatmap_path TEXT, audit BIGINT NOT NULL DEFAULT 0, features BYTEA, label_kind TEXT, label TEXT,
    labelled_by TEXT, labelled_at DOUBLE PRECISION);
CREATE TABLE audit (id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, gate_version TEXT NOT NULL,
    event TEXT NOT NULL, actor TEXT NOT NULL, device TEXT, details TEXT NOT NULL);
INSERT INTO frames VALUES ('f1', 'default', 'cam-1', 1.0, 2.0, NULL, 'review', 'gear', 0.5, 1.0, '[]', '[]',
    '{}', 'v1', 'b', 'frames/f1/f1.jpg', NULL, 0, NULL, 'class', 'gear', 'ann', 3.0);
INSERT INTO audit VALUES ('a1', 1.0, 'v1', 'fitted', 'bouncer fit', NULL, '{}');
"""


def _old_database(database: str, root) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if database:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(OLD)
    else:
        with sqlite3.connect(root / "station.sqlite") as conn:
            conn.executescript(OLD)


@pytest.mark.parametrize("station_database", ["", "postgres"], indirect=True)
def test_a_database_from_before_migrations_reaches_the_newest_revision_with_its_rows(station_database, tmp_path):
    root = tmp_path / "st"
    _old_database(station_database, root)
    cfg = station_config(tmp_path / "s.toml", root, database=station_database)
    check = run_cli("station", "migrate", str(cfg), "--check")
    assert check.returncode == 1 and "at schema revision (none)" in check.stdout, check.stderr
    res = run_cli("station", "migrate", str(cfg))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at schema revision {schema.head()} (was (none))" in res.stdout
    assert run_cli("station", "migrate", str(cfg), "--check").returncode == 0
    again = run_cli("station", "migrate", str(cfg))
    assert again.returncode == 0 and "(was" not in again.stdout, "nothing to do the second time"
    store = Store(root, station_database)
    frame = store.frame("f1")
    assert frame is not None and frame.label == "gear" and frame.boxes is None, "the row kept, new columns empty"
    with pytest.raises(Exception, match="append-only"):
        store.db.execute("UPDATE audit SET actor = 'mallory'")
    store.close()


@pytest.mark.parametrize("station_database", ["", "postgres"], indirect=True)
def test_a_fresh_database_is_made_at_the_newest_revision_and_a_newer_one_is_refused(station_database, tmp_path):
    root = tmp_path / "st"
    Store(root, station_database).close()
    assert schema.current(station_database, root) == schema.head()
    # a newer bouncer migrated it past what this one knows
    Store(root, station_database).db.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(BouncerError, match=r"schema revision 9999, which this bouncer does not know .* upgrade"):
        Store(root, station_database)
    cfg = station_config(tmp_path / "s.toml", root, database=station_database)
    res = run_cli("station", "migrate", str(cfg))
    assert res.returncode == 2 and "9999" in res.stderr and "Traceback" not in res.stderr


def test_migrate_names_what_is_missing(tmp_path):
    cfg = station_config(tmp_path / "s.toml", tmp_path / "nothing")
    res = run_cli("station", "migrate", str(cfg))
    assert res.returncode == 2 and "no station database here" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "station.sqlite").write_bytes(b"not a database at all" * 100)
    cfg = station_config(tmp_path / "s2.toml", tmp_path / "bad")
    res = run_cli("station", "migrate", str(cfg))
    assert res.returncode == 2 and "unusable station database" in res.stderr and "Traceback" not in res.stderr
