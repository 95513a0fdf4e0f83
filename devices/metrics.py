"""Prometheus metrics of a device (prometheus-client), served on `metrics.port` when set."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bouncer.devices.outputs import FrameDone, Output


class DeviceMetrics(Output):
    """The registry, and the output that counts each frame and drift alarm into it."""

    name = "metrics"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("bouncer_frames", "frames processed", registry=r)
        self.decisions = Counter(
            "bouncer_decisions", "decisions by outcome and reason", ["decision", "reason"], registry=r
        )
        self.stage = Histogram(
            "bouncer_stage_seconds",
            "per-stage latency",
            ["stage"],
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.outbox_depth = Gauge("bouncer_outbox_depth", "messages waiting for the broker", registry=r)
        self.outbox_bytes = Gauge("bouncer_outbox_bytes", "bytes waiting for the broker", registry=r)
        self.evictions = Counter("bouncer_outbox_evictions", "flagged frames evicted by the disk budget", registry=r)
        self.drift = Gauge("bouncer_drift_active", "1 while a drift alarm stands, per signal", ["signal"], registry=r)
        self.gate = Gauge("bouncer_gate_info", "the active gate", ["version", "backbone"], registry=r)
        self.connected = Gauge("bouncer_broker_connected", "1 while connected to the broker", registry=r)
        # label lookups cost microseconds per frame: resolve them once
        self.guard_timer = self.stage.labels("guard")
        self.outbox_timer = self.stage.labels("outbox")
        self._decision_counters: dict[tuple[str, str], Any] = {}

    def start(self) -> None:
        if self.port:
            start_http_server(self.port, registry=self.registry)

    def frame(self, done: FrameDone) -> None:
        self.guard_timer.observe(done.spent_s)
        self.frames.inc()
        d = done.decision
        for reason in d.reasons or ["-"]:
            key = (d.decision, reason)
            counter = self._decision_counters.get(key)
            if counter is None:
                counter = self._decision_counters[key] = self.decisions.labels(*key)
            counter.inc()

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "drift":
            self.drift.labels(str(fields.get("signal", "?"))).set(1)
