"""A device's outputs, built from its configuration, in the order each frame reaches them.

The line's verdict first (the part is in front of the camera), then the gate's own life (flag rate, trial,
canary), the metrics, the outbox (which names a flagged frame for the alerts after it), the alerts, the local
verdict log, the MQTT link, the over-the-air updater and Sparkplug. They start in this order and stop in it: the
line goes to hold before anything else winds down. A new output is its module (the output and its `build`) and its
entry in `BUILDERS`: devices/verdict_log.py is one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bouncer.devices import verdict_log
from bouncer.devices.alerts import Alerts
from bouncer.devices.flagging import Flagger
from bouncer.devices.outputs import Output
from bouncer.runtime import schemas
from bouncer.runtime.config import Config

if TYPE_CHECKING:
    from bouncer.devices.loop import Device

Builder = Callable[[Config, "Device"], Iterator[Output]]


def lines(cfg: Config, device: Device) -> Iterator[Output]:
    """The verdict to the line's controller (docs/line.md)."""
    c = cfg.line
    if c.modbus:
        from bouncer.devices.plc import ModbusLine

        yield ModbusLine(c.modbus, c.unit, c.register, c.deadline_ms, c.heartbeat_s, c.timeout_s)
    if c.opcua:
        from bouncer.devices.opcua import OpcUaLine

        yield OpcUaLine(c.opcua, device.id, device.guard.bundle.version, c.deadline_ms, c.heartbeat_s)


def gate_life(cfg: Config, device: Device) -> Iterator[Output]:
    yield device.gates


def metrics(cfg: Config, device: Device) -> Iterator[Output]:
    yield device.metrics


def outbox(cfg: Config, device: Device) -> Iterator[Output]:
    yield Flagger(device.id, cfg.device.group, device.outbox, device.id_key, lambda: device.guard, cfg.outbox,
                  device.metrics, device.emit_event)  # fmt: skip


def alerts(cfg: Config, device: Device) -> Iterator[Output]:
    a = cfg.alerts
    yield Alerts(device.send_alert, a.min_frames, a.window_s, a.quiet_s)


def link(cfg: Config, device: Device) -> Iterator[Output]:
    if cfg.mqtt.broker:
        from bouncer.devices.link import LinkOutput, MqttLink

        extra = {schemas.gate_topic(cfg.device.group): device.on_announce} if cfg.ota.url else {}
        device.link = MqttLink(cfg.mqtt, device.id, device.outbox, on_command=device.on_command, subscriptions=extra)
        yield LinkOutput(device.link, device.stats_payload, cfg.metrics.stats_every_s, device.metrics.connected)


def ota(cfg: Config, device: Device) -> Iterator[Output]:
    if cfg.ota.url:
        from bouncer.devices.ota import OtaUpdater

        g = device.gates
        device.ota = OtaUpdater(cfg.ota, Path(cfg.device.data_dir), g.serving, g.offer, device.emit_event,
                                g.flag_rate.rate, group=cfg.device.group)  # fmt: skip
        g.attach(device.ota)
        yield device.ota


def sparkplug(cfg: Config, device: Device) -> Iterator[Output]:
    if cfg.sparkplug.group:
        from bouncer.devices.sparkplug import SparkplugNode

        sp = cfg.sparkplug
        yield SparkplugNode(cfg.mqtt, sp.group, device.id, device.sparkplug_metrics, Path(cfg.device.data_dir),
                            sp.every_s)  # fmt: skip


BUILDERS: tuple[Builder, ...] = (lines, gate_life, metrics, outbox, alerts, verdict_log.build, link, ota, sparkplug)


def build_outputs(cfg: Config, device: Device) -> list[Output]:
    return [out for build in BUILDERS for out in build(cfg, device)]
