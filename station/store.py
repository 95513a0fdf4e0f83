"""The station's store: flagged frames (JPEG files + SQLite in WAL mode), labels, events, fleet status,
gate versions and quarantined messages.

Idempotent on the message id (`INSERT ... ON CONFLICT (id) DO NOTHING`): a frame re-sent after a device
or broker restart is stored once. The SQL is the portable subset SQLite and PostgreSQL share (TEXT,
DOUBLE PRECISION, BIGINT, ON CONFLICT), so SQLite and PostgreSQL run the same code (station/db.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime import schemas
from bouncer.station import schema
from bouncer.station.db import connect
from bouncer.station.objects import FolderObjects, open_objects

log = logging.getLogger("bouncer.station.store")


@dataclass
class Frame:
    id: str
    group: str
    device: str
    ts: float
    received: float
    source: str | None
    decision: str
    predicted: str | None
    confidence: float | None
    ood_score: float | None
    reasons: list[str]
    details: list[dict[str, Any]]
    quality: dict[str, float]
    gate_version: str
    label_kind: str | None
    label: str | None
    heatmap_path: str | None
    audit: int
    boxes: list[dict[str, Any]] | None = None  # a detector frame's kept boxes
    size: list[int] | None = None  # its width and height: the boxes' pixel space
    labelled_by: str | None = None  # the authenticated person (or `local` on an open loopback station)
    part: int | None = None  # a triggered camera's part id (docs/cameras.md)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "heatmap_path"}
        d["audit"] = bool(self.audit)
        if self.label_kind == "boxes" and self.label is not None:
            d["label"] = json.loads(self.label)
        d["image"] = f"/api/frames/{self.id}/image.jpg"
        d["heatmap"] = f"/api/frames/{self.id}/heatmap.png" if self.heatmap_path else None
        return d


# The frames table's columns a `Frame` is read from, by name (the table's `grp` is the record's `group`)
FRAME_FIELDS = ("id", "grp", "device", "ts", "received", "source", "decision", "predicted", "confidence", "ood_score",
                "reasons", "details", "quality", "gate_version", "label_kind", "label", "heatmap_path", "audit",
                "boxes", "size", "labelled_by", "part")  # fmt: skip
FRAME_COLUMNS = ", ".join(FRAME_FIELDS)
JSON_FIELDS = {"reasons", "details", "quality", "boxes", "size"}


def _frame(row: tuple) -> Frame:
    values = dict(zip(FRAME_FIELDS, row, strict=True))
    for k in JSON_FIELDS:
        values[k] = None if values[k] is None else json.loads(values[k])
    values["group"] = values.pop("grp")
    return Frame(**values)


def frame_row(m: schemas.FrameMessage, received: float) -> dict[str, Any]:
    """A frame message as the frames table's row, column by name."""
    boxes = m.box_dicts()
    return {
        "id": m.id, "grp": m.group, "device": m.device, "ts": m.ts, "received": received, "source": m.source,
        "decision": m.decision, "predicted": m.label, "confidence": m.confidence, "ood_score": m.ood_score,
        "reasons": json.dumps(m.reasons), "details": json.dumps(m.details), "quality": json.dumps(m.quality),
        "gate_version": m.gate_version, "backbone_hash": m.backbone_hash, "jpeg_path": frame_key(m.id, "jpg"),
        "heatmap_path": frame_key(m.id, "heat.png") if m.heatmap else None, "audit": int(m.audit),
        "features": pack_features(m.feature_arrays()) if m.features else None,
        "boxes": None if boxes is None else json.dumps(boxes), "size": None if m.size is None else json.dumps(m.size),
        "candidates": None if (c := m.candidate_array()) is None else c.tobytes(), "part": m.part,
    }  # fmt: skip


@dataclass(frozen=True)
class QueueFilter:
    """Which unlabelled frames the queue shows: a device, a reason, a decision, a time window (device time)."""

    device: str | None = None
    reason: str | None = None
    decision: str | None = None
    since: float | None = None
    until: float | None = None

    def sql(self) -> tuple[str, tuple]:
        parts: list[str] = []
        args: list[Any] = []
        if self.device:
            parts.append("AND device = ?")
            args.append(self.device)
        if self.reason:  # reasons is a JSON list of plain words: match the quoted word
            parts.append("AND reasons LIKE ?")
            args.append(f'%"{self.reason}"%')
        if self.decision:
            parts.append("AND decision = ?")
            args.append(self.decision)
        if self.since is not None:
            parts.append("AND ts >= ?")
            args.append(self.since)
        if self.until is not None:
            parts.append("AND ts <= ?")
            args.append(self.until)
        return " ".join(parts), tuple(args)


def frame_key(frame_id: str, suffix: str) -> str:
    """The object key of a frame's JPEG or heatmap: derived from the message id alone, so a redelivered message
    writes the same object."""
    return f"frames/{frame_id[:2]}/{frame_id}.{suffix}"


def pack_features(features: dict[str, np.ndarray]) -> bytes:
    """An .npz that `np.load` reads, written member by member: `np.savez(**features)` takes a feature named
    `file` or `allow_pickle` for its own argument."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, v in features.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(v, np.float16), allow_pickle=False)
    return buf.getvalue()


def unpack_features(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k].astype(np.float32) for k in z.files}


AUDIT_FIELDS = ("id", "ts", "gate_version", "event", "actor", "device", "details")
DEVICE_GATE_EVENTS = {"gate_commit": "applied", "gate_rollback": "rolled_back", "gate_update_rejected": "refused"}


def audit_hash(prev: str, rec: tuple) -> str:
    """sha256 over the previous record's hash and this record's fields, in a fixed JSON form."""
    return hashlib.sha256(json.dumps([prev, *rec], separators=(",", ":")).encode()).hexdigest()


class Store:
    def __init__(self, root: Path, database: str = "", connect_timeout: float = 30.0, objects: str = "") -> None:
        """`database`: empty for SQLite in `root` (the embedded default), or a postgresql:// URL. `objects`: empty
        for frames, heatmaps and quarantined payloads as files under `root`, or s3://BUCKET/PREFIX."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects = open_objects(objects, self.root, connect_timeout)
        self._pool: ThreadPoolExecutor | None = None
        self.conflicts = 0  # frames refused because their id was stored with other content
        self.db = connect(database, self.root, connect_timeout)  # waits for a PostgreSQL that is starting
        before, now = schema.upgrade(database, self.root)
        if before != now:
            log.info("station database migrated from schema revision %s to %s", before or "(none)", now)

    def _exec(self, statement: str, args: tuple = ()) -> int:
        """Runs one statement; returns the rows it changed."""
        return self.db.execute(statement, args)

    def _all(self, statement: str, args: tuple = ()) -> list[tuple]:
        return self.db.all(statement, args)

    def run(self, statement: str, args: tuple = ()) -> int:
        return self._exec(statement, args)

    def rows(self, statement: str, args: tuple = ()) -> list[tuple]:
        return self._all(statement, args)

    # ---- incoming -------------------------------------------------------------------------------

    def add_frame(self, msg: schemas.FrameMessage) -> bool:
        """Store a flagged frame once; returns False for a duplicate id."""
        return self.add_frames([msg])[0]

    def add_frames(self, msgs: list[schemas.FrameMessage]) -> list[bool]:
        """Store flagged frames, each once: objects first (keys from the message id, written in parallel), then
        the rows in one transaction (`ON CONFLICT DO NOTHING`); True for each frame that was new. A row never
        points at a missing object; an object left without a row (a crash in between) is swept later."""
        for msg in msgs:
            if not isinstance(msg.id, str) or not schemas.DEVICE_ID.match(msg.id):
                raise schemas.SchemaError(f"frame message: id {msg.id!r} is not a plain identifier")
        known = self._known_frames([m.id for m in msgs])
        for m in msgs:
            if m.id in known:
                self._check_conflict(m, *known[m.id])
        fresh = [m for m in msgs if m.id not in known]
        blobs: list[tuple[str, bytes]] = []
        for m in fresh:
            blobs.append((frame_key(m.id, "jpg"), m.jpeg))
            if m.heatmap:
                blobs.append((frame_key(m.id, "heat.png"), m.heatmap))
        self._put_all(blobs)
        now = time.time()
        rows = [frame_row(m, now) for m in fresh]
        columns = list(rows[0]) if rows else []
        inserted = self.db.insert_new(
            f"INSERT INTO frames ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            [tuple(r[c] for c in columns) for r in rows],
        )
        seen: set[str] = set()
        out = []
        for m in msgs:  # the same id twice in one batch: the first is new, the second a duplicate
            out.append(m.id in inserted and m.id not in seen)
            seen.add(m.id)
        return out

    def _known_frames(self, ids: list[str]) -> dict[str, tuple[str, float, str]]:
        """id -> (device, ts, JPEG key) of those already stored."""
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self._all(f"SELECT id, device, ts, jpeg_path FROM frames WHERE id IN ({marks})", tuple(ids))
        return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}

    def _check_conflict(self, m: schemas.FrameMessage, device: str, ts: float, jpeg_key: str) -> None:
        """A redelivery repeats the message; the same id with other content is someone else's (a guessed id, a
        second device under one name): kept out, but said aloud, as a `frame_conflict` event and a count."""
        if device == m.device and ts == m.ts and self.objects.get(jpeg_key) == m.jpeg:
            return
        self.conflicts += 1
        log.warning("frame %s from %s conflicts with the stored one (from %s at %s): not stored", m.id, m.device,
                    device, ts)  # fmt: skip
        self.add_event({"id": schemas.new_id(), "device": m.device, "ts": time.time(), "event": "frame_conflict",
                        "frame_id": m.id, "stored_device": device, "stored_ts": ts})  # fmt: skip

    def _known_ids(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        marks = ", ".join("?" * len(ids))
        return {r[0] for r in self._all(f"SELECT id FROM frames WHERE id IN ({marks})", tuple(ids))}

    def _put_all(self, blobs: list[tuple[str, bytes]]) -> None:
        """Every object, or an ObjectStoreError: several at once to an object store (each PUT waits on the
        network), one by one to a folder."""
        if len(blobs) <= 1 or isinstance(self.objects, FolderObjects):
            for key, data in blobs:
                self.objects.put(key, data)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="objects")
        for fut in [self._pool.submit(self.objects.put, key, data) for key, data in blobs]:
            fut.result()

    def image(self, frame_id: str, heatmap: bool = False) -> bytes | None:
        """A frame's JPEG (or heatmap PNG) from the object store; None if the frame or its object is missing."""
        column = "heatmap_path" if heatmap else "jpeg_path"
        rows = self._all(f"SELECT {column} FROM frames WHERE id = ?", (frame_id,))
        return self.objects.get(rows[0][0]) if rows and rows[0][0] else None

    def sweep(self, grace_s: float = 3600.0) -> int:
        """Remove frame objects no row points at that are older than `grace_s` (left by a crash between the
        object write and the row); returns how many. Any worker may run it: deleting an orphan twice is harmless."""
        now, removed = time.time(), 0
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            nonlocal removed
            known = self._known_ids(sorted({fid for fid, _ in batch}))
            gone = [key for fid, key in batch if fid not in known]
            if gone:
                self.objects.delete(gone)
                removed += len(gone)
            batch.clear()

        for key, modified in self.objects.list("frames/"):
            if now - modified <= grace_s:
                continue
            batch.append((key.rsplit("/", 1)[-1].split(".", 1)[0], key))
            if len(batch) >= 500:
                flush()
        if batch:
            flush()
        return removed

    def expire(self, older_than_s: float) -> dict[str, int]:
        """Retention: unlabelled frames, quarantined payloads and device stats older than `older_than_s`. Rows go
        first (each DELETE returns what it removed, so a frame labelled meanwhile keeps its image), then their
        objects; a crash between the two leaves orphans for `sweep`. Labelled frames, gates, events and the audit
        log stay: they are what gates are fitted, judged and answered for on."""
        cutoff = time.time() - older_than_s
        gone = {"frames": 0, "quarantine": 0, "device_stats": 0}
        batches = (
            ("frames", "SELECT id FROM frames WHERE label_kind IS NULL AND received < ? LIMIT 500",
             "label_kind IS NULL", "jpeg_path, heatmap_path"),
            ("quarantine", "SELECT id FROM quarantine WHERE received < ? LIMIT 500", "1 = 1", "path"),
        )  # fmt: skip
        for table, pick, still, keys in batches:
            while rows := self._all(f"DELETE FROM {table} WHERE id IN ({pick}) AND {still} RETURNING {keys}",
                                    (cutoff,)):  # fmt: skip
                self.objects.delete([k for row in rows for k in row if k])
                gone[table] += len(rows)
        gone["device_stats"] = self._exec("DELETE FROM device_stats WHERE ts < ?", (cutoff,))
        return gone

    def quarantine(self, topic: str, payload: bytes, reason: str) -> str:
        """Keep a malformed message aside with its reason (the payload as an object, for a human to look at)."""
        qid = schemas.new_id()
        key = f"quarantine/{qid}.bin"
        self.objects.put(key, payload[: schemas.MAX_PAYLOAD_BYTES])
        self._exec(
            "INSERT INTO quarantine (id, received, topic, reason, size, path) VALUES (?, ?, ?, ?, ?, ?)",
            (qid, time.time(), topic[:500], reason[:500], len(payload), key),
        )
        return qid

    def add_event(self, ev: dict[str, Any]) -> bool:
        new = (
            self._exec(
                "INSERT INTO events (id, device, ts, kind, body) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (ev["id"], ev["device"], float(ev["ts"]), ev["event"], json.dumps(ev)),
            )
            == 1
        )
        if new and ev["event"] in DEVICE_GATE_EVENTS:  # a gate's life on each device is part of its audit trail
            details = {k: v for k, v in ev.items() if k not in ("v", "id", "device", "ts", "event")}
            self.audit(str(ev.get("version") or "?"), DEVICE_GATE_EVENTS[ev["event"]], f"device:{ev['device']}",
                       details, device=ev["device"])  # fmt: skip
        return new

    # ---- audit log ------------------------------------------------------------------------------

    def audit(self, gate_version: str, event: str, actor: str, details: dict[str, Any], device: str | None = None):
        """Append one gate lifecycle record: fitted, approved, rejected, published, applied, rolled_back.

        Each record carries the hash of the one before it (a chain), so a record rewritten or removed behind
        the database's back, in the file itself, shows in `verify_audit`. One writer at a time (db.exclusive):
        two processes (the station and a CLI retrain, or two workers) never chain onto the same record."""
        rec = (schemas.new_id(), time.time(), gate_version, event, actor, device, json.dumps(details, default=str))
        with self.db.exclusive() as tx:
            last = tx.all(f"SELECT hash FROM audit ORDER BY {self.db.audit_order} DESC LIMIT 1")
            prev = (last[0][0] or "") if last else ""
            tx.execute(
                "INSERT INTO audit (id, ts, gate_version, event, actor, device, details, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*rec, prev, audit_hash(prev, rec)),
            )

    def verify_audit(self) -> dict[str, Any]:
        """Walk the chain: every record's hash matches its content and the record before it."""
        rows = self._all(f"SELECT {', '.join(AUDIT_FIELDS)}, prev_hash, hash FROM audit ORDER BY {self.db.audit_order}")
        problems: list[str] = []
        prev, legacy = "", 0
        for r in rows:
            rec, stored_prev, stored = tuple(r[:7]), r[7], r[8]
            if stored is None and not problems and not prev:
                legacy += 1  # written before the chain existed
                continue
            if stored_prev != prev:
                problems.append(f"record {rec[0]}: the record before it was changed or removed")
            if audit_hash(stored_prev or "", rec) != stored:
                problems.append(f"record {rec[0]} ({rec[3]} of gate {rec[2]}): content does not match its hash")
            prev = stored or ""
        return {"records": len(rows), "unchained": legacy, "head": prev, "ok": not problems, "problems": problems}

    def audit_log(self, gate_version: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE gate_version = ?", (gate_version,)) if gate_version else ("", ())
        rows = self._all(f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit {where} ORDER BY ts, id", args)
        return [{**dict(zip(AUDIT_FIELDS, r, strict=True)), "details": json.loads(r[6])} for r in rows]

    def set_status(self, status: dict[str, Any]) -> None:
        self._exec(
            "INSERT INTO devices (device, state, ts, status) VALUES (?, ?, ?, ?) ON CONFLICT (device) DO UPDATE "
            "SET state = excluded.state, ts = excluded.ts, status = excluded.status",
            (status["device"], status["state"], float(status["ts"]), json.dumps(status)),
        )

    def set_stats(self, stats: dict[str, Any]) -> None:
        """The device's latest statistics, and one more point of its history (the fleet page's charts)."""
        self._exec("INSERT INTO device_stats (device, ts, stats) VALUES (?, ?, ?)",
                   (stats["device"], float(stats.get("ts", time.time())), json.dumps(stats)))  # fmt: skip
        self._exec(
            "INSERT INTO devices (device, state, ts, status, stats) VALUES (?, 'online', ?, '{}', ?) "
            "ON CONFLICT (device) DO UPDATE SET stats = excluded.stats",
            (stats["device"], float(stats.get("ts", time.time())), json.dumps(stats)),
        )

    # ---- review ---------------------------------------------------------------------------------

    def queue(self, limit: int = 50, group: str | None = None) -> list[Frame]:
        where, args = ("AND grp = ?", (group,)) if group else ("", ())
        rows = self._all(
            f"SELECT {FRAME_COLUMNS} FROM frames WHERE label_kind IS NULL {where} ORDER BY received, id LIMIT ?",
            (*args, limit),
        )
        return [_frame(r) for r in rows]

    def queue_vectors(
        self, group: str, limit: int, filters: QueueFilter | None = None
    ) -> tuple[list[Frame], dict[str, bytes | None]]:
        """The oldest unlabelled frames of a group (those `filters` lets through) and their stored vectors (what
        incidents are grouped from)."""
        where, args = (filters or QueueFilter()).sql()
        rows = self._all(
            f"SELECT {FRAME_COLUMNS}, features FROM frames WHERE label_kind IS NULL AND grp = ? {where} "
            "ORDER BY received, id LIMIT ?",
            (group, *args, limit),
        )
        return [_frame(r[:-1]) for r in rows], {r[0]: r[-1] for r in rows}

    def counts(self, group: str | None = None) -> dict[str, int]:
        where, args = ("WHERE grp = ?", (group,)) if group else ("", ())
        (total, unlabelled), = self._all(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN label_kind IS NULL THEN 1 ELSE 0 END), 0) FROM frames " + where,
            args,
        )  # fmt: skip
        (quarantined,) = self._all("SELECT COUNT(*) FROM quarantine")[0]
        (events,) = self._all("SELECT COUNT(*) FROM events")[0]
        return {
            "frames": total, "unlabelled": unlabelled, "labelled": total - unlabelled, "quarantined": quarantined,
            "events": events,
        }  # fmt: skip

    def frame(self, frame_id: str) -> Frame | None:
        rows = self._all(f"SELECT {FRAME_COLUMNS} FROM frames WHERE id = ?", (frame_id,))
        return _frame(rows[0]) if rows else None

    def set_label(self, frame_id: str, kind: str, label: str | None, user: str) -> None:
        self._exec(
            "UPDATE frames SET label_kind = ?, label = ?, labelled_by = ?, labelled_at = ? WHERE id = ?",
            (kind, label, user, time.time(), frame_id),
        )

    def labelled(
        self, backbone_hash: str, group: str
    ) -> list[tuple[str, str, str | None, dict[str, float], bytes | None]]:
        """(id, kind, label, quality, features) of a group's labelled frames made with this backbone."""
        rows = self._all(
            "SELECT id, label_kind, label, quality, features FROM frames "
            "WHERE label_kind IS NOT NULL AND backbone_hash = ? AND grp = ? ORDER BY id",
            (backbone_hash, group),
        )
        return [(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def labelled_detections(
        self, backbone_hash: str, group: str
    ) -> list[tuple[str, str, str | None, list[str], list[dict[str, Any]] | None, np.ndarray | None]]:
        """(id, kind, true boxes JSON, reasons, kept boxes, candidates M x 6) of a group's labelled detector frames."""
        rows = self._all(
            "SELECT id, label_kind, label, reasons, boxes, candidates FROM frames "
            "WHERE label_kind IS NOT NULL AND backbone_hash = ? AND grp = ? ORDER BY id",
            (backbone_hash, group),
        )
        return [(r[0], r[1], r[2], json.loads(r[3]), None if r[4] is None else json.loads(r[4]),
                 None if r[5] is None else np.frombuffer(r[5], np.float32).reshape(-1, 6)) for r in rows]  # fmt: skip

    # ---- fleet, events, gates -------------------------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for device, state, ts, status, stats in self._all(
            "SELECT device, state, ts, status, stats FROM devices ORDER BY device"
        ):
            st = json.loads(stats) if stats else {}
            status_obj = json.loads(status)
            out.append(
                {
                    "device": device, "state": state, "since": ts, "status": status_obj,
                    "group": st.get("group"),
                    "gate_version": st.get("gate_version") or status_obj.get("gate_version"),
                    "outbox_depth": st.get("outbox_depth"), "frames": st.get("frames"), "drift": st.get("drift"),
                }
            )  # fmt: skip
        return out

    def stats_history(self, since: float, limit: int = 20000) -> list[dict[str, Any]]:
        rows = self._all("SELECT stats FROM device_stats WHERE ts >= ? ORDER BY ts LIMIT ?", (since, limit))
        return [json.loads(r[0]) for r in rows]

    def backlog(self, group: str, times: list[float]) -> list[int]:
        """Unlabelled frames of a group at each of `times`: received by then, not yet labelled then."""
        rows = self._all("SELECT received, labelled_at FROM frames WHERE grp = ?", (group,))
        got = np.array([r[0] for r in rows], np.float64)
        done = np.array([np.inf if r[1] is None else r[1] for r in rows], np.float64)
        return [int(((got <= t) & (done > t)).sum()) for t in times]

    def events(self, kind_prefix: str = "", limit: int = 100) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT body FROM events WHERE kind LIKE ? ORDER BY ts DESC LIMIT ?", (f"{kind_prefix}%", limit)
        )
        return [json.loads(r[0]) for r in rows]

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT id, received, topic, reason, size FROM quarantine ORDER BY received DESC LIMIT ?", (limit,)
        )
        return [dict(zip(("id", "received", "topic", "reason", "size"), r, strict=True)) for r in rows]

    def labellers(self, group: str) -> dict[str, int]:
        """Who labelled a group's frames, and how many each: the people behind a retrained gate."""
        rows = self._all("SELECT labelled_by, COUNT(*) FROM frames WHERE grp = ? AND label_kind IS NOT NULL "
                         "GROUP BY labelled_by ORDER BY labelled_by", (group,))  # fmt: skip
        return {str(r[0]): int(r[1]) for r in rows}

    def labels_since(self, group: str, ts: float) -> int:
        (n,) = self._all("SELECT COUNT(*) FROM frames WHERE grp = ? AND labelled_at > ?", (group, ts))[0]
        return int(n)

    def add_retrain(self, group: str, result: dict[str, Any], started: float) -> None:
        """Each retraining's outcome, whoever started it (HTTP, the CLI, the schedule), at the time it read the
        labels (so labels given while it fitted count as new)."""
        self._exec("INSERT INTO retrains (grp, ts, result) VALUES (?, ?, ?)", (group, started, json.dumps(result)))

    def last_retrain(self, group: str) -> dict[str, Any] | None:
        rows = self._all("SELECT ts, result FROM retrains WHERE grp = ? ORDER BY ts DESC LIMIT 1", (group,))
        return {"ts": rows[0][0], **json.loads(rows[0][1])} if rows else None

    def add_gate(self, version: str, group: str, serial: int, role: str, path: Path, metrics: dict[str, Any]) -> None:
        self._exec(
            "INSERT INTO gates (version, grp, serial, created, role, path, metrics) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (version) DO UPDATE SET role = excluded.role, metrics = excluded.metrics",
            (version, group, serial, time.time(), role, str(path), json.dumps(metrics)),
        )

    def set_gate_role(self, version: str, role: str) -> None:
        self._exec("UPDATE gates SET role = ? WHERE version = ?", (role, version))

    def gates(self, group: str | None = None) -> list[dict[str, Any]]:
        where, args = ("WHERE grp = ?", (group,)) if group else ("", ())
        rows = self._all(
            f"SELECT version, grp, serial, created, role, path, metrics FROM gates {where} ORDER BY serial DESC", args
        )
        keys = ("version", "group", "serial", "created", "role", "path", "metrics")
        return [{**dict(zip(keys, r, strict=True)), "metrics": json.loads(r[6])} for r in rows]

    def gate(self, version: str) -> dict[str, Any] | None:
        return next((g for g in self.gates() if g["version"] == version), None)

    def champion(self, group: str) -> dict[str, Any] | None:
        rows = [g for g in self.gates(group) if g["role"] == "champion"]
        return rows[0] if rows else None

    def next_serial(self) -> int:
        (serial,) = self._all("SELECT COALESCE(MAX(serial), 0) FROM gates")[0]
        return int(serial) + 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.db.close()
