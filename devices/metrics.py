"""Prometheus metrics of a device (prometheus-client), served on `metrics.port` when set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class DeviceMetrics:
    def __init__(self) -> None:
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

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
