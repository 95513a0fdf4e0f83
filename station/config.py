"""The station's TOML config (docs/config.md): same loader and error style as the device's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from msgspec import Meta

from bouncer.runtime.config import MqttSection, NonNegative, Port, check_fields
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.schemas import SchemaError, gate_topic

LOOPBACK = ("127.0.0.1", "localhost", "::1")


ROLES = ("ingest", "web", "retrain")


@dataclass
class StationSection:
    data_dir: str = "bouncer-station"
    groups: list[str] = field(default_factory=lambda: ["default"])  # lines / camera groups, one gate each
    share_group: str = "bouncer-station"  # $share/<share_group>/...: workers split the load; "" = no sharing
    worker: str = ""  # MQTT client id suffix, stable across restarts; empty: the host name (one worker per host)
    # the rows' database: empty for SQLite in data_dir, or postgresql://USER@HOST:PORT/DB (password: PGPASSWORD
    # or ~/.pgpass, as libpq reads them); frames and bundles stay files in data_dir
    database: str = ""
    # frames, heatmaps and quarantined payloads: empty for files in data_dir, or s3://BUCKET[/PREFIX][?endpoint=URL]
    # (credentials from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a web identity, an instance role)
    objects: str = ""
    # what this process does: ingest (MQTT -> store), web (UI, JSON API, TUF repository), retrain (retraining,
    # approval, signing, publishing; one holder at a time across all workers on one database)
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    # an object with no row, older than this, is removed (left by a crash; a live one is younger than 60 s)
    sweep_grace_s: Annotated[float, Meta(ge=60)] = 3600.0
    wait_s: NonNegative = 60.0  # at start: how long to wait for the database and the object store, saying so
    # unlabelled frames, quarantined payloads and device stats older than this are deleted (0: kept for ever);
    # labelled frames, gates, events and the audit log are always kept
    retention_days: NonNegative = 0.0


@dataclass
class HttpSection:
    host: str = "127.0.0.1"  # anything but loopback needs a token
    port: Port = 8080
    token_env: str = "BOUNCER_STATION_TOKEN"  # the API token is read from this environment variable


@dataclass
class RetrainSection:
    every_s: NonNegative = 0.0  # retrain each group on this schedule if labels arrived since its last gate (0: off)
    min_new_labels: Annotated[int, Meta(ge=0)] = 0  # ... or as soon as a group has this many new labels (0: off)
    approval: str = "auto"  # auto: publish a challenger that passes its checks; manual: wait for an operator


@dataclass
class StationConfig:
    station: StationSection = field(default_factory=StationSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)

    def validate(self) -> StationConfig:
        check_fields(self)
        if not self.station.groups or len(set(self.station.groups)) != len(self.station.groups):
            raise BouncerError("station.groups: one or more distinct group names")
        for g in self.station.groups:
            try:
                gate_topic(g)
            except SchemaError as exc:
                raise BouncerError(f"station.groups: {exc}") from None
        if self.retrain.approval not in ("auto", "manual"):
            raise BouncerError(f"retrain.approval: 'auto' or 'manual', got {self.retrain.approval!r}")
        self.mqtt.validate()
        if self.station.database and not self.station.database.startswith(("postgresql://", "postgres://")):
            raise BouncerError("station.database: empty (SQLite in station.data_dir) or postgresql://USER@HOST:PORT/DB")
        if self.station.objects and not self.station.objects.startswith("s3://"):
            raise BouncerError(
                "station.objects: empty (files in station.data_dir) or s3://BUCKET[/PREFIX][?endpoint=URL]"
            )
        bad = [r for r in self.station.roles if r not in ROLES]
        if bad or not self.station.roles:
            raise BouncerError(f"station.roles: one or more of {', '.join(ROLES)}, got {self.station.roles}")
        return self
