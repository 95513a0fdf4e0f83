"""The camera as a Sparkplug B edge node (Eclipse Sparkplug 3.0), for the plant's SCADA/MES: NBIRTH with every
metric when it connects, NDATA with the metrics that changed, and NDEATH as its MQTT will, so a host sees the
camera go offline when the process dies, however it dies.

Its own MQTT connection (clean session, the will is per connection) beside the device's link. The payloads are
protobuf, encoded by the module protoc generated from the specification's schema (sparkplug_b.proto).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bouncer.devices import sparkplug_b_pb2 as pb
from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.config import MqttSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.mqtt_client import new_client

log = logging.getLogger("bouncer.sparkplug")

NAMESPACE = "spBv1.0"
# Sparkplug data type codes (the specification's table; sparkplug_b.proto repeats it)
TYPES = {"UInt64": 8, "Double": 10, "Boolean": 11, "String": 12}
_FIELD = {8: "long_value", 10: "double_value", 11: "boolean_value", 12: "string_value"}
REBIRTH = "Node Control/Rebirth"
PART_METRICS = "Last Part/"  # the last part's Id and Verdict: per part, by exception, when frames have parts
# group and edge node ids: no MQTT wildcards or separators (the specification), and short
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

Metrics = dict[str, tuple[str, Any]]  # name -> (Sparkplug type name, value)


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise BouncerError(f"{what}: 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric, got {value!r}")
    return value


def topic(group: str, kind: str, node: str) -> str:
    """spBv1.0/<group>/<NBIRTH|NDATA|NDEATH|NCMD>/<edge node>"""
    return f"{NAMESPACE}/{group}/{kind}/{node}"


def metric(p: Any, name: str | None, alias: int, kind: str, value: Any, ts_ms: int) -> None:
    m = p.metrics.add()
    if name is not None:
        m.name = name
    m.alias, m.timestamp, m.datatype = alias, ts_ms, TYPES[kind]
    setattr(m, _FIELD[TYPES[kind]], value)


def decode(payload: bytes) -> dict[str, Any]:
    """A Sparkplug B payload as a dict (for hosts, tests and `bouncer` tools); a clear error if it is not one."""
    p = pb.Payload()
    try:
        p.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BouncerError(f"not a Sparkplug B payload: {exc}") from None
    out: dict[str, Any] = {"timestamp": p.timestamp, "metrics": []}
    if p.HasField("seq"):
        out["seq"] = p.seq
    for m in p.metrics:
        field = m.WhichOneof("value")
        name = m.name if m.HasField("name") else None
        value = getattr(m, field) if field else None
        out["metrics"].append({"name": name, "alias": m.alias, "datatype": m.datatype, "value": value})
    return out


class BdSeq:
    """The birth/death sequence number, kept on disk: a host must be able to tell the will of a session that
    died before a restart from the death of the one it now has."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def next(self) -> int:
        try:
            last = int(self.path.read_text().strip())
        except (OSError, ValueError):
            last = -1
        value = (last + 1) % 256
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{value}\n")
        return value


class SparkplugNode(Output):
    """Births, data and deaths for one camera. `snapshot` returns the metrics now; it runs on this class's
    thread every `every_s` and must only read."""

    name = "sparkplug"

    def __init__(
        self,
        mqtt_cfg: MqttSection,
        group: str,
        node: str,
        snapshot: Callable[[], Metrics],
        data_dir: Path,
        every_s: float = 5.0,
    ) -> None:
        self.group, self.node = check_id(group, "sparkplug.group"), check_id(node, "device.id")
        self.snapshot, self.every_s = snapshot, every_s
        self._bdseq = BdSeq(data_dir / "sparkplug.bdseq")
        self._seq = 0
        self._aliases: dict[str, int] = {}
        self._last: dict[str, Any] = {}
        self._lock = threading.Lock()  # births and data in sequence order, from either thread
        self._stop = threading.Event()
        self._rebirth = threading.Event()
        self.connected = threading.Event()
        self.births = self.data_messages = 0
        self._by_part = False  # set once a frame with a part id was reported by `frame`
        # a clean session, as the specification asks of an edge node: its state is its birth, not the broker's
        v5 = mqtt_cfg.protocol == "v5"
        clean: dict[str, Any] = {} if v5 else {"clean_session": True}
        self.client, self.host, self.port = new_client(mqtt_cfg, f"bouncer-spb-{node}", **clean)
        self._connect_args: dict[str, Any] = {"keepalive": mqtt_cfg.keepalive}
        if v5:
            self._connect_args["clean_start"] = True
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._thread = threading.Thread(target=self._run, name="bouncer-sparkplug", daemon=True)

    def _death(self, bdseq: int) -> bytes:
        p = pb.Payload(timestamp=int(time.time() * 1000))
        metric(p, "bdSeq", 0, "UInt64", bdseq, p.timestamp)
        return p.SerializeToString()

    def start(self) -> None:
        """The will is set per connection attempt with that attempt's bdSeq (Sparkplug 3.0)."""
        self._arm_will()
        self.client.connect_async(self.host, self.port, **self._connect_args)
        self.client.loop_start()
        self._thread.start()

    def _arm_will(self) -> None:
        self._bd = self._bdseq.next()
        self.client.will_set(topic(self.group, "NDEATH", self.node), self._death(self._bd), qos=1, retain=False)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("sparkplug: broker refused the connection: %s", reason_code)
            return
        client.subscribe(topic(self.group, "NCMD", self.node), qos=1)
        self.connected.set()
        self._rebirth.set()  # every (re)connection starts with a birth

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """The next connection is a new session: a new bdSeq in its will and its birth."""
        self.connected.clear()
        if not self._stop.is_set():
            self._arm_will()

    def _on_message(self, client, userdata, msg) -> None:
        """NCMD: a host asks for a rebirth; anything else, or a malformed payload, is logged and ignored."""
        try:
            cmd = decode(msg.payload)
        except BouncerError as exc:
            log.warning("sparkplug: ignored NCMD: %s", exc)
            return
        if any(m["name"] == REBIRTH and m["value"] is True for m in cmd["metrics"]):
            self._rebirth.set()

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) % 256
        return seq

    def birth(self) -> None:
        """NBIRTH: every metric by name and alias, seq 0, the bdSeq of this connection."""
        now = self.snapshot()
        with self._lock:
            self._seq = 0
            ts = int(time.time() * 1000)
            p = pb.Payload(timestamp=ts, seq=self._next_seq())
            metric(p, "bdSeq", 0, "UInt64", self._bd, ts)
            metric(p, REBIRTH, 1, "Boolean", False, ts)
            self._aliases = {name: i + 2 for i, name in enumerate(sorted(now))}
            for name, (kind, value) in sorted(now.items()):
                metric(p, name, self._aliases[name], kind, value, ts)
            self._last = {name: value for name, (_, value) in now.items()}
            self.client.publish(topic(self.group, "NBIRTH", self.node), p.SerializeToString(), qos=0)
            self.births += 1

    def data(self) -> None:
        """NDATA: the metrics that changed since the last message, by alias. A metric the birth did not declare
        (a class first seen by the drift monitor) takes a new birth instead."""
        now = self.snapshot()
        if set(now) != set(self._aliases):
            self.birth()
            return
        changed = {k: v for k, v in now.items() if self._last.get(k) != v[1]}
        if self._by_part:  # `frame` reports those, each part in order; a snapshot here could be one behind
            changed = {k: v for k, v in changed.items() if not k.startswith(PART_METRICS)}
        if not changed:
            return
        with self._lock:
            ts = int(time.time() * 1000)
            p = pb.Payload(timestamp=ts, seq=self._next_seq())
            for name, (kind, value) in sorted(changed.items()):
                metric(p, None, self._aliases[name], kind, value, ts)
                self._last[name] = value
            self.client.publish(topic(self.group, "NDATA", self.node), p.SerializeToString(), qos=0)
            self.data_messages += 1

    def frame(self, done: FrameDone) -> None:
        """A frame of a part (a triggered camera's): its part id and verdict at once, by exception, so SCADA/MES
        sees every part's verdict and not one every `every_s`. Frames without a part wait for the period."""
        part = done.item.part
        if part is None or not self.connected.is_set():
            return
        verdict = str(done.decision.decision)
        metrics = ((f"{PART_METRICS}Id", "UInt64", part), (f"{PART_METRICS}Verdict", "String", verdict))
        with self._lock:
            if any(name not in self._aliases for name, _, _ in metrics):
                return  # not born yet: the birth carries them
            ts = int(time.time() * 1000)
            p = pb.Payload(timestamp=ts, seq=self._next_seq())
            for name, kind, value in metrics:
                metric(p, None, self._aliases[name], kind, value, ts)
                self._last[name] = value
            self.client.publish(topic(self.group, "NDATA", self.node), p.SerializeToString(), qos=0)
            self.data_messages += 1
            self._by_part = True

    def _run(self) -> None:
        next_data = time.monotonic() + self.every_s
        while not self._stop.wait(0.05):
            if not self.connected.is_set():
                continue
            try:
                if self._rebirth.is_set():
                    self._rebirth.clear()
                    self.birth()
                    next_data = time.monotonic() + self.every_s
                elif time.monotonic() >= next_data:
                    self.data()
                    next_data = time.monotonic() + self.every_s
            except Exception:  # a metric the snapshot could not read must not end the node
                log.exception("sparkplug: publishing failed")

    def stop(self) -> None:
        """A clean stop publishes the death certificate itself, then disconnects (no will then)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.connected.is_set():
            self.data()  # the last counts first
            info = self.client.publish(topic(self.group, "NDEATH", self.node), self._death(self._bd), qos=1)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

    def report(self) -> dict[str, Any]:
        return {"births": self.births, "data": self.data_messages, "bdseq": self._bd}
