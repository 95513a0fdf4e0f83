"""The device's MQTT link (paho-mqtt 2.x): drains the outbox with QoS 1, deletes a message only on its
PUBACK, keeps a retained status with a last will, and takes commands.

One thread owns the client's publishing (paho's network loop runs in its own thread and only calls
back); the frame loop never touches the network, it only writes to the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt

from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime import schemas
from bouncer.runtime.config import MqttSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.mqtt_client import new_client
from bouncer.runtime.outbox import Outbox

log = logging.getLogger("bouncer.link")


class MqttLink:
    def __init__(
        self,
        cfg: MqttSection,
        device: str,
        outbox: Outbox,
        on_command: Callable[[bytes], None] | None = None,
        subscriptions: Mapping[str, Callable[[bytes], None]] | None = None,
    ) -> None:
        self.device, self.outbox, self.cfg = device, outbox, cfg
        self.on_command = on_command
        self.handlers: dict[str, Callable[[bytes], None]] = dict(subscriptions or {})
        if on_command:
            self.handlers[schemas.topic(device, "cmd")] = on_command
        self.status_topic = schemas.topic(device, "status")
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._inflight: dict[int, int] = {}  # mid -> outbox rowid
        self._cursor = 0  # highest rowid handed to paho since the last (re)connect
        self._lock = threading.Lock()
        self._volatile: queue.Queue[tuple[str, bytes, bool]] = queue.Queue(maxsize=1000)
        self.published = 0
        self.acked = 0
        self.client, self.host, self.port = new_client(cfg, f"bouncer-{device}")
        self.client.max_inflight_messages_set(cfg.max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.will_set(self.status_topic, schemas.status(device, "offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self._thread = threading.Thread(target=self._drain, name="bouncer-link", daemon=True)

    # ---- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        with self._lock:
            self._inflight.clear()
            self._cursor = 0  # resend everything not yet acknowledged
        client.subscribe([(t, 1) for t in self.handlers] or [(schemas.topic(self.device, "cmd"), 1)])
        self.send_volatile(self.status_topic, schemas.status(self.device, "online"), retain=True)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            rowid = self._inflight.pop(mid, None)
        if rowid is not None and not reason_code.is_failure:
            try:
                self.outbox.ack(rowid)
            except BouncerError as exc:  # a full disk: the row stays and is sent again (the station keeps one)
                log.warning("%s", exc)
                return
            self.acked += 1

    def _on_message(self, client, userdata, msg) -> None:
        handler = self.handlers.get(msg.topic)
        if handler:
            handler(msg.payload)

    # ---- the publishing thread --------------------------------------------------------------------

    def send_volatile(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Status and stats: latest value matters, no outbox (dropped if the link is down for long)."""
        with contextlib.suppress(queue.Full):
            self._volatile.put_nowait((topic, payload, retain))

    def _drain(self) -> None:
        while not self._stop.is_set():
            if not self.connected.wait(0.2):
                continue
            while not self._volatile.empty():
                topic, payload, retain = self._volatile.get_nowait()
                self.client.publish(topic, payload, qos=1, retain=retain)
            with self._lock:
                room = self.cfg.max_inflight - len(self._inflight)
                after = self._cursor
            if room <= 0:
                time.sleep(0.002)
                continue
            batch = self.outbox.pending(limit=room, after=after)
            if not batch:
                time.sleep(0.02)
                continue
            for item in batch:
                info = self.client.publish(item.topic, item.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # disconnected meanwhile: the reconnect resets the cursor
                with self._lock:
                    self._inflight[info.mid] = item.rowid
                    self._cursor = max(self._cursor, item.rowid)
                self.published += 1

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()
        self._thread.start()

    def stop(self) -> None:
        """Publish "offline" (a clean stop is not a crash: no last will), then disconnect."""
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, schemas.status(self.device, "offline"), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.client.disconnect()
        self.client.loop_stop()


class LinkOutput(Output):
    """The link's life in the frame loop: connected at start; per frame the broker gauge and, every `every_s`, the
    stats; at the stop the last stats and a clean "offline"."""

    name = "mqtt"

    def __init__(self, link: MqttLink, stats: Callable[[], bytes], every_s: float, gauge: Any) -> None:
        self.link, self.stats, self.every_s, self.gauge = link, stats, every_s, gauge
        self._topic = schemas.topic(link.device, "stats")
        self._next = 0.0

    def start(self) -> None:
        self.link.start()
        self._next = time.monotonic() + self.every_s

    def frame(self, done: FrameDone) -> None:
        self.gauge.set(1 if self.link.connected.is_set() else 0)
        if time.monotonic() > self._next:
            self.link.send_volatile(self._topic, self.stats())
            self._next = time.monotonic() + self.every_s

    def stop(self) -> None:
        self.link.send_volatile(self._topic, self.stats())
        time.sleep(0.1)
        self.link.stop()
