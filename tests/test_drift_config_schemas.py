"""Drift monitor (false alarms and detection), config validation, and wire-schema parsers under fuzzing."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.runtime import schemas
from bouncer.runtime.config import load_config
from bouncer.runtime.drift import DriftMonitor
from bouncer.runtime.errors import BouncerError

REFERENCE = {"brightness": 8.0, "sharpness": 0.3, "ood_score": 0.5}
PARSERS = (
    schemas.FrameMessage.decode,
    schemas.Command.decode,
    schemas.parse_status,
    schemas.parse_event,
    schemas.parse_stats,
    schemas.GateAnnouncement.decode,
)


def steady(rng: np.random.Generator, brightness: float = 60.0) -> tuple[dict, float, str]:
    """A steady scene: sensor noise only; review and reject at their usual rates."""
    q = {"mean": brightness + rng.normal(0, 0.05), "sharpness": float(np.exp(5 + rng.normal(0, 0.02)))}
    u = rng.random()
    return q, float(rng.normal(0, 0.3)), "review" if u < 0.02 else ("reject" if u < 0.03 else "accept")


def test_no_false_alarm_in_100k_steady_frames_and_a_light_bulb_is_caught():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(REFERENCE)
    alarms = [ev for _ in range(100_000) for ev in monitor.update(*steady(rng))]
    assert alarms == []
    # someone changed the light bulb: +2 grey levels, persistent
    caught = next((i, ev) for i in range(50) if (ev := monitor.update(*steady(rng, brightness=62.0))))
    frames, events = caught
    assert events[0]["signal"] == "brightness" and events[0]["direction"] == "up"
    assert frames < 20, frames


def test_review_rate_drift_is_caught():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(REFERENCE)
    for _ in range(3000):
        assert not monitor.update(*steady(rng))
    caught = None
    for i in range(3000):  # a new defect type: a fifth of the frames now go to review
        q, ood, _ = steady(rng)
        events = monitor.update(q, ood, "review" if rng.random() < 0.2 else "accept")
        if any(e["signal"] == "review_rate" for e in events):
            caught = i
            break
    assert caught is not None and caught < 500


def test_config_errors_name_the_key(tmp_path):
    base = '[device]\nid = "cam-1"\n[source]\nuri = "sim:1"\n[gate]\nbundle = "g.gate"\n'
    cases = {
        base + "[outbox]\nmax_mb = 'lots'\n": "outbox.max_mb: Expected `float`, got `str`",
        base + "[outbox]\njpeg_quality = true\n": "outbox.jpeg_quality: Expected `int`, got `bool`",
        base + "[drift]\nwarmup = [1]\n": "drift.warmup: Expected `int`, got `array`",
        base + "[outbox]\njpeg_quality = 101\n": "outbox.jpeg_quality: Expected `int` <= 100",
        base + "[line]\nheartbeat_s = 0\n": "line.heartbeat_s: Expected `float` > 0",
        base + "[mqtt]\nbroker = 'tcp://x'\n": "mqtt.broker",
        base + "[mqtt]\nprotocol = 'v4'\n": "mqtt.protocol",
        base + "[drift]\nwarmpu = 5\n": "drift.warmpu: unknown key",
        base.replace('id = "cam-1"', 'id = "cam 1"'): "device.id",
        base.replace('uri = "sim:1"\n', ""): "source.uri: required",
        "[device\n": "not valid TOML",
        base + "[source]\nuri = 'again'\n": "not valid TOML",
    }
    for text, message in cases.items():
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(BouncerError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_config(p)
    with pytest.raises(BouncerError, match="not found"):
        load_config(tmp_path / "absent.toml")
    p = tmp_path / "ok.toml"
    p.write_text(base)
    cfg = load_config(p, {"mqtt.broker": "mqtt://h:1", "outbox.max_mb": 5})
    assert cfg.mqtt.broker == "mqtt://h:1" and cfg.outbox.max_mb == 5.0 and cfg.source.uri == "sim:1"


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_parsers_raise_only_schema_errors(payload):
    for parse in PARSERS:
        with contextlib.suppress(schemas.SchemaError):
            parse(payload)


@settings(max_examples=200, deadline=None)
@given(
    obj=st.dictionaries(
        st.sampled_from(
            [
                "v",
                "id",
                "command",
                "args",
                "device",
                "ts",
                "decision",
                "jpeg",
                "reasons",
                "features",
                "quality",
                "details",
                "group",
                "heatmap",
                "audit",
                "state",
                "event",
                "version",
                "serial",
                "backbone_hash",
                "frames",
                "boxes",
                "size",
                "candidates",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=False),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=3),
            st.lists(st.lists(st.one_of(st.integers(), st.floats()), max_size=7), max_size=3),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
        ),
    )
)
def test_parsers_on_json_objects(obj):
    import json

    payload = json.dumps({**obj, "v": 1}).encode()
    for parse in PARSERS:
        with contextlib.suppress(schemas.SchemaError):
            parse(payload)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.integers(), st.text(max_size=80)), topic=st.text(max_size=80))
def test_labels_and_topics_raise_only_schema_errors(value, topic):
    with contextlib.suppress(schemas.SchemaError):
        kind, name = schemas.parse_label(value, ["gear", "washer"], "gear")
        assert kind in ("class", "new", "garbage") and (kind == "garbage") == (name is None)
    with contextlib.suppress(schemas.SchemaError):
        device, kind = schemas.parse_topic(topic)
        assert kind in schemas.KINDS and schemas.DEVICE_ID.match(device)


BOX_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10, 400), st.floats(), st.text(max_size=12))
A_BOX = st.one_of(
    st.fixed_dictionaries(
        {"class": st.sampled_from(["gear", "washer", "new:bolt", "new:", "giraffe", 3]), "box": st.lists(BOX_VALUE)}
    ),
    st.dictionaries(st.text(max_size=6), BOX_VALUE, max_size=3),
    BOX_VALUE,
)


@settings(max_examples=400, deadline=None)
@given(value=BOX_VALUE, boxes=st.one_of(st.none(), st.lists(A_BOX, max_size=4), BOX_VALUE))
def test_box_labels_parse_or_say_why(value, boxes):
    """An operator's box label is either taken (true boxes inside the frame, known class or new:NAME) or refused
    with a SchemaError naming what is wrong; never another exception."""
    predicted = [{"class": "gear", "p": 0.9, "box": [1.0, 2.0, 30.0, 40.0]}]
    try:
        kind, truth = schemas.parse_box_label(value, boxes, ["gear", "washer"], predicted, (320, 240))
    except schemas.SchemaError:
        return
    if kind == "garbage":
        assert truth is None and boxes is None
        return
    rows = json.loads(truth)
    assert kind == "boxes" and len(rows) == (len(boxes) if boxes is not None else 1)
    for r in rows:
        x1, y1, x2, y2 = r["box"]
        assert r["class"] in ("gear", "washer", "new:bolt") and -1 <= x1 < x2 <= 321 and -1 <= y1 < y2 <= 241


def test_detector_frames_carry_size_and_candidates_on_the_wire():
    cands = np.array([[1, 2, 30, 40, 0, 0.91], [50, 60, 70, 80.5, 1, 0.02]], np.float32)
    m = schemas.FrameMessage(
        v=1, id="a" * 32, device="cam-1", ts=1.5, source=None, decision="review", label="1 gear", confidence=0.6,
        ood_score=1.0, reasons=["ambiguous_box"], details=[], quality={}, gate_version="1", backbone_hash="b" * 64,
        jpeg=b"j", boxes=schemas.boxes_to_wire([{"class": "gear", "p": 0.9, "box": [1.0, 2.0, 30.0, 40.0]}]),
        size=[320, 240], candidates=schemas.candidates_to_wire(cands), features={},
    )  # fmt: skip
    back = schemas.FrameMessage.decode(m.encode())
    assert back.size == [320, 240] and back.boxes == m.boxes
    assert back.box_dicts() == [{"class": "gear", "p": 0.9, "box": [1.0, 2.0, 30.0, 40.0]}]
    np.testing.assert_allclose(back.candidate_array(), cands, atol=0.05)
    for bad, why in (('"size":[320,240]', '"size":[320]'), ('[50.0,60.0,70.0,80.5,1,0.02]', '[50.0,60.0,70.0]'),
                     ('[50.0,60.0,70.0,80.5,1,0.02]', '[50.0,60.0,7.0,80.5,1,0.02]'),
                     ('[50.0,60.0,70.0,80.5,1,0.02]', '[50.0,60.0,70.0,80.5,1.5,0.02]')):  # fmt: skip
        payload = m.encode().replace(bad.encode(), why.encode())
        assert payload != m.encode(), bad
        with pytest.raises(schemas.SchemaError, match=r"size|candidate"):
            schemas.FrameMessage.decode(payload)


def test_frame_message_round_trip():
    feats = {"features": np.arange(8, dtype=np.float32)}
    m = schemas.FrameMessage(
        v=1,
        id="a" * 32,
        device="cam-1",
        ts=1.5,
        source="x.png",
        decision="review",
        label="gear",
        confidence=0.5,
        ood_score=3.2,
        reasons=["ood"],
        details=[{"reason": "ood"}],
        quality={"mean": 60.0},
        gate_version="1",
        backbone_hash="b" * 64,
        jpeg=b"\xff\xd8jpeg",
        features=schemas.features_to_wire(feats),
    )
    back = schemas.FrameMessage.decode(m.encode())
    assert back == m and back.group == "default"
    np.testing.assert_array_equal(back.feature_arrays()["features"], feats["features"])
    assert schemas.FrameMessage.with_jpeg(m.encode_head(), m.jpeg) == m.encode()
    # a decision's details may hold numpy scalars (a float64 is a float to json, not to msgspec): plain on the wire
    m.details = [{"reason": "ood", "value": np.float64(2.5), "n": np.int64(3), "v": np.float32(0.25)}]
    assert schemas.FrameMessage.decode(m.encode()).details == [{"reason": "ood", "value": 2.5, "n": 3, "v": 0.25}]
    with pytest.raises(schemas.SchemaError, match="decision"):
        schemas.FrameMessage.decode(m.encode().replace(b'"review"', b'"maybe"'))


def test_a_light_bulb_on_a_line_of_different_products_is_caught_per_class():
    """Products differ by 10 grey levels, far more than the +2 of a new bulb; centring on each predicted
    class's median sees the common shift at once, with no alarm over 20k mixed frames before it."""
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(REFERENCE, warmup=500)
    levels = {"washer": 55.0, "gear": 65.0, "plate": 60.0}

    def frame(shift: float) -> tuple:
        label = str(rng.choice(list(levels)))
        q = {"mean": levels[label] + shift + rng.normal(0, 0.6), "sharpness": float(np.exp(5 + rng.normal(0, 0.02)))}
        return q, float(rng.normal(0, 0.3)), "accept", label

    assert [ev for _ in range(20_000) for ev in monitor.update(*frame(0.0))] == []
    caught = next((i, ev) for i in range(300) if (ev := monitor.update(*frame(2.0))))
    frames, events = caught
    assert events[0]["signal"] == "brightness" and events[0]["direction"] == "up" and frames < 60, caught
    # flagged frames never feed the class-centred signals (their class is a guess)
    before = monitor.signals["brightness"].medians.copy()
    for _ in range(1000):
        q, ood, _, label = frame(30.0)
        assert not [e for e in monitor.update(q, ood, "review", label) if e["signal"] == "brightness"]
    assert monitor.signals["brightness"].medians == before


def test_the_documented_json_schemas_are_the_parsers_own():
    """docs/schemas/*.json are generated from the Structs the parsers convert to (scripts/gen_schemas): a field
    added to a message and not to its documented schema fails here."""
    from helpers import REPO

    docs = REPO / "docs" / "schemas"
    generated = schemas.json_schemas()
    assert sorted(p.stem for p in docs.glob("*.json")) == sorted(generated), "run scripts/gen_schemas"
    for name, schema in generated.items():
        assert json.loads((docs / f"{name}.json").read_text()) == schema, f"docs/schemas/{name}.json is stale"
    frame = generated["frame"]["$defs"]["FrameMessage"]
    assert {"id", "device", "decision", "jpeg", "features"} <= set(frame["required"])
    assert frame["properties"]["decision"] == {"$ref": "#/$defs/Verdict"}


def test_wire_errors_name_the_path():
    with pytest.raises(schemas.SchemaError, match=r"stats: Expected `int`, got `bool` - at `\$.frames`"):
        schemas.parse_stats(b'{"v":1,"device":"cam-1","frames":true}')
    with pytest.raises(schemas.SchemaError, match=r"command: Invalid enum value 'nuke' - at `\$.command`"):
        schemas.Command.decode(b'{"v":1,"id":"c1","command":"nuke"}')


def test_a_detector_class_that_stops_being_found_is_caught_and_steady_counts_raise_nothing():
    """Per-class box signals of a detector gate: 50,000 frames of a steady line (Poisson counts, noisy box
    probabilities) raise no alarm; gears found a third as often, or scored lower, are caught within a few hundred
    frames and name their class."""
    rng = np.random.default_rng(0)
    ref = {"count.gear": 1.0, "count.washer": 0.77, "score.gear": 0.05, "score.washer": 0.05}

    def boxes(gears: float, p_gear: float) -> list[dict]:
        out = [
            {"class": "gear", "p": float(np.clip(rng.normal(p_gear, 0.05), 0.5, 1))} for _ in range(rng.poisson(gears))
        ]
        return out + [{"class": "washer", "p": float(np.clip(rng.normal(0.9, 0.05), 0.5, 1))}
                      for _ in range(rng.poisson(0.6))]  # fmt: skip

    def run(mon: DriftMonitor, n: int, gears: float, p_gear: float) -> list[tuple[int, dict]]:
        q = {"mean": 100.0, "sharpness": 50.0}
        return [(i, e) for i in range(n) for e in mon.update(q, 1.0, "accept", "x", boxes(gears, p_gear))]

    steady = DriftMonitor(ref, warmup=500)
    assert run(steady, 50_000, 1.0, 0.9) == []
    assert set(steady.boxes) == set(ref)
    odd = [{"class": "gear", "p": 0.5}] * 8  # one odd frame: eight weak gears
    assert steady.update({"mean": 100.0, "sharpness": 50.0}, 1.0, "review", "x", odd) == []
    assert run(steady, 200, 1.0, 0.9) == []
    stats = steady.statistics()  # what the device sends with its stats and the fleet page charts
    assert set(ref) | {"brightness", "review_rate"} <= set(stats) and all(0 <= v < 20 for v in stats.values())
    for gears, p_gear, signal, direction in ((0.33, 0.9, "count.gear", "down"), (1.0, 0.75, "score.gear", "down"),
                                             (2.0, 0.9, "count.gear", "up")):  # fmt: skip
        mon = DriftMonitor(ref, warmup=500)
        assert run(mon, 2000, 1.0, 0.9) == []
        events = run(mon, 1000, gears, p_gear)
        assert events, (signal, direction)
        i, first = events[0]
        assert first["signal"] == signal and first["direction"] == direction and i < 300, events[:3]
        assert mon.state[signal] == direction
    # a classifier's monitor has no box signals, and boxes do not reach it
    plain = DriftMonitor({"brightness": 5.0})
    assert plain.boxes == {} and plain.update({"mean": 1.0}, 1.0, "accept", "gear", [{"class": "gear", "p": 1}]) == []
