"""The wire: MQTT topics and JSON payloads shared by devices and the station. Defined once, here.

Version 1. Every payload is a JSON object with `"v": 1`; binary parts (JPEG, fp16 features) are base64.
Each message's fields are a msgspec Struct below (the `*Wire` classes): parsing converts to it and raises
SchemaError naming the field's path, and docs/schemas/*.json are generated from the same Structs
(`json_schemas`; tests/test_drift_config_schemas.py checks they are current). A malformed message is an
error to report, never a crash.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from bouncer.runtime.gates.decision import Decision, Verdict

VERSION = 1
PREFIX = f"bouncer/v{VERSION}"
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


def whole(body: str) -> re.Pattern[str]:
    """A pattern the whole string must match: `$` alone also matches before a trailing newline, so the
    lookahead refuses "cam-1\\n" (the same pattern serves msgspec, which searches, and JSON Schema)."""
    return re.compile(f"^{body}$(?!\\n)")


DEVICE_ID = whole(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
GROUP = DEVICE_ID  # group names follow the device-id rules (both are topic segments)
FEATURE_NAME = whole(r"[A-Za-z0-9][A-Za-z0-9_.:+@-]{0,63}")  # a head's input key: pooled, map_s8+map_s16@patch
EARLIEST_TS, LATEST_TS = 0.0, 4102444800.0  # 1970 .. 2100: a time the pages and the store can show
MAX_FEATURES = 32
MAX_TEXT = 1024  # a source, a reason, a version string


class SchemaError(ValueError):
    """A payload that does not follow the documented schema."""


def topic(device: str, kind: str) -> str:
    """bouncer/v1/<device>/<kind>; kind is one of KINDS."""
    return f"{PREFIX}/{device}/{kind}"


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_ID.match(device):
        raise SchemaError(f"device id {device!r}: 1-64 characters of A-Z a-z 0-9 _ . -, starting alphanumeric")
    return device


def new_id() -> str:
    return uuid.uuid4().hex


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **obj}, separators=(",", ":")).encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unicode(obj: Any, what: str) -> None:
    """JSON's \\uD800 escapes decode to lone surrogates, which no UTF-8 store or page can hold."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise SchemaError(f"{what}: a string holds a lone surrogate ({o[:40]!r}), not text") from None


def decode(payload: bytes, what: str) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray):
        raise SchemaError(f"{what}: expected bytes")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SchemaError(f"{what}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise SchemaError(f"{what}: payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{what}: not JSON ({exc.msg} at {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # NaN / Infinity, or nesting deeper than the parser allows
        raise SchemaError(f"{what}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"{what}: expected a JSON object")
    if payload.find(b"\\") >= 0:  # only escapes can make a lone surrogate (one byte: memchr, 70 KB in 2 us)
        _unicode(obj, what)
    if obj.get("v") != VERSION:
        raise SchemaError(f"{what}: schema version {obj.get('v')!r}, this side speaks {VERSION}")
    return obj


DeviceId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID.pattern, description="A-Z a-z 0-9 _ . -, 1-64")]
MessageId = Annotated[str, msgspec.Meta(pattern=DEVICE_ID.pattern, description="A-Z a-z 0-9 _ . -, 1-64")]
GroupName = Annotated[str, msgspec.Meta(pattern=GROUP.pattern, description="A-Z a-z 0-9 _ . -, 1-64")]
FeatureName = Annotated[str, msgspec.Meta(pattern=FEATURE_NAME.pattern, description="A-Z a-z 0-9 _ . : + @ -, 1-64")]
Number = Annotated[float, msgspec.Meta(description="a JSON number")]
Timestamp = Annotated[float, msgspec.Meta(ge=EARLIEST_TS, le=LATEST_TS, description="Unix seconds, 1970..2100")]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]


class FeatureWire(msgspec.Struct, forbid_unknown_fields=True):
    """One named vector: its shape and its float16 bytes (base64)."""

    shape: Annotated[list[Dim], msgspec.Meta(min_length=1, max_length=4)]
    fp16: bytes

    def __post_init__(self) -> None:
        if len(self.fp16) != 2 * math.prod(self.shape):
            raise ValueError(f"{len(self.fp16)} bytes are not float16 of shape {self.shape}")

    @classmethod
    def of(cls, a: np.ndarray) -> FeatureWire:
        h = np.ascontiguousarray(a, np.float16)
        return cls(shape=list(h.shape), fp16=h.tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(self.fp16, np.float16).reshape(tuple(self.shape)).astype(np.float32)


class BoxWire(msgspec.Struct, forbid_unknown_fields=True):
    """One box a detector gate kept: its class, calibrated probability, corners in frame pixels."""

    box: list[Number]
    p: Number
    cls: str = msgspec.field(name="class")


Side = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PartId = Annotated[int, msgspec.Meta(ge=1, le=2**53, description="the part's trigger count since the camera opened")]


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays in a decision's details (a float64 is a float to json, not to msgspec)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise NotImplementedError(f"cannot put a {type(obj).__name__} on the wire")


_ENCODER = msgspec.json.Encoder(enc_hook=_plain)


class FrameMessage(msgspec.Struct, kw_only=True):
    """A flagged frame (`bouncer/v1/<device>/frames`): docs/mqtt.md explains each field.

    The one record of a flagged frame: the device builds it from the decision (`of_decision`), it is the wire's
    JSON as it is (the documented schema is generated from it), the station decodes into it and stores it by
    field name. `jpeg` is the last field: a device encodes the rest while the JPEG is being encoded."""

    v: Literal[1]
    id: MessageId
    device: DeviceId
    ts: Timestamp
    source: Text | None = None
    decision: Verdict
    label: Text | None = None
    confidence: Number | None = None
    ood_score: Number | None = None
    reasons: list[Text]
    details: list[dict[str, Any]]
    quality: dict[Text, Number]
    gate_version: Text
    backbone_hash: Text
    features: Annotated[dict[FeatureName, FeatureWire], msgspec.Meta(max_length=MAX_FEATURES)]
    group: GroupName | None = None  # null or missing: "default" (read `group` after decoding: never null)
    heatmap: bytes | None = None  # PNG: where the frame is unusual (runtime/gates/explain.py)
    audit: bool = False  # an accepted frame sampled for spot checks, not a flagged one
    boxes: list[BoxWire] | None = None  # a detector gate's kept boxes
    size: Annotated[list[Side], msgspec.Meta(min_length=2, max_length=2)] | None = None  # their pixel space: w, h
    candidates: list[list[Number]] | None = None  # a detector's candidates after NMS: x1 y1 x2 y2 class score
    part: PartId | None = None  # a triggered camera's part (docs/cameras.md): what the verdict to the line names
    jpeg: bytes

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = "default"
        if self.candidates is not None:
            check_candidates(self.candidates)

    @classmethod
    def of_decision(
        cls,
        d: Decision,
        *,
        features: dict[str, np.ndarray] | None = None,
        **fields: Any,
    ) -> FrameMessage:
        """A flagged frame from the guard's decision; `fields` are the rest (id, device, ts, source, gate...)."""
        return cls(
            v=1, decision=d.decision, label=d.label, confidence=d.confidence, ood_score=d.ood_score,
            reasons=d.reasons, details=d.details, quality={k: round(float(v), 4) for k, v in d.quality.items()},
            features=features_to_wire(features or {}), boxes=boxes_to_wire(d.boxes),
            size=None if d.boxes is None or d.size is None else [int(v) for v in d.size],
            candidates=None if d.candidates is None else candidates_to_wire(d.candidates), **fields,
        )  # fmt: skip

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    def encode_head(self) -> bytes:
        """The message with an empty JPEG, for `with_jpeg`."""
        return _ENCODER.encode(msgspec.structs.replace(self, jpeg=b""))

    @staticmethod
    def with_jpeg(head: bytes, jpeg: bytes) -> bytes:
        """`encode_head`'s JSON with the JPEG put in. Its base64 is spliced in as it is: the alphabet needs no JSON
        escaping, and encoding ~30 KB again was a third of the message's cost on the camera loop."""
        if not head.endswith(b',"jpeg":""}'):
            raise ValueError("not a frame message head")
        return head[:-2] + base64.b64encode(jpeg) + b'"}'

    @classmethod
    def decode(cls, payload: bytes) -> FrameMessage:
        what = "frame message"
        return _convert(decode(payload, what), cls, what)

    def feature_arrays(self) -> dict[str, np.ndarray]:
        return {name: f.array() for name, f in self.features.items()}

    def candidate_array(self) -> np.ndarray | None:
        return None if self.candidates is None else np.asarray(self.candidates, np.float32).reshape(-1, 6)

    def box_dicts(self) -> list[dict[str, Any]] | None:
        """The kept boxes as the store and the pages read them: class, p, box."""
        return None if self.boxes is None else [{"class": b.cls, "p": b.p, "box": b.box} for b in self.boxes]


class StatusWire(msgspec.Struct, kw_only=True):
    """Retained per-device status (`status`); more fields may follow."""

    v: Literal[1]
    device: DeviceId
    ts: Timestamp
    state: Literal["online", "offline"]


class EventWire(msgspec.Struct, kw_only=True):
    """An event (`events`); the fields each kind adds are in docs/mqtt.md."""

    v: Literal[1]
    id: MessageId
    device: DeviceId
    ts: Timestamp
    event: Annotated[str, msgspec.Meta(pattern=whole(r"[a-z][a-z0-9_]{0,63}").pattern)]


ALERTS = ("new_defect_suspected", "quality", "drift", "camera_lost", "no_trigger")


class AlertWire(msgspec.Struct, kw_only=True):
    """An operator alert (`alerts`): one per incident, sent when it opens (devices/alerts.py)."""

    v: Literal[1]
    id: MessageId
    device: DeviceId
    ts: Timestamp
    alert: Literal["new_defect_suspected", "quality", "drift", "camera_lost", "no_trigger"]
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    summary: Text
    since: Timestamp
    frames: Annotated[int, msgspec.Meta(ge=0)]
    frame_ids: Annotated[list[MessageId], msgspec.Meta(max_length=1000)]
    group: DeviceId
    gate_version: Text


class StatsWire(msgspec.Struct, kw_only=True):
    """Periodic device statistics (`stats`); more fields may follow."""

    v: Literal[1]
    device: DeviceId
    frames: int


class CommandWire(msgspec.Struct, kw_only=True):
    """A command to a device (`cmd`)."""

    v: Literal[1]
    id: str
    command: Literal["ping", "stats", "pause", "resume"]
    args: dict[str, Any] | None = None


class GateAnnouncementWire(msgspec.Struct, kw_only=True):
    """The retained announcement of a group's current gate (`bouncer/v1/gates/<group>`)."""

    v: Literal[1]
    group: str
    version: str
    serial: int
    backbone_hash: str
    ts: Number | None = None


WIRE = {
    "frame": FrameMessage,
    "status": StatusWire,
    "event": EventWire,
    "alert": AlertWire,
    "stats": StatsWire,
    "command": CommandWire,
    "gate_announcement": GateAnnouncementWire,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each message, from the Structs the parsers use (written to docs/schemas/)."""
    return {name: msgspec.json.schema(t) for name, t in WIRE.items()}


def _convert(obj: dict[str, Any], kind: type[Any], what: str) -> Any:
    try:
        return msgspec.convert(obj, type=kind)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"{what}: {exc}") from None


def features_to_wire(arrays: dict[str, np.ndarray]) -> dict[str, FeatureWire]:
    """Named feature vectors as float16 with their shapes (the station retrains from these)."""
    return {name: FeatureWire.of(a) for name, a in arrays.items()}


def boxes_to_wire(boxes: list[dict[str, Any]] | None) -> list[BoxWire] | None:
    if boxes is None:
        return None
    return [BoxWire(box=[float(v) for v in b["box"]], p=float(b["p"]), cls=str(b["class"])) for b in boxes]


def candidates_to_wire(c: np.ndarray) -> list[list[float]]:
    """Rows x1 y1 x2 y2 (frame pixels, 0.1 px), class index, raw score (6 digits)."""
    return [[*(round(float(v), 1) for v in r[:4]), int(r[4]), round(float(r[5]), 6)] for r in np.asarray(c)]


def check_candidates(rows: list[list[Any]]) -> None:
    c = np.asarray(rows, np.float64).reshape(-1, 6) if all(len(r) == 6 for r in rows) else None
    if c is None or not np.isfinite(c).all():
        raise ValueError("candidates are rows of 6 finite numbers (x1 y1 x2 y2 class score)")
    if (c[:, 4] < 0).any() or (c[:, 4] % 1).any() or (c[:, 5] < 0).any() or (c[:, 5] > 1).any():
        raise ValueError("a candidate's class is not an index or its score is outside 0..1")
    if (c[:, 2] < c[:, 0]).any() or (c[:, 3] < c[:, 1]).any():
        raise ValueError("a candidate's corners are not x1 <= x2, y1 <= y2")


def event(device: str, kind: str, **fields: Any) -> bytes:
    """An event: drift, camera, gate_swap, eviction, command_rejected, ... with an id and time."""
    return encode({"id": new_id(), "device": device, "ts": time.time(), "event": kind, **fields})


def status(device: str, state: str, **fields: Any) -> bytes:
    """Retained per-device status; the last will publishes state "offline"."""
    return encode({"device": device, "ts": time.time(), "state": state, **fields})


@dataclass
class Command:
    id: str
    command: str
    args: dict[str, Any]

    @classmethod
    def decode(cls, payload: bytes) -> Command:
        what = "command"
        w: CommandWire = _convert(decode(payload, what), CommandWire, what)
        return cls(id=w.id, command=w.command, args=dict(w.args or {}))


# ---- parsing what arrives (the station side) -----------------------------------------------------

KINDS = ("status", "frames", "events", "alerts", "stats", "cmd")


def parse_topic(name: str) -> tuple[str, str]:
    """bouncer/v1/<device>/<kind> -> (device, kind); anything else is a SchemaError."""
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != PREFIX or parts[3] not in KINDS:
        raise SchemaError(f"topic {name!r} is not {PREFIX}/<device>/<{'|'.join(KINDS)}>")
    return check_device_id(parts[2]), parts[3]


def parse_status(payload: bytes) -> dict[str, Any]:
    o = decode(payload, "status")
    _convert(o, StatusWire, "status")
    return o


def parse_event(payload: bytes) -> dict[str, Any]:
    o = decode(payload, "event")
    _convert(o, EventWire, "event")
    return o


def alert(device: str, alert: str, **fields: Any) -> bytes:
    """An operator alert with an id and time (AlertWire names the fields)."""
    return encode({"id": new_id(), "device": device, "ts": time.time(), "alert": alert, **fields})


def parse_alert(payload: bytes) -> dict[str, Any]:
    o = decode(payload, "alert")
    _convert(o, AlertWire, "alert")
    return o


def parse_stats(payload: bytes) -> dict[str, Any]:
    o = decode(payload, "stats")
    _convert(o, StatsWire, "stats")
    return o


# ---- gate announcements (station -> devices, retained) -------------------------------------------


def gate_topic(group: str) -> str:
    """bouncer/v1/gates/<group>: the retained announcement of a group's current gate."""
    if not GROUP.match(group or ""):
        raise SchemaError(f"gate group {group!r}: 1-64 characters of A-Z a-z 0-9 _ . -, starting alphanumeric")
    return f"{PREFIX}/gates/{group}"


@dataclass
class GateAnnouncement:
    """A hint that a new gate exists; the device trusts only what its TUF client verifies."""

    group: str
    version: str
    serial: int
    backbone_hash: str

    def encode(self) -> bytes:
        return encode({**self.__dict__, "ts": time.time()})

    @classmethod
    def decode(cls, payload: bytes) -> GateAnnouncement:
        what = "gate announcement"
        w: GateAnnouncementWire = _convert(decode(payload, what), GateAnnouncementWire, what)
        return cls(group=w.group, version=w.version, serial=w.serial, backbone_hash=w.backbone_hash)


# ---- operator labels (station HTTP API) ---------------------------------------------------------

CORRECT, GARBAGE, NEW_PREFIX = "correct", "garbage", "new:"
CLASS_NAME = whole(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


def parse_label(value: Any, classes: list[str], predicted: str | None) -> tuple[str, str | None]:
    """An operator's label -> (kind, class name). Kinds: "class" (a known class, or `correct` = the
    predicted one), "new" (a new defect type, `new:NAME`), "garbage" (not a part at all)."""
    if not isinstance(value, str) or not value.strip():
        raise SchemaError("label: expected a non-empty string (a class, 'correct', 'garbage' or 'new:NAME')")
    value = value.strip()
    if value == GARBAGE:
        return "garbage", None
    if value == CORRECT:
        if predicted is None or predicted not in classes:
            raise SchemaError("label: 'correct' needs a predicted class, and this frame has none")
        return "class", predicted
    if value.startswith(NEW_PREFIX):
        name = value[len(NEW_PREFIX) :].strip()
        if not CLASS_NAME.match(name):
            raise SchemaError(f"label: new class name {name!r}: 1-64 characters of letters, digits, space _ . -")
        return ("class", name) if name in classes else ("new", name)
    if value in classes:
        return "class", value
    raise SchemaError(
        f"label: {value!r} is not a known class ({', '.join(classes)}), 'correct', 'garbage' or 'new:NAME'"
    )


MAX_TRUE_BOXES = 500


def parse_box_label(
    value: Any, boxes: Any, classes: list[str], predicted: list[dict[str, Any]] | None, size: tuple[int, int] | None
) -> tuple[str, str | None]:
    """An operator's label of a detector frame -> (kind, JSON of its true boxes). `value` "correct" (the kept boxes
    as the camera sent them) or "garbage"; or `boxes`, every object in the frame: `[{"class": C, "box": [x1, y1,
    x2, y2]}]` in frame pixels, C a known class or `new:NAME` (an object the detector does not know), `[]` for an
    empty frame. Returns ("boxes", JSON) or ("garbage", None)."""
    if boxes is None:
        if value == GARBAGE:
            return "garbage", None
        if value == CORRECT:
            if predicted is None:
                raise SchemaError("label: 'correct' needs the frame's boxes, and this frame has none")
            boxes = [{"class": b["class"], "box": b["box"]} for b in predicted]
        else:
            raise SchemaError('label of a detector frame: "correct", "garbage", or "boxes": [{"class": C, "box": '
                              '[x1, y1, x2, y2]}, ...] with every object in the frame')  # fmt: skip
    if not isinstance(boxes, list) or len(boxes) > MAX_TRUE_BOXES:
        raise SchemaError(f"boxes: expected a list of at most {MAX_TRUE_BOXES} boxes")
    out = []
    for i, b in enumerate(boxes):
        if not isinstance(b, dict) or set(b) - {"class", "box"}:
            raise SchemaError(f'boxes[{i}]: expected {{"class": C, "box": [x1, y1, x2, y2]}}')
        name, box = b.get("class"), b.get("box")
        if isinstance(name, str) and name.startswith(NEW_PREFIX):
            new = name[len(NEW_PREFIX) :].strip()
            if not CLASS_NAME.match(new):
                raise SchemaError(f"boxes[{i}]: new class name {new!r}: 1-64 letters, digits, space _ . -")
            name = new if new in classes else f"{NEW_PREFIX}{new}"
        elif name not in classes:
            raise SchemaError(f"boxes[{i}]: class {name!r} is not one of {', '.join(classes)} or 'new:NAME'")
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            and box[0] < box[2]
            and box[1] < box[3]
        ):
            raise SchemaError(f"boxes[{i}]: box is [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {box!r}")
        if size is not None and (min(box) < -1 or box[2] > size[0] + 1 or box[3] > size[1] + 1):
            raise SchemaError(f"boxes[{i}]: box {box} is outside the {size[0]} x {size[1]} frame")
        out.append({"class": name, "box": [round(float(v), 1) for v in box]})
    return "boxes", json.dumps(out)
