"""The station's MQTT side: a shared subscription to the fleet's frames and events (several workers split
the load), status and stats of every device, and the retained gate announcements it publishes.

A message is acknowledged (manual PUBACK) only after it is in the store, so a station crash or a full disk
means the broker delivers it again, never that it is lost; malformed messages are quarantined with their
reason and acknowledged.

paho's network thread only queues what arrives; one writer thread takes what has queued (up to BATCH
messages), stores the frames among them in one go (objects in parallel, rows in one transaction) and then
acknowledges them in the order they came. When the database or the object store is down, full or refusing, the
writer logs it and retries the same batch with a growing pause: the messages stay unacknowledged until stored.
"""

from __future__ import annotations

import logging
import queue
import socket
import sqlite3
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bouncer.runtime import schemas
from bouncer.runtime.config import MqttSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.mqtt_client import new_client
from bouncer.station.store import Store

log = logging.getLogger("bouncer.station.mqtt")
SESSION_EXPIRY_S = 7 * 24 * 3600
BATCH = 64  # messages stored and acknowledged together
RECEIVE_MAXIMUM = 256  # unacknowledged messages the broker may send this worker (MQTT 5)
RETRY_MAX_S = 10.0
STRIKES = 3  # failed tries of a batch before its messages are tried one by one
STALL_S = 60.0  # messages waiting and nothing stored for this long: ingest is unhealthy
RETRYABLE = (OSError, sqlite3.OperationalError)  # the stores' outages (DatabaseUnavailable, ObjectStoreError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, schemas.SchemaError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _kind(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


def _own(device: str, message: dict[str, Any], what: str) -> dict[str, Any]:
    """A device speaks only for itself: the payload's device must be the topic's (the broker's ACL lets each
    device publish under its own id only)."""
    if message["device"] != device:
        raise schemas.SchemaError(f"{what}: device {message['device']!r} on the topic of {device!r}")
    return message


class Consumer:
    def __init__(
        self,
        cfg: MqttSection,
        store: Store,
        share_group: str,
        worker: str = "",
        groups: list[str] | None = None,
        subscribe: bool = True,
    ) -> None:
        """`subscribe`: False for a worker without the ingest role (it only announces gates)."""
        self.cfg, self.store, self.share, self.subscribe = cfg, store, share_group, subscribe
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self.groups = set(groups) if groups else None  # None: accept frames of any group
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker granted the subscriptions: routing to us has begun
        self.last_stored = self.last_idle = time.monotonic()
        self._in_hand = 0
        self.counts = {"frames": 0, "duplicates": 0, "events": 0, "quarantined": 0, "unstored": 0, "retries": 0}
        self.v5 = cfg.protocol == "v5"
        # stable across restarts: a restarted worker resumes its persistent session and receives what the
        # broker queued for it meanwhile (a new id per start would strand that share in the old session)
        worker = worker or socket.gethostname()
        self.client, self.host, self.port = new_client(
            cfg,
            f"bouncer-station-{share_group}-{worker}",
            clean_session=None if self.v5 else False,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message

    def subscriptions(self) -> list[tuple[str, int]]:
        shared = f"$share/{self.share}/" if self.share else ""  # empty: a broker without shared subscriptions
        return [
            (f"{shared}{schemas.PREFIX}/+/frames", 1),
            (f"{shared}{schemas.PREFIX}/+/events", 1),
            (f"{shared}{schemas.PREFIX}/+/alerts", 1),
            (f"{schemas.PREFIX}/+/status", 1),  # retained; shared subscriptions get no retained messages
            (f"{schemas.PREFIX}/+/stats", 0),
        ]

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the station: %s", reason_code)
            return
        if self.subscribe:
            client.subscribe(self.subscriptions())
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        self._inbox.put(msg)  # the writer thread stores it; paho's thread stays free for the network

    def _write_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                self.last_idle = time.monotonic()  # nothing waits: not stalled, however long since the last store
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._in_hand = len(batch)
            try:
                stored = self._store_batch(batch)
            except Exception:  # a bug here must not end ingest: the batch stays unacknowledged for the next start
                log.exception("ingest: unexpected error on a batch of %d message(s); not acknowledged", len(batch))
                self.counts["retries"] += 1
                self._stopping.wait(1.0)
                continue
            if stored:
                self._in_hand = 0
                self.last_stored = time.monotonic()
                for msg in batch:  # in the order received, as MQTT asks
                    if msg.qos:
                        self.client.ack(msg.mid, msg.qos)

    def _store_batch(self, batch: list[Any]) -> bool:
        """Store (or quarantine) every message of the batch; False if stopped first. While the stores are down,
        full or refusing, retry with a growing pause and acknowledge nothing. After STRIKES failed tries the
        messages are tried one by one: one that still fails while others are stored is the cause, and is
        quarantined (a message that fails for itself must not hold up the rest, nor be redelivered forever)."""
        pause, tries = 0.2, 0
        while True:
            try:
                if tries < STRIKES:
                    self._store_once(batch)
                else:
                    self._store_singly(batch)
                return True
            except RETRYABLE as exc:  # down, full, refused, locked: retry, do not ack
                tries += 1
                self.counts["unstored"] += len(batch)
                self.counts["retries"] += 1
                log.error("cannot store %d message(s) now, retrying in %.1f s (not acknowledged): %s",
                          len(batch), pause, exc)  # fmt: skip
                if self._stopping.wait(pause):
                    return False
                pause = min(pause * 2, RETRY_MAX_S)

    def _store_once(self, batch: list[Any]) -> None:
        frames: list[tuple[Any, schemas.FrameMessage]] = []
        for msg in batch:  # frames are decoded here and stored together; the rest one by one
            if _kind(msg.topic) == "frames":
                try:
                    frames.append((msg, self._frame(msg.topic, msg.payload)))
                except Exception as exc:
                    self._quarantine(msg.topic, msg.payload, _reason(exc))
                continue
            self._guarded(msg.topic, msg.payload)
        if not frames:
            return
        stored: list[bool | None]
        try:
            stored = list(self.store.add_frames([f for _, f in frames]))
        except RETRYABLE:
            raise
        except Exception:
            log.exception("ingest: a batch of %d frame(s) failed; storing them one by one", len(frames))
            stored = [self._frame_alone(msg, f) for msg, f in frames]
        for n in stored:
            if n is not None:
                self.counts["frames" if n else "duplicates"] += 1

    def _frame_alone(self, msg: Any, frame: schemas.FrameMessage) -> bool | None:
        try:
            return self.store.add_frame(frame)
        except RETRYABLE:
            raise
        except Exception as exc:
            self._quarantine(msg.topic, msg.payload, _reason(exc))
            return None

    def _store_singly(self, batch: list[Any]) -> None:
        """Each message on its own. One that fails while others of its kind are stored is at fault; if every
        message of a kind fails, that kind's store is down (frames need the object store, status only the
        database): raise, and the batch is retried."""
        failed: list[tuple[Any, Exception]] = []
        stored: set[str] = set()
        for msg in batch:
            try:
                self._store_once([msg])
                stored.add(_kind(msg.topic))
            except RETRYABLE as err:
                failed.append((msg, err))
        down = [cause for msg, cause in failed if _kind(msg.topic) not in stored]
        if down:
            raise down[0]
        for msg, why in failed:
            self._quarantine(msg.topic, msg.payload, f"failed {STRIKES} times while others were stored: "
                             f"{_reason(why)}")  # fmt: skip

    def _guarded(self, topic: str, payload: bytes) -> str:
        try:
            return self.handle(topic, payload)
        except RETRYABLE:
            raise
        except Exception as exc:
            log.exception("unexpected error on a message from %s", topic)
            self._quarantine(topic, payload, _reason(exc))
            return "quarantined"

    def health(self, stall_s: float = STALL_S) -> dict[str, Any]:
        """Ingest is healthy while its writer runs and, with messages waiting, has stored one within `stall_s`."""
        alive = self._writer is not None and self._writer.is_alive()
        waiting = self._inbox.qsize() + self._in_hand  # the batch being retried waits too
        stalled = waiting > 0 and time.monotonic() - max(self.last_stored, self.last_idle) > stall_s
        ok = alive and not stalled and not self._stopping.is_set()
        return {"ok": ok, "writer_alive": alive, "waiting": waiting, "stalled": stalled, **self.counts,
                "conflicts": self.store.conflicts}  # fmt: skip

    def _quarantine(self, topic: str, payload: Any, reason: str) -> None:
        topic = topic.encode("utf-8", "backslashreplace").decode()
        reason = reason.encode("utf-8", "backslashreplace").decode()
        self.store.quarantine(topic, bytes(payload or b""), reason)
        self.counts["quarantined"] += 1
        log.warning("quarantined a message on %s: %s", topic, reason)

    def _frame(self, topic: str, payload: bytes) -> schemas.FrameMessage:
        device, _ = schemas.parse_topic(topic)
        msg = schemas.FrameMessage.decode(payload)
        if msg.device != device:
            raise schemas.SchemaError(f"frame message: device {msg.device!r} on the topic of {device!r}")
        if self.groups is not None and msg.group not in self.groups:
            known = ", ".join(sorted(self.groups))
            raise schemas.SchemaError(f"frame message: group {msg.group!r} is not managed here ({known})")
        return msg

    def handle(self, topic: str, payload: bytes) -> str:
        """Store one message; returns what happened (frame, duplicate, event, status, stats, quarantined)."""
        try:
            device, kind = schemas.parse_topic(topic)
            if kind == "frames":
                new = self.store.add_frame(self._frame(topic, payload))
                self.counts["frames" if new else "duplicates"] += 1
                return "frame" if new else "duplicate"
            if kind == "events":
                self.store.add_event(_own(device, schemas.parse_event(payload), "event"))
                self.counts["events"] += 1
                return "event"
            if kind == "alerts":  # kept with the device's events: the station groups frames itself
                self.store.add_event({**_own(device, schemas.parse_alert(payload), "alert"), "event": "alert"})
                self.counts["events"] += 1
                return "event"
            if kind == "status":
                self.store.set_status(_own(device, schemas.parse_status(payload), "status"))
                return "status"
            if kind == "stats":
                self.store.set_stats(_own(device, schemas.parse_stats(payload), "stats"))
                return "stats"
            raise schemas.SchemaError(f"topic {topic!r}: the station does not consume {kind}")
        except schemas.SchemaError as exc:
            self._quarantine(topic, payload, str(exc))
            return "quarantined"

    def announce(self, group: str, ann: schemas.GateAnnouncement) -> None:
        """Retained: a device that connects later still learns the current gate."""
        self.client.publish(schemas.gate_topic(group), ann.encode(), qos=1, retain=True)

    def start(self) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S  # queued for us while the station restarts
            props.ReceiveMaximum = RECEIVE_MAXIMUM  # enough in flight to fill a batch
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=self.cfg.keepalive,
            clean_start=False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._writer = threading.Thread(target=self._write_loop, name="station-ingest", daemon=True)
        self._writer.start()
        self.client.loop_start()

    def drain(self, idle_s: float = 3.0, timeout_s: float = 600.0, connect_s: float = 30.0) -> dict[str, int]:
        """Retire this worker for good: resume its session, leave the shared subscriptions (nothing new is routed
        to it), store what the broker had queued for it, then end the session (expiry 0). Mosquitto keeps routing
        to a stopped member's persistent session, so a worker removed without this strands what it was sent.
        A broker that does not answer within `connect_s` is an error, and the session is left as it was."""
        self.subscribe = False
        self.start()
        if not self.connected.wait(connect_s):
            self.stop()
            raise BouncerError(f"drain: broker {self.host}:{self.port} not reachable for {connect_s:g} s; the "
                               "worker's session is left as it was")  # fmt: skip
        shared = [t for t, _ in self.subscriptions() if t.startswith("$share/")]
        self.client.unsubscribe(shared)
        last, seen = time.monotonic(), -1
        deadline = last + timeout_s
        while time.monotonic() < deadline:
            done = sum(self.counts[k] for k in ("frames", "duplicates", "events", "quarantined"))
            if done != seen or not self._inbox.empty():
                last, seen = time.monotonic(), done
            elif time.monotonic() - last >= idle_s:
                break
            time.sleep(0.1)
        self.stop(end_session=True)
        return dict(self.counts)

    def stop(self, end_session: bool = False) -> None:
        """Unacknowledged messages stay with the broker (the persistent session) for this worker's return;
        `end_session`: the broker forgets the session and its subscriptions (MQTT 5 session expiry 0)."""
        self._stopping.set()  # the writer finishes (and acknowledges) the batch in hand
        if self._writer is not None:
            self._writer.join(timeout=30)
        props = None
        if end_session and self.v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
