"""The station's TOML config (docs/config.md): same loader and error style as the device's."""

from __future__ import annotations

from dataclasses import dataclass, field

from bouncer.runtime.config import MqttSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.schemas import SchemaError, gate_topic

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class StationSection:
    data_dir: str = "bouncer-station"
    group: str = "default"  # the gate group this station trains and publishes
    share_group: str = "bouncer-station"  # $share/<share_group>/...: workers split the load; "" = no sharing
    worker: str = ""  # MQTT client id suffix; empty: host name and process id


@dataclass
class HttpSection:
    host: str = "127.0.0.1"  # anything but loopback needs a token
    port: int = 8080
    token_env: str = "BOUNCER_STATION_TOKEN"  # the API token is read from this environment variable


@dataclass
class StationConfig:
    station: StationSection = field(default_factory=StationSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)

    def validate(self) -> StationConfig:
        try:
            gate_topic(self.station.group)
        except SchemaError as exc:
            raise BouncerError(f"station.group: {exc}") from None
        if self.mqtt.broker and not self.mqtt.broker.startswith(("mqtt://", "mqtts://")):
            raise BouncerError(f"mqtt.broker: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.mqtt.broker!r}")
        if not 0 <= self.http.port <= 65535:
            raise BouncerError("http.port: value out of range")
        return self
