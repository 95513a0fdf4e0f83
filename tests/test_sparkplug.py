"""MQTT for the plant's systems, against a real Mosquitto: the camera as a Sparkplug B edge node (a host decodes
births, data and the death certificate with the protobuf module generated from the specification's schema), and
operator alerts, one per incident on their own topic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from helpers import REPO, Collector, device_toml, run_cli, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.devices import sparkplug_b_pb2 as pb
from bouncer.devices.alerts import Alerts
from bouncer.devices.sparkplug import REBIRTH, decode, topic
from bouncer.runtime import schemas
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.images import read_bgr
from bouncer.sim import simulator

GROUP = "line-7"


def spb_config(tmp_path: Path, broker, gate: Path, source: dict, device: str = "cam-s") -> Path:
    return device_toml(tmp_path / "device.toml", device={"id": device, "data_dir": str(tmp_path / "d")},
                       source=source, gate={"bundle": str(gate)}, mqtt={"broker": broker.url},
                       sparkplug={"group": GROUP, "every_s": 0.3})  # fmt: skip


def messages(host: Collector, kind: str) -> list[dict]:
    return [decode(p) for p in host.on(f"/{kind}/cam-s")]


def values(msg: dict, names: dict[int, str]) -> dict[str, object]:
    return {(m["name"] or names[m["alias"]]): m["value"] for m in msg["metrics"]}


def latest(host: Collector) -> dict[str, object]:
    """What a host knows of the node now: its last birth, updated by the data messages after it."""
    state: dict[str, object] = {}
    names: dict[int, str] = {}
    with host.lock:
        msgs = list(host.messages)
    for t, payload in msgs:
        if "/NBIRTH/" in t:
            birth = decode(payload)
            names = {m["alias"]: m["name"] for m in birth["metrics"]}
            state = values(birth, names)
        elif "/NDATA/" in t:
            state.update(values(decode(payload), names))
    return state


def test_a_host_sees_birth_data_rebirth_and_the_death_certificate_of_a_killed_camera(broker, sim_gate, tmp_path):
    host = Collector(broker.port, "scada-host", topic=f"spBv1.0/{GROUP}/#")
    cfg = spb_config(tmp_path, broker, sim_gate, {"uri": "sim:3", "max_fps": 25.0})
    proc = subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        birth = wait_until(lambda: messages(host, "NBIRTH"), 90)[0]
        names = {m["alias"]: m["name"] for m in birth["metrics"]}
        first = values(birth, names)
        assert birth["seq"] == 0 and first[REBIRTH] is False and isinstance(first["bdSeq"], int)
        assert {"Frames", "Verdicts/Accept", "Verdicts/Review", "Verdicts/Reject", "Review Rate", "Gate/Version",
                "Camera Lost", "Drift/Alarms", "Outbox Depth", "Last Part/Id",
                "Last Part/Verdict"} <= set(first)  # fmt: skip
        assert all(m["datatype"] in (8, 10, 11, 12) for m in birth["metrics"])
        wait_until(lambda: len(messages(host, "NDATA")) >= 3, 60)
        data = messages(host, "NDATA")
        assert all(m["name"] is None for d in data for m in d["metrics"]), "data by alias only"
        seqs = [birth["seq"]] + [d["seq"] for d in data]
        assert seqs == list(range(len(seqs))), seqs  # one sequence across birth and data
        frames = [values(d, names).get("Frames") for d in data]
        frames = [f for f in frames if f is not None]
        assert frames == sorted(frames) and frames[-1] > first["Frames"]
        shown = [v for d in [birth, *data] if (v := values(d, names).get("Last Part/Verdict"))]
        assert shown and set(shown) <= {"accept", "review", "reject"}, shown  # sim:3 has no parts: id 0
        # a host asks for a rebirth (NCMD): a new birth, seq back to 0, the same bdSeq (same session)
        cmd = pb.Payload(timestamp=int(time.time() * 1000))
        cmd.metrics.add(name=REBIRTH, datatype=11, boolean_value=True)
        cmd.metrics.add(name="Bogus", datatype=11, boolean_value=True)
        host.client.publish(topic(GROUP, "NCMD", "cam-s"), b"\x08\xff\xff", qos=1)  # malformed: ignored
        host.client.publish(topic(GROUP, "NCMD", "cam-s"), cmd.SerializeToString(), qos=1)
        again = wait_until(lambda: messages(host, "NBIRTH")[1:], 30)[0]
        assert again["seq"] == 0 and values(again, names)["bdSeq"] == first["bdSeq"]
        assert proc.poll() is None, "the camera survived the malformed command"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed = time.monotonic()
    death = wait_until(lambda: messages(host, "NDEATH"), 30)[0]
    assert time.monotonic() - killed < 5
    assert values(death, {})["bdSeq"] == first["bdSeq"] and "seq" not in death  # this session's death
    host.close()


def test_a_clean_stop_sends_its_own_death_and_a_restart_a_new_bdseq(broker, sim_gate, tmp_path):
    host = Collector(broker.port, "scada-host-2", topic=f"spBv1.0/{GROUP}/#")
    parts = simulator.write_dataset(tmp_path / "parts", ("gear", "washer"), per_class=6, seed=4)
    cfg = spb_config(tmp_path, broker, sim_gate, {"uri": str(parts)})
    bd = []
    for _ in range(2):
        n = len(messages(host, "NDEATH"))
        res = run_cli("run", str(cfg), "--once")
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert summary["sparkplug"]["births"] >= 1, summary
        death = wait_until(lambda n=n: messages(host, "NDEATH")[n:], 30)[0]
        bd.append(values(death, {})["bdSeq"])
        assert latest(host)["Frames"] == summary["frames"], "the last counts go out before the death"
    assert bd[1] == (bd[0] + 1) % 256, bd  # kept on disk: a host never confuses two sessions' deaths
    host.close()


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_decode_takes_any_bytes_with_a_clear_error(blob):
    try:
        out = decode(blob)
    except BouncerError as exc:
        assert "Sparkplug B" in str(exc)
    else:
        assert isinstance(out["metrics"], list)


def test_the_generated_module_is_what_protoc_makes_of_the_schema(tmp_path):
    res = subprocess.run([str(REPO / "scripts" / "gen_sparkplug"), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        assert fresh == (REPO / "devices" / name).read_text(), "run scripts/gen_sparkplug"


def test_sparkplug_needs_a_broker_and_a_valid_group(sim_gate, tmp_path):
    cfg = device_toml(tmp_path / "a.toml", device={"id": "cam-x", "data_dir": str(tmp_path / "d")},
                      source={"uri": "sim:1"}, gate={"bundle": str(sim_gate)}, sparkplug={"group": GROUP})  # fmt: skip
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode != 0 and "sparkplug.group: needs mqtt.broker" in res.stderr and "Traceback" not in res.stderr
    cfg = device_toml(tmp_path / "b.toml", device={"id": "cam-x", "data_dir": str(tmp_path / "d")},
                      source={"uri": "sim:1"}, gate={"bundle": str(sim_gate)},
                      mqtt={"broker": "mqtt://127.0.0.1:1"}, sparkplug={"group": "a/b#"})  # fmt: skip
    res = run_cli("run", str(cfg))
    assert res.returncode != 0 and "sparkplug.group" in res.stderr and "Traceback" not in res.stderr


# ---- operator alerts ---------------------------------------------------------------------------------------


def test_one_alert_per_incident_not_per_frame():
    sent: list[tuple[str, dict]] = []
    a = Alerts(lambda kind, fields: sent.append((kind, fields)), min_frames=3, window_s=60, quiet_s=300)
    a.note(0.0, "review", ["ood"], "f0")
    a.note(100.0, "review", ["ood"], "f1")  # two OOD frames 100 s apart: noise, no incident
    a.note(101.0, "review", ["ood"], "f2")
    assert sent == []
    a.note(102.0, "review", ["ood"], "f3")
    assert [k for k, _ in sent] == ["new_defect_suspected"] and sent[0][1]["frame_ids"] == ["f1", "f2", "f3"]
    for t in range(103, 390):
        a.note(float(t), "review", ["ood"], f"g{t}")  # the incident goes on: silent
        a.note(float(t) + 0.5, "accept", [], None)
    assert len(sent) == 1
    for t in range(400, 403):  # a blurred lens: its own incident
        a.note(float(t), "reject", ["blur", "dark"], f"b{t}")
    assert sent[-1][0] == "quality" and sent[-1][1]["key"] == "quality:blur" and len(sent) == 2
    a.note_event(410.0, "drift", {"signal": "brightness", "direction": "down"})
    a.note_event(411.0, "drift", {"signal": "brightness", "direction": "down"})  # the same alarm again: same incident
    a.note_event(412.0, "camera_lost", {"uri": "rtsp://cam"})
    a.note_event(413.0, "camera_lost", {"uri": "rtsp://cam"})
    assert [k for k, _ in sent[2:]] == ["drift", "camera_lost"]
    a.note_event(414.0, "camera_recovered", {"uri": "rtsp://cam"})
    a.note_event(415.0, "camera_lost", {"uri": "rtsp://cam"})  # lost again after it came back: a new incident
    assert [k for k, _ in sent].count("camera_lost") == 2
    for t in (1000.0, 1001.0, 1002.0):  # 300 s quiet closed the OOD incident: the next one alerts again
        a.note(t, "review", ["ood"], None)
    assert [k for k, _ in sent].count("new_defect_suspected") == 2


def test_a_run_with_a_giraffe_and_a_smeared_lens_sends_two_alerts(broker, sim_gate, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    known = simulator.write_dataset(tmp_path / "known", ("gear", "washer"), per_class=10, seed=21)
    foreign = simulator.write_dataset(tmp_path / "foreign", ("giraffe",), per_class=8, seed=22)
    paths = sorted(known.rglob("*.png"))
    order = [*paths[:10], *sorted(foreign.rglob("*.png")), *paths[10:20]]
    for i, p in enumerate(order):
        cv2.imwrite(str(src / f"{i:03d}.png"), read_bgr(p))
    for i, p in enumerate(paths[:8]):  # then the lens smears: heavy blur
        cv2.imwrite(str(src / f"{100 + i:03d}.png"), cv2.GaussianBlur(read_bgr(p), (0, 0), 6))
    collector = Collector(broker.port, "operators")
    cfg = device_toml(tmp_path / "device.toml", device={"id": "cam-a", "data_dir": str(tmp_path / "d")},
                      source={"uri": str(src)}, gate={"bundle": str(sim_gate)},
                      mqtt={"broker": broker.url})  # fmt: skip
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    flagged = summary["decisions"]["review"] + summary["decisions"]["reject"]
    assert flagged >= 14 and summary["alerts"] == 2, summary
    alerts = [schemas.parse_alert(p) for p in collector.wait_for("/alerts", 2)]
    assert sorted(a["alert"] for a in alerts) == ["new_defect_suspected", "quality"], alerts
    frame_ids = {json.loads(p)["id"] for p in collector.wait_for("/frames", flagged)}
    for a in alerts:
        assert a["device"] == "cam-a" and a["frames"] >= 3 and set(a["frame_ids"]) <= frame_ids, a
    assert next(a for a in alerts if a["alert"] == "quality")["key"] == "quality:blur"
    collector.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"alert": "giraffe"},
        {"frames": -1},
        {"key": ""},
        {"frame_ids": "f1"},
    ],
)
def test_malformed_alerts_are_refused_naming_the_field(bad):
    good = json.loads(schemas.alert("cam-1", "drift", key="drift:x", summary="s", since=1.0, frames=0,
                                    frame_ids=[], group="g", gate_version="v1"))  # fmt: skip
    assert schemas.parse_alert(json.dumps(good).encode())["alert"] == "drift"
    with pytest.raises(schemas.SchemaError) as exc:
        schemas.parse_alert(json.dumps({**good, **bad}).encode())
    assert "alert:" in str(exc.value) and next(iter(bad)) in str(exc.value)
