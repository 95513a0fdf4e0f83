"""Device configuration: one TOML file, converted into dataclasses by msgspec; every error names its key.

Secrets never live in the file: `mqtt.password_env` names the environment variable that holds the
password. Command-line flags override file values (see `bouncer run --help`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from bouncer.runtime.errors import BouncerError

# Ranges live on the fields: msgspec checks them when a file is read and `validate` checks them again for a config
# built in code; an error names the key and the bound ("line.unit: Expected `int` <= 247").
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Count = Annotated[int, Meta(ge=0)]


@dataclass
class DeviceSection:
    id: str = ""
    group: str = "default"  # the line / camera group: which gate this device follows, where its frames go
    profile: str = "auto"  # a name from devices/data/*.toml, or "auto" to detect
    data_dir: str = "bouncer-data"


@dataclass
class SourceSection:
    uri: str = ""  # folder path, video file, camera index, rtsp://..., http://..., genicam://..., or sim:SEED
    loop: bool = False  # folders: start again at the end
    max_fps: NonNegative = 0.0  # 0: the device profile's rate for live sources, unlimited for files
    skip_under_load: bool = True  # live sources only: drop frames rather than fall behind


@dataclass
class CameraSection:
    """A GenICam camera's settings, for `genicam://` sources (runtime/sources/genicam.py, docs/cameras.md): each
    one set is applied when the camera opens and read back; a camera without the feature, or a value outside its
    range, is an error naming the key."""

    exposure_us: Annotated[float, Meta(gt=0)] | None = None  # unset: as the camera is
    gain_db: Annotated[float, Meta(ge=0)] | None = None
    frame_rate_hz: Annotated[float, Meta(gt=0)] | None = None  # the camera's frame clock (AcquisitionFrameRate)
    pixel_format: str = ""  # a GenICam name (Mono8, Mono12, BayerRG8, RGB8...); empty: as the camera is
    roi: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=4)] = field(default_factory=list)  # x y w h
    trigger: str = "off"  # off (free running), software (a frame when the guard is ready), or an input line (Line1)
    trigger_timeout_s: Positive = 10.0  # no frame for this long: event trigger_timeout, the line on hold
    reconnect_max_s: Positive = 30.0  # a lost camera is reopened with backoff up to this

    def validate(self) -> None:
        if self.roi and (len(self.roi) != 4 or not self.roi[2] or not self.roi[3]):
            raise BouncerError(f"camera.roi: expected [x, y, width, height] with width and height > 0, got {self.roi}")


@dataclass
class GateSection:
    bundle: str = ""
    model: str = ""  # empty: the cached int8 backbone
    sidecar: str = ""  # a gate around your own model reads Bouncer's backbone beside it; empty: the cached one


@dataclass
class MqttSection:
    broker: str = ""  # mqtt://host:port or mqtts://host:port (TLS); empty: no link, the outbox keeps everything
    protocol: str = "v5"  # v5 or v311
    username: str = ""
    password_env: str = "BOUNCER_MQTT_PASSWORD"
    ca: str = ""
    cert: str = ""
    key: str = ""
    keepalive: Annotated[int, Meta(ge=5)] = 30
    max_inflight: Annotated[int, Meta(ge=1)] = 100

    def validate(self) -> None:
        """Shared by the device's and the station's configs."""
        if self.protocol not in ("v5", "v311"):
            raise BouncerError(f"mqtt.protocol: 'v5' or 'v311', got {self.protocol!r}")
        if self.broker and not self.broker.startswith(("mqtt://", "mqtts://")):
            raise BouncerError(f"mqtt.broker: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.broker!r}")


@dataclass
class OutboxSection:
    max_mb: Positive = 512.0
    jpeg_quality: Annotated[int, Meta(ge=1, le=100)] = 85
    jpeg_max_side: Annotated[int, Meta(ge=16)] = 640
    audit_rate: Fraction = 0.0  # fraction of accepted frames also sent (with their explanation) for spot checks
    explain: bool = True  # attach a heatmap of where a flagged frame is unusual


@dataclass
class DriftSection:
    warmup: Annotated[int, Meta(ge=10)] = 500  # frames that set each signal's baseline (rates: at least 1000)
    k: NonNegative = 0.5  # CUSUM slack, in baseline standard deviations
    h: Positive = 20.0  # CUSUM alarm threshold, in baseline standard deviations
    rate_h: Positive = 14.0  # log-likelihood threshold for the review/reject rate tests


@dataclass
class OtaSection:
    url: str = ""  # the station's TUF repository, e.g. http://station:8080/tuf; empty: no over-the-air updates
    root: str = ""  # the trusted root.json written by `bouncer station init` (copied to the device once)
    poll_s: Positive = 300.0  # also checks at once when the station's retained announcement arrives
    canary_size: Annotated[int, Meta(ge=0)] = (
        32  # accepted frames kept on the device to try a new gate on before the swap
    )
    canary_every: Annotated[int, Meta(ge=1)] = 25  # keep every n-th accepted frame
    trial_frames: Count = 100  # live frames after the swap before the new gate is committed
    first_check_s: NonNegative = 5.0  # at start, the first frame waits this long at most for the first update check


@dataclass
class MetricsSection:
    port: Port = 0  # Prometheus endpoint on this port; 0: off
    stats_every_s: Positive = 10.0


@dataclass
class LineSection:
    """The per-part verdict to the line's controller (devices/plc.py, docs/line.md)."""

    modbus: str = ""  # modbus://HOST[:PORT] of the PLC (Modbus TCP); empty: off
    opcua: str = ""  # opc.tcp://HOST:PORT/PATH this device serves its verdicts on (OPC UA server); empty: off
    unit: Annotated[int, Meta(ge=0, le=247)] = 1  # the PLC's unit (device) id
    register: Annotated[int, Meta(ge=0, le=65530)] = (
        0  # first of six holding registers: verdict, sequence, heartbeat, health, part id (2)
    )
    deadline_ms: Positive = 200.0  # a verdict decided later than this after its frame came in is written as hold
    # two holding registers (high word first) where the PLC writes the part id before it triggers the camera, read
    # as each frame comes in; unset: the part id is the trigger count (docs/line.md, "Part ids from the PLC")
    part_register: Annotated[int, Meta(ge=0, le=65534)] | None = None
    part_timeout_ms: Positive = 50.0  # reading it; an unanswered read is part id 0 (the PLC holds that part)
    heartbeat_s: Positive = 0.5
    timeout_s: Positive = 0.5  # per write; a slow PLC is a failed write, never a slow frame loop


@dataclass
class AlertsSection:
    """Operator alerts, one per incident on `bouncer/v1/<device>/alerts` (devices/alerts.py)."""

    min_frames: Annotated[int, Meta(ge=1)] = 3  # flagged frames with one cause within window_s that open an incident
    window_s: Positive = 60.0
    quiet_s: Positive = 300.0  # an incident closes after this long without its cause; the next one alerts again


@dataclass
class SparkplugSection:
    """The camera as a Sparkplug B edge node for SCADA/MES (devices/sparkplug.py, docs/sparkplug.md)."""

    group: str = ""  # Sparkplug group id; the edge node id is device.id; empty: off
    every_s: Positive = 5.0  # NDATA at most this often, with the metrics that changed


@dataclass
class VerdictsSection:
    """Every verdict as a JSON line in a local file (devices/verdict_log.py)."""

    path: str = ""  # e.g. /var/lib/bouncer/verdicts.jsonl; empty: off
    max_mb: Positive = 64.0  # then rotated to PATH.1


@dataclass
class Config:
    device: DeviceSection = field(default_factory=DeviceSection)
    source: SourceSection = field(default_factory=SourceSection)
    camera: CameraSection = field(default_factory=CameraSection)
    gate: GateSection = field(default_factory=GateSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    drift: DriftSection = field(default_factory=DriftSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    ota: OtaSection = field(default_factory=OtaSection)
    line: LineSection = field(default_factory=LineSection)
    alerts: AlertsSection = field(default_factory=AlertsSection)
    sparkplug: SparkplugSection = field(default_factory=SparkplugSection)
    verdicts: VerdictsSection = field(default_factory=VerdictsSection)

    def validate(self) -> Config:
        from bouncer.runtime.schemas import SchemaError, check_device_id, gate_topic

        check_fields(self)
        try:
            check_device_id(self.device.id)
        except SchemaError as exc:
            raise BouncerError(f"device.id: {exc}") from None
        try:
            gate_topic(self.device.group)
        except SchemaError as exc:
            raise BouncerError(f"device.group: {exc}") from None
        if not self.source.uri:
            raise BouncerError("source.uri: required (a folder, video file, camera index, URL or sim:SEED)")
        if self.ota.url and not self.ota.root:
            raise BouncerError("ota.root: required with ota.url (the root.json written by `bouncer station init`)")
        if not self.gate.bundle:
            raise BouncerError("gate.bundle: required (a bundle made by `bouncer fit`)")
        self.mqtt.validate()
        self.camera.validate()
        if self.line.part_register is not None and not self.line.modbus:
            raise BouncerError("line.part_register: needs line.modbus (the PLC the part id is read from)")
        if self.sparkplug.group and not self.mqtt.broker:
            raise BouncerError("sparkplug.group: needs mqtt.broker (Sparkplug B travels over MQTT)")
        return self


def _check_keys(cls: type, data: Any, where: str) -> None:
    """Unknown keys are errors (a typo must not silently fall back to a default): msgspec ignores them in
    dataclasses, so they are looked for here; the types are msgspec's job."""
    if not isinstance(data, dict):
        raise BouncerError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if name not in hints or name.startswith("_"):
            known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise BouncerError(f"{key}: unknown key (known: {known})")
        want = hints[name]
        if isinstance(want, type) and dataclasses.is_dataclass(want):
            _check_keys(want, value, key)


def _convert(root: type, data: dict[str, Any]) -> Any:
    _check_keys(root, data, "")
    try:
        return msgspec.convert(data, type=root)
    except msgspec.ValidationError as exc:  # "Expected `float`, got `str` - at `$.outbox.max_mb`"
        found = re.fullmatch(r"(.*) - at `\$\.(.+)`", str(exc))
        if not found:
            raise BouncerError(f"config: {exc}") from None
        raise BouncerError(f"{found[2]}: {found[1]}") from None


def check_fields(config: Any) -> None:
    """The fields' types and ranges, for a config built in code as for one read from a file."""
    _convert(type(config), msgspec.to_builtins(config))


def load_config(path: Path | None, overrides: dict[str, Any] | None = None, root: type = Config) -> Any:
    """Read CONFIG (optional) into `root` (a dataclass of sections), apply `section.key` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise BouncerError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BouncerError(f"{path}: unreadable config ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise BouncerError(f"{path}: not valid TOML ({exc})") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    return _convert(root, data).validate()
