"""`bouncer run`: the camera loop. Source -> guard -> decision -> each output (devices/outputs.py: the line, the
outbox and its MQTT link, alerts, metrics, the updater, Sparkplug), with drift monitoring. The loop never waits on
the network: outputs hand over to their own threads, and flagged frames only go to the outbox on disk."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bouncer.devices import profiles
from bouncer.devices.assembly import build_outputs
from bouncer.devices.gate_life import GateLife
from bouncer.devices.ids import device_key
from bouncer.devices.metrics import DeviceMetrics
from bouncer.devices.ota import GateSlots, Trial
from bouncer.devices.outputs import FrameDone, Output
from bouncer.devices.plc import part_id_reader
from bouncer.devices.prefetch import Arrival, Prefetch
from bouncer.devices.systemd import Notifier
from bouncer.runtime import schemas
from bouncer.runtime.config import Config
from bouncer.runtime.drift import DriftMonitor
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import VERDICTS, Verdict, unreadable
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.loading import open_guard
from bouncer.runtime.outbox import Outbox
from bouncer.runtime.sources.streams import FrameItem, open_source

if TYPE_CHECKING:
    from bouncer.devices.link import MqttLink
    from bouncer.devices.ota import OtaUpdater

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
    outputs: dict[str, Any] = field(default_factory=dict)  # the outputs' reports: sparkplug, line (by protocol)

    def add(self, out: Output, report: dict[str, Any]) -> None:
        if out.section:
            self.outputs.setdefault(out.section, {})[out.name] = report
        else:
            self.outputs[out.name] = report

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "outputs"}
        return {**d, **self.outputs}


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


class Device:
    """One camera's guard: the frame loop and its outputs (devices/assembly.py builds them from the config)."""

    def __init__(self, cfg: Config, extra: Sequence[Output] = ()) -> None:
        self.cfg = cfg
        self.id = cfg.device.id
        profile = profiles.detect() if cfg.device.profile == "auto" else profiles.get(cfg.device.profile)
        self.profile = profile
        data = Path(cfg.device.data_dir)
        serial = 0
        bundle: GateBundle | Path = Path(cfg.gate.bundle)
        if cfg.ota.url:  # a committed over-the-air gate wins over the configured one (see devices/ota.py)
            bundle, serial = GateSlots(data / "gates").boot(Path(cfg.gate.bundle))
        # the profile's runtime picks the cached backbone (LiteRT on a Raspberry Pi)
        guard = open_guard(bundle, Path(cfg.gate.model) if cfg.gate.model else None,
                           Path(cfg.gate.sidecar) if cfg.gate.sidecar else None, threads=profile.threads,
                           providers=list(profile.providers) or None,
                           runtime="litert" if profile.runtime == "litert" else "onnxruntime")  # fmt: skip
        self.outputs: list[Output] = []
        self.outbox = Outbox(data / "outbox.sqlite", int(cfg.outbox.max_mb * 1024 * 1024))
        self.id_key = device_key(data)
        self.metrics = DeviceMetrics(cfg.metrics.port)
        self.gates = GateLife(guard, serial, self._show_gate, self.emit_event)
        ref = guard.bundle.fit.drift_reference
        d = cfg.drift
        self.drift = DriftMonitor(ref, warmup=d.warmup, k=d.k, h=d.h, rate_h=d.rate_h)
        self.link: MqttLink | None = None  # set by the assembly when a broker is configured
        self.ota: OtaUpdater | None = None  # and the updater when ota.url is
        self.paused = threading.Event()
        self.drift_alarms, self.camera_lost = 0, False
        self.last_part: tuple[int, str] = (0, "")  # the last frame's part id and verdict (Sparkplug shows them)
        self.summary = RunSummary()
        self._stop = threading.Event()
        self.source_uri = cfg.source.uri
        self.part_ids = part_id_reader(cfg.line)  # the PLC numbers the parts (line.part_register)
        self.outputs = build_outputs(cfg, self) + list(extra)

    # ---- gate updates -----------------------------------------------------------------------------

    def on_announce(self, payload: bytes) -> None:
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
        if kind == "drift":
            self.drift_alarms += 1
        elif kind in ("camera_lost", "camera_recovered"):
            self.camera_lost = kind == "camera_lost"
        for out in self.outputs:
            out.event(kind, fields)

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
            "Last Part/Id": ("UInt64", self.last_part[0]),
            "Last Part/Verdict": ("String", self.last_part[1]),
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

    # ---- the loop ---------------------------------------------------------------------------------

    def arrive(self, item: FrameItem) -> None:
        """What happens to a frame as it comes in, before any waiting: the PLC's part id is read now."""
        if self.part_ids is not None:
            item.part = self.part_ids.read()

    def process(self, item: FrameItem, prev: np.ndarray | None, finite: bool, arrived: Arrival | None = None
                ) -> np.ndarray | None:  # fmt: skip
        """Decide one frame and hand it to every output; returns its grey image, the next frame's `prev`.
        `arrived`: the frame as the prefetch thread read and prepared it (then `prev` was its business)."""
        if item.event:
            self.emit_event(item.event.pop("event"), **item.event)
            return prev
        t_start = time.perf_counter()
        if arrived is None:
            self.arrive(item)
        t0 = t_start if arrived is None else arrived.t_in
        outputs = grey = None
        if item.frame is None:
            decision = unreadable(item.error or "unreadable frame")
        elif arrived is not None and arrived.prepared is not None:
            decision, outputs, grey = self.guard.finish(arrived.prepared)
        else:
            decision, outputs, grey = self.guard.score_frame(item.frame, prev)
        s = self.summary
        s.frames += 1
        done = FrameDone(item, decision, outputs, s.frames, t0, time.perf_counter() - t_start,
                         self.guard.bundle.version, self.source_uri, finite)  # fmt: skip
        self.last_part = (item.part or 0, str(decision.decision))  # before the outputs: Sparkplug reports it
        for out in self.outputs:
            out.frame(done)
        s.decisions[decision.decision] += 1
        if decision.decision == Verdict.ACCEPT and decision.label is not None:
            s.accepted[decision.label] = s.accepted.get(decision.label, 0) + 1
        for ev in self.drift.update(
            decision.quality, decision.ood_score, decision.decision, decision.label, decision.boxes
        ):
            self.emit_event(ev.pop("event"), **ev)
        return grey

    def close(self) -> None:
        """For a caller that drove `process` itself instead of `run` (the benches): every output stopped (the
        outbox's writer has then written all it was given), the outbox closed."""
        for out in self.outputs:
            out.stop()
        self.outbox.close()

    def stop(self) -> None:
        """End the run from another thread (what SIGTERM does for `bouncer run`)."""
        self._stop.set()
        if getattr(self, "source", None) is not None:
            self.source.stop.set()

    def run(self, once: bool = False, drain_timeout: float = 60.0, handle_signals: bool = True) -> RunSummary:
        src = self.cfg.source
        self.source = open_source(src.uri, loop=src.loop and not once, skip_under_load=src.skip_under_load,
                                  camera=self.cfg.camera)  # fmt: skip
        self.source_uri = self.source.uri
        if once and not self.source.finite:
            raise BouncerError(f"--once needs a finite source (a folder or video file), not {self.source.uri}")
        finite = self.source.finite
        done = self.outbox.done(self.source.uri) if finite else set()
        max_fps = self.cfg.source.max_fps or (self.profile.max_fps if self.source.live else 0.0)
        period = 1.0 / max_fps if max_fps else 0.0
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        notify = Notifier.from_env()  # under systemd: ready now, then the watchdog fed once per frame
        started: list[Output] = []
        failed: BouncerError | None = None
        try:
            for out in self.outputs:
                out.start()
                started.append(out)
            notify.ready(f"guarding {self.source.uri} with gate {self.guard.bundle.version}")
            prefetch = Prefetch(self.source, lambda: self.guard, self.arrive,
                                lambda item: finite and item.key in done, period)  # fmt: skip
            try:
                for arrived in prefetch:
                    notify.alive()
                    if self._stop.is_set():
                        break
                    while self.paused.is_set() and not self._stop.is_set():
                        notify.alive()  # paused by a command: alive, not stuck
                        time.sleep(0.1)
                    self.gates.between_frames()
                    self.process(arrived.item, None, finite, arrived)  # the outbox marks a finite one done
            finally:
                prefetch.close()
                self.summary.skipped_done += prefetch.skipped
            for out in self.outputs:
                out.flush()  # the last flagged frames on disk before the outbox's depth is read
            if once and self.link:
                deadline = time.monotonic() + drain_timeout
                while self.outbox.depth() and time.monotonic() < deadline and not self._stop.is_set():
                    time.sleep(0.05)
        finally:
            notify.stopping()
            self.summary.undelivered = self.outbox.depth()
            self.summary.peak_rss_mb = peak_rss_mb()
            for out in started:
                try:
                    out.stop()
                except BouncerError as exc:  # said (once) when all are stopped: the outbox's last write failed
                    failed = failed or exc
                except Exception:  # one output failing to stop must not keep the others (or the outbox) open
                    log.exception("stopping output %s", out.name)
                report = out.report()
                if report is not None:
                    self.summary.add(out, report)
            if self.part_ids is not None:
                self.part_ids.close()
                self.summary.outputs.setdefault("line", {})["part_ids"] = self.part_ids.report()
            self.outbox.close()
        if failed is not None:
            raise failed
        return self.summary
