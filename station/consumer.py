"""The station's MQTT side: a shared subscription to the fleet's frames and events (several workers split
the load), status and stats of every device, and the retained gate announcements it publishes.

A message is acknowledged (manual PUBACK) only after it is in the store, so a station crash or a full disk
means the broker delivers it again, never that it is lost; malformed messages are quarantined with their
reason and acknowledged.
"""

from __future__ import annotations

import logging
import socket
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bouncer.runtime import schemas
from bouncer.runtime.config import MqttSection
from bouncer.runtime.mqtt_client import new_client
from bouncer.station.store import Store

log = logging.getLogger("bouncer.station.mqtt")
SESSION_EXPIRY_S = 7 * 24 * 3600


class Consumer:
    def __init__(
        self, cfg: MqttSection, store: Store, share_group: str, worker: str = "", groups: list[str] | None = None
    ) -> None:
        self.cfg, self.store, self.share = cfg, store, share_group
        self.groups = set(groups) if groups else None  # None: accept frames of any group
        self.connected = threading.Event()
        self.counts = {"frames": 0, "duplicates": 0, "events": 0, "quarantined": 0, "unstored": 0}
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
        client.subscribe(self.subscriptions())
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.handle(msg.topic, msg.payload)
        except OSError as exc:  # disk full, I/O error: leave it unacknowledged, the broker sends it again
            self.counts["unstored"] += 1
            log.error("could not store a message from %s: %s", msg.topic, exc)
            return
        except Exception as exc:  # a bug must not kill paho's network thread: keep the message aside
            log.exception("unexpected error on a message from %s", msg.topic)
            try:
                self.store.quarantine(msg.topic, msg.payload, f"internal error: {type(exc).__name__}: {exc}")
            except Exception:
                return  # not stored anywhere: leave it unacknowledged
            self.counts["quarantined"] += 1
        if msg.qos:
            client.ack(msg.mid, msg.qos)

    def handle(self, topic: str, payload: bytes) -> str:
        """Store one message; returns what happened (frame, duplicate, event, status, stats, quarantined)."""
        try:
            device, kind = schemas.parse_topic(topic)
            if kind == "frames":
                msg = schemas.FrameMessage.decode(payload)
                if msg.device != device:
                    raise schemas.SchemaError(f"frame message: device {msg.device!r} on the topic of {device!r}")
                if self.groups is not None and msg.group not in self.groups:
                    known = ", ".join(sorted(self.groups))
                    raise schemas.SchemaError(f"frame message: group {msg.group!r} is not managed here ({known})")
                new = self.store.add_frame(msg)
                self.counts["frames" if new else "duplicates"] += 1
                return "frame" if new else "duplicate"
            if kind == "events":
                ev = schemas.parse_event(payload)
                self.store.add_event(ev)
                self.counts["events"] += 1
                return "event"
            if kind == "alerts":  # kept with the device's events: the station groups frames itself
                self.store.add_event({**schemas.parse_alert(payload), "event": "alert"})
                self.counts["events"] += 1
                return "event"
            if kind == "status":
                self.store.set_status(schemas.parse_status(payload))
                return "status"
            if kind == "stats":
                self.store.set_stats(schemas.parse_stats(payload))
                return "stats"
            raise schemas.SchemaError(f"topic {topic!r}: the station does not consume {kind}")
        except schemas.SchemaError as exc:
            self.store.quarantine(topic, payload, str(exc))
            self.counts["quarantined"] += 1
            log.warning("quarantined a message on %s: %s", topic, exc)
            return "quarantined"

    def announce(self, group: str, ann: schemas.GateAnnouncement) -> None:
        """Retained: a device that connects later still learns the current gate."""
        self.client.publish(schemas.gate_topic(group), ann.encode(), qos=1, retain=True)

    def start(self) -> None:
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S  # queued for us while the station restarts
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=self.cfg.keepalive,
            clean_start=False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
