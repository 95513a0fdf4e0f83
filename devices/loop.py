"""`bouncer run`: the camera loop. Source -> guard -> decision -> outbox (-> MQTT link), with drift
monitoring, stats and metrics. The loop never waits on the network: it only writes to the outbox."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from bouncer.devices import profiles
from bouncer.devices.alerts import Alerts
from bouncer.devices.gate_life import GateLife
from bouncer.devices.ids import device_key, message_id
from bouncer.devices.metrics import DeviceMetrics
from bouncer.devices.ota import GateSlots, OtaUpdater, Trial
from bouncer.devices.systemd import Notifier
from bouncer.runtime import backends, home, schemas
from bouncer.runtime.backends.paired import PairedBackend
from bouncer.runtime.config import Config
from bouncer.runtime.drift import DriftMonitor
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates import explain
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import VERDICTS, Decision, Verdict, unreadable
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.heads import frame_vectors
from bouncer.runtime.outbox import Outbox
from bouncer.runtime.sources.streams import FrameItem, open_source

if TYPE_CHECKING:
    from bouncer.devices.plc import LineOutput

log = logging.getLogger("bouncer.device")


@dataclass
class RunSummary:
    frames: int = 0
    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    accepted: dict[str, int] = field(default_factory=dict)  # accepted frames by class
    skipped_done: int = 0
    events: int = 0
    alerts: int = 0  # operator alerts sent (one per incident)
    undelivered: int = 0
    peak_rss_mb: float = 0.0
    sparkplug: dict[str, Any] | None = None  # births and data messages sent, the last bdSeq
    line: dict[str, Any] | None = None  # verdicts written to the PLC, late ones, latency frame in -> written

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM of the current address space (ru_maxrss would also
    count the parent's pages this process was forked with before it exec'd)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def encode_jpeg(frame: np.ndarray, max_side: int, quality: int) -> bytes:
    h, w = frame.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        frame = cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BouncerError("JPEG encoding failed")
    return buf.tobytes()


class Observer(Protocol):
    """Something watching a device from inside its process (the demo's ground-truth tally)."""

    def frame(self, item: FrameItem, decision: Decision) -> None: ...

    def event(self, kind: str, fields: dict[str, Any]) -> None: ...


class Device:
    def __init__(self, cfg: Config, observer: Observer | None = None) -> None:
        self.cfg = cfg
        self.observer = observer
        self.id = cfg.device.id
        profile = profiles.detect() if cfg.device.profile == "auto" else profiles.get(cfg.device.profile)
        self.profile = profile
        data = Path(cfg.device.data_dir)
        serial = 0
        if cfg.ota.url:
            # a committed over-the-air gate wins over the configured one (see devices/ota.py)
            bundle, serial = GateSlots(data / "gates").boot(Path(cfg.gate.bundle))
        else:
            bundle = GateBundle.load(Path(cfg.gate.bundle))
        if cfg.gate.model:
            model = Path(cfg.gate.model)
        else:  # the profile's runtime picks the cached backbone (LiteRT on a Raspberry Pi)
            model = home.cached_model("litert" if profile.runtime == "litert" else "onnxruntime")
        backend = backends.load(model, profile.threads, list(profile.providers) or None)
        if bundle.sidecar is not None:  # a gate around the user's model reads Bouncer's backbone beside it
            side = Path(cfg.gate.sidecar) if cfg.gate.sidecar else home.cached_model(
                "litert" if profile.runtime == "litert" else "onnxruntime")  # fmt: skip
            backend = PairedBackend(backend, backends.load(side, profile.threads, list(profile.providers) or None))
        guard = Guard(bundle, backend)
        self.outbox = Outbox(data / "outbox.sqlite", int(cfg.outbox.max_mb * 1024 * 1024))
        self._id_key = device_key(data)
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="bouncer-explain")
        self.metrics = DeviceMetrics()
        # label lookups cost microseconds per frame: resolve the per-stage timers once
        self._guard_timer = self.metrics.stage.labels("guard")
        self._outbox_timer = self.metrics.stage.labels("outbox")
        self._decision_counters: dict[tuple[str, str], Any] = {}
        self.gates = GateLife(guard, serial, self._show_gate, self.emit_event)
        ref = bundle.fit_metrics.get("drift_reference", {})
        d = cfg.drift
        self.drift = DriftMonitor(ref, warmup=d.warmup, k=d.k, h=d.h, rate_h=d.rate_h)
        self.link = None
        self.paused = threading.Event()
        self.ota: OtaUpdater | None = None
        if cfg.ota.url:
            g = self.gates
            self.ota = OtaUpdater(cfg.ota, data, g.serving, g.offer, self.emit_event, g.flag_rate.rate,
                                  group=cfg.device.group)  # fmt: skip
            g.attach(self.ota)
        if cfg.mqtt.broker:
            from bouncer.devices.link import MqttLink

            extra = {schemas.gate_topic(cfg.device.group): self._on_announce} if self.ota else {}
            self.link = MqttLink(cfg.mqtt, self.id, self.outbox, on_command=self.on_command, subscriptions=extra)
        self.lines: list[LineOutput] = []  # the verdict to the line's controller (docs/line.md)
        self._line_gate = self.guard.bundle.version  # the gate the outputs last showed
        c = cfg.line
        if c.modbus:
            from bouncer.devices.plc import ModbusLine

            self.lines.append(ModbusLine(c.modbus, c.unit, c.register, c.deadline_ms, c.heartbeat_s, c.timeout_s))
        if c.opcua:
            from bouncer.devices.opcua import OpcUaLine

            self.lines.append(OpcUaLine(c.opcua, self.id, self.guard.bundle.version, c.deadline_ms, c.heartbeat_s))
        a = cfg.alerts
        self.alerts = Alerts(self.send_alert, a.min_frames, a.window_s, a.quiet_s)
        self.drift_alarms, self.camera_lost = 0, False
        self.sparkplug = None
        if cfg.sparkplug.group:
            from bouncer.devices.sparkplug import SparkplugNode

            sp = cfg.sparkplug
            self.sparkplug = SparkplugNode(cfg.mqtt, sp.group, self.id, self.sparkplug_metrics, data, sp.every_s)
        self.summary = RunSummary()
        self._stop = threading.Event()
        self._audit_rate = cfg.outbox.audit_rate
        self._audit_rng = np.random.default_rng()

    # ---- gate updates -----------------------------------------------------------------------------

    def _on_announce(self, payload: bytes) -> None:
        try:
            ann = schemas.GateAnnouncement.decode(payload)
        except schemas.SchemaError as exc:
            self.emit_event("announcement_rejected", reason=str(exc)[:300])
            return
        if self.ota and ann.serial != self.serial:
            self.ota.poke()

    def _show_gate(self, bundle: GateBundle) -> None:
        """The gate-info metric names the serving gate only."""
        self.metrics.gate.clear()
        self.metrics.gate.labels(bundle.version, bundle.backbone_hash[:12]).set(1)

    @property
    def guard(self) -> Guard:
        return self.gates.guard

    @property
    def serial(self) -> int:
        return self.gates.serial

    @property
    def trial(self) -> Trial | None:
        return self.gates.trial

    # ---- messages ---------------------------------------------------------------------------------

    def emit_event(self, kind: str, **fields: Any) -> None:
        payload = schemas.event(self.id, kind, **fields)
        self.outbox.put(json.loads(payload)["id"], schemas.topic(self.id, "events"), payload, "event")
        self.summary.events += 1
        log.info("event %s %s", kind, fields)
        if kind in ("drift", "camera_lost", "camera_recovered"):  # the frame loop's own events: its thread
            if kind == "drift":
                self.drift_alarms += 1
            self.camera_lost = kind == "camera_lost" or (self.camera_lost and kind != "camera_recovered")
            self.alerts.event(time.time(), kind, fields)
        if self.observer is not None:
            self.observer.event(kind, fields)

    def send_alert(self, alert: str, fields: dict[str, Any]) -> None:
        """An operator alert, through the outbox like events (never evicted): one per incident."""
        b = self.guard.bundle
        payload = schemas.alert(self.id, alert, group=self.cfg.device.group, gate_version=b.version, **fields)
        self.outbox.put(json.loads(payload)["id"], schemas.topic(self.id, "alerts"), payload, "alert")
        self.summary.alerts += 1
        log.warning("alert %s: %s", alert, fields["summary"])

    def sparkplug_metrics(self) -> dict[str, tuple[str, Any]]:
        """What SCADA/MES sees of this camera (docs/sparkplug.md); read on the Sparkplug thread."""
        d = self.summary.decisions
        rate = self.gates.flag_rate.rate()
        out: dict[str, tuple[str, Any]] = {
            "Frames": ("UInt64", self.summary.frames),
            "Verdicts/Accept": ("UInt64", d.get("accept", 0)),
            "Verdicts/Review": ("UInt64", d.get("review", 0)),
            "Verdicts/Reject": ("UInt64", d.get("reject", 0)),
            "Review Rate": ("Double", float(rate) if rate is not None else 0.0),
            "Outbox Depth": ("UInt64", self.outbox.depth()),
            "Alerts": ("UInt64", self.summary.alerts),
            "Camera Lost": ("Boolean", self.camera_lost),
            "Drift/Alarms": ("UInt64", self.drift_alarms),
            "Gate/Version": ("String", self.guard.bundle.version),
            "Gate/Serial": ("UInt64", self.serial),
            "Properties/Group": ("String", self.cfg.device.group),
            "Properties/Profile": ("String", self.profile.name),
        }
        for name, value in self.drift.statistics().items():
            out[f"Drift/{name}"] = ("Double", float(value))
        return out

    def on_command(self, payload: bytes) -> None:
        """Runs on the MQTT thread: validate, act, and answer bad commands with an event."""
        try:
            cmd = schemas.Command.decode(payload)
        except schemas.SchemaError as exc:
            self.emit_event("command_rejected", reason=str(exc)[:300], size=len(payload))
            return
        if cmd.command == "pause":
            self.paused.set()
        elif cmd.command == "resume":
            self.paused.clear()
        self.emit_event("command_done", command=cmd.command, command_id=cmd.id)
        if cmd.command in ("stats", "ping") and self.link:
            self.link.send_volatile(schemas.topic(self.id, "stats"), self.stats_payload())

    def stats_payload(self) -> bytes:
        return schemas.encode(
            {
                "device": self.id,
                "ts": time.time(),
                "frames": self.summary.frames,
                "decisions": self.summary.decisions,
                "outbox_depth": self.outbox.depth(),
                "evicted": self.outbox.counter("evicted"),
                "drift": self.drift.state,
                "drift_stats": self.drift.statistics(),
                "drift_h": {"signal": self.drift.h, "rate": self.drift.rate_h},
                "gate_version": self.guard.bundle.version,
                "gate_serial": self.serial,
                "backbone_hash": self.guard.bundle.backbone_hash,
                "group": self.cfg.device.group,
                "profile": self.profile.name,
            }
        )

    def flag(
        self,
        item: FrameItem,
        decision: Decision,
        outputs: dict[str, np.ndarray] | None,
        finite: bool,
        audit: bool = False,
    ) -> str:
        """Store a flagged (or audited) frame in the outbox; returns its message id once it is on disk.

        The rest of the message (feature vectors, heatmap, JSON) is built on a helper thread while this one
        encodes the JPEG, which releases the GIL at once, so the two share the cores (the JPEG alone was 40%
        of a flagged frame's cost). The other way round, the helper waited for the GIL before it could start."""
        b = self.guard.bundle
        msg = schemas.FrameMessage(
            id=message_id(self._id_key, self.id, self.source_uri, item.key, finite),
            device=self.id,
            ts=time.time(),
            source=item.source,
            decision=decision.decision,
            label=decision.label,
            confidence=decision.confidence,
            ood_score=decision.ood_score,
            reasons=decision.reasons,
            details=decision.details,
            boxes=decision.boxes,
            size=decision.size if decision.boxes is not None else None,
            candidates=decision.candidates,
            quality={k: round(v, 4) for k, v in decision.quality.items()},
            gate_version=b.version,
            backbone_hash=b.backbone_hash,
            jpeg=b"",
            group=self.cfg.device.group,
            audit=audit,
        )
        job = self._helper.submit(self._explain, msg, outputs)
        ob = self.cfg.outbox
        jpeg = b"" if item.frame is None else encode_jpeg(item.frame, ob.jpeg_max_side, ob.jpeg_quality)
        payload = msg.with_jpeg(job.result(), jpeg)
        evicted = self.outbox.put(msg.id, schemas.topic(self.id, "frames"), payload, decision.decision)
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            self.emit_event(
                "eviction",
                evicted=len(evicted),
                total_evicted=self.outbox.counter("evicted"),
                order="oldest reject first, then oldest review",
            )
        return msg.id

    def _explain(self, msg: schemas.FrameMessage, outputs: dict[str, np.ndarray] | None) -> bytes:
        """`msg` with what a flagged frame carries besides its JPEG: the vectors the station retrains from (every
        input head selection can choose from) and the heatmap PNG; encoded without the JPEG."""
        if outputs is not None:
            b = self.guard.bundle
            msg.features = frame_vectors(self.guard.backend.card, outputs)
            if self.cfg.outbox.explain:
                h = explain.heatmap(b, outputs, msg.features, self.guard.backend.card.anomaly_map)
                msg.heatmap = None if h is None else explain.heatmap_png(h)
        return msg.encode_head()

    # ---- the loop ---------------------------------------------------------------------------------

    def process(self, item: FrameItem, prev: np.ndarray | None, finite: bool) -> np.ndarray | None:
        m = self.metrics
        if item.event:
            self.emit_event(item.event.pop("event"), **item.event)
            return prev
        t0 = time.perf_counter()
        outputs = None
        grey = None
        if item.frame is None:
            decision = unreadable(item.error or "unreadable frame")
        else:
            decision, outputs, grey = self.guard.score_frame(item.frame, prev)
        spent = time.perf_counter() - t0
        for line in self.lines:  # the part in front of the camera: its verdict to the line first
            line.verdict(decision.decision, self.summary.frames + 1, t0)
            if self.guard.bundle.version != self._line_gate:
                line.set_gate(self.guard.bundle.version)
        if self.lines:
            self._line_gate = self.guard.bundle.version
        self._guard_timer.observe(spent)
        self.gates.observe(item.frame, decision, outputs, spent)
        self.summary.frames += 1
        self.summary.decisions[decision.decision] += 1
        if self.observer is not None:
            self.observer.frame(item, decision)
        if decision.decision == Verdict.ACCEPT and decision.label is not None:
            self.summary.accepted[decision.label] = self.summary.accepted.get(decision.label, 0) + 1
        m.frames.inc()
        for reason in decision.reasons or ["-"]:
            key = (decision.decision, reason)
            counter = self._decision_counters.get(key)
            if counter is None:
                counter = self._decision_counters[key] = m.decisions.labels(*key)
            counter.inc()
        for ev in self.drift.update(
            decision.quality, decision.ood_score, decision.decision, decision.label, decision.boxes
        ):
            m.drift.labels(ev["signal"]).set(1)
            self.emit_event(ev.pop("event"), **ev)
        audit = (
            decision.decision == Verdict.ACCEPT and self._audit_rate > 0 and self._audit_rng.random() < self._audit_rate
        )
        frame_id = None
        if decision.decision != Verdict.ACCEPT or audit:
            t1 = time.perf_counter()
            frame_id = self.flag(item, decision, outputs, finite, audit)
            self._outbox_timer.observe(time.perf_counter() - t1)
        self.alerts.frame(time.time(), decision.decision, decision.reasons, frame_id)
        return grey

    def stop(self) -> None:
        """End the run from another thread (what SIGTERM does for `bouncer run`)."""
        self._stop.set()
        if getattr(self, "source", None) is not None:
            self.source.stop.set()

    def run(self, once: bool = False, drain_timeout: float = 60.0, handle_signals: bool = True) -> RunSummary:
        self.source = open_source(
            self.cfg.source.uri, loop=self.cfg.source.loop and not once, skip_under_load=self.cfg.source.skip_under_load
        )
        self.source_uri = self.source.uri
        if once and not self.source.finite:
            raise BouncerError(f"--once needs a finite source (a folder or video file), not {self.source.uri}")
        finite = self.source.finite
        done = self.outbox.done(self.source.uri) if finite else set()
        self.metrics.serve(self.cfg.metrics.port)
        if self.link:
            self.link.start()
        if self.sparkplug:
            self.sparkplug.start()
        if self.ota:
            self.ota.start()
        max_fps = self.cfg.source.max_fps or (self.profile.max_fps if self.source.live else 0.0)
        period = 1.0 / max_fps if max_fps else 0.0
        prev = None
        next_stats = time.monotonic() + self.cfg.metrics.stats_every_s

        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        notify = Notifier.from_env()  # under systemd: ready now, then the watchdog fed once per frame
        notify.ready(f"guarding {self.source.uri} with gate {self.guard.bundle.version}")
        try:
            for item in self.source:
                notify.alive()
                if self._stop.is_set():
                    break
                while self.paused.is_set() and not self._stop.is_set():
                    notify.alive()  # paused by a command: alive, not stuck
                    time.sleep(0.1)
                if finite and item.key in done:
                    self.summary.skipped_done += 1
                    continue
                t0 = time.monotonic()
                self.gates.between_frames()
                prev = self.process(item, prev if self.source.stream else None, finite)
                if finite:
                    self.outbox.mark_done(self.source.uri, item.key)
                self.metrics.outbox_depth.set(self.outbox.depth())  # in memory: no query per frame
                self.metrics.outbox_bytes.set(self.outbox.bytes)
                if self.link:
                    self.metrics.connected.set(1 if self.link.connected.is_set() else 0)
                    if time.monotonic() > next_stats:
                        self.link.send_volatile(schemas.topic(self.id, "stats"), self.stats_payload())
                        next_stats = time.monotonic() + self.cfg.metrics.stats_every_s
                if period:
                    time.sleep(max(0.0, period - (time.monotonic() - t0)))
            if once and self.link:
                deadline = time.monotonic() + drain_timeout
                while self.outbox.depth() and time.monotonic() < deadline and not self._stop.is_set():
                    time.sleep(0.05)
        finally:
            notify.stopping()
            for line in self.lines:
                line.close()
            if self.lines:
                self.summary.line = {line.name: line.report() for line in self.lines}
            if self.ota:
                self.ota.stop()
            if self.sparkplug:
                self.sparkplug.stop()
                self.summary.sparkplug = self.sparkplug.report()
            self.summary.undelivered = self.outbox.depth()
            self.summary.peak_rss_mb = peak_rss_mb()
            if self.link:
                self.link.send_volatile(schemas.topic(self.id, "stats"), self.stats_payload())
                time.sleep(0.1)
                self.link.stop()
            self._helper.shutdown()
            self.outbox.close()
        return self.summary
