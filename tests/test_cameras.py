"""GenICam cameras on their real stacks, no hardware: Aravis's fake GigE Vision camera (its own process on
loopback, killed and restarted as a pulled cable would be) and pylon's camera emulator, through `bouncer run` as a
user runs it: triggered frames in order, each verdict to the PLC and each flagged frame naming its part, the
settings read back, a lost camera survived, a trigger that never comes, and clear errors for wrong settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from helpers import Collector, Plc, device_toml, run_cli, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.bench.servers import FakeGigECamera
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.sources.genicam import check_format, to_bgr

REVIEW, REJECT = 2, 3
PYLON = {"PYLON_CAMEMU": "1"}  # one emulated Basler camera, serial 0815-0000


@pytest.fixture()
def camera():
    cam = FakeGigECamera().start()
    yield cam
    cam.stop()


def camera_config(tmp_path, uri: str, gate, camera: dict, **sections) -> object:
    return device_toml(tmp_path / "device.toml", device={"id": "cam-g", "data_dir": str(tmp_path / "d")},
                       source={"uri": uri, "max_fps": 20.0}, gate={"bundle": str(gate)}, camera=camera,
                       **sections)  # fmt: skip


def start_run(cfg, env: dict[str, str] | None = None) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})  # fmt: skip


def stop_run(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def events(collector: Collector) -> list[dict]:
    return [json.loads(p) for p in collector.on("/events")]


def test_a_software_triggered_gige_camera_survives_a_pulled_cable_and_every_verdict_names_its_part(
    camera, broker, sim_gate, tmp_path
):
    """Bayer frames from the fake GigE Vision camera, one per software trigger: every verdict reaches the PLC in
    order with its part id, flagged frames carry the same id, the settings are read back in `camera_opened`.
    Killing the camera mid-run is an event, an alert and a hold on the line; restarted, it is reopened and parts
    go on counting; nothing decided before the loss is missing."""
    plc, collector = Plc(), Collector(broker.port, "cam-test")
    cfg = camera_config(tmp_path, camera.uri, sim_gate,
                        {"trigger": "software", "exposure_us": 2500.0, "pixel_format": "BayerRG8", "gain_db": 2.0,
                         "frame_rate_hz": 100.0},
                        mqtt={"broker": broker.url}, line={"modbus": f"modbus://127.0.0.1:{plc.port}",
                                                           "register": 10, "deadline_ms": 2000.0})  # fmt: skip
    proc = start_run(cfg)
    try:
        wait_until(lambda: len(plc.parts()) >= 8 and collector.on("/frames"), timeout=90)
        camera.stop()
        lost_at = time.monotonic()
        wait_until(lambda: any(e["event"] == "camera_lost" for e in events(collector)), timeout=60)
        before = len(plc.parts())
        camera.start()
        wait_until(lambda: any(e["event"] == "camera_recovered" for e in events(collector)), timeout=90)
        wait_until(lambda: len(plc.parts()) >= before + 5, timeout=60)
    finally:
        summary = stop_run(proc)
    parts = plc.parts()
    assert [s for _, s, _ in parts] == list(range(1, len(parts) + 1)), "every verdict, in order"
    assert [p for _, _, p in parts] == list(range(1, len(parts) + 1)), "one part per trigger, none skipped"
    assert {c for c, _, _ in parts} <= {REVIEW, REJECT}, "a test pattern is nothing the gate was fitted on"
    assert any(t > lost_at for t in plc.holds()), "the line on hold while the camera was gone"
    evs = events(collector)
    kinds = [e["event"] for e in evs]
    assert kinds.index("camera_opened") < kinds.index("camera_lost") < kinds.index("camera_recovered")
    opened = next(e for e in evs if e["event"] == "camera_opened")
    assert opened["camera"]["serial"] == camera.serial and opened["camera"]["model"] == "Fake"
    assert opened["settings"]["pixel_format"] == "BayerRG8" and opened["settings"]["exposure_us"] == 2500.0
    assert opened["settings"]["gain_db"] == 2.0 and opened["settings"]["trigger"] == "software"
    assert opened["settings"]["frame_rate_hz"] == 100.0
    assert [json.loads(a)["alert"] for a in collector.on("/alerts")].count("camera_lost") == 1
    d = summary["decisions"]
    assert summary["frames"] == len(parts) == d["review"] + d["reject"], summary
    flagged = wait_until(lambda: len(f := collector.on("/frames")) + summary["undelivered"] >= len(parts) and f)
    named = [json.loads(f)["part"] for f in flagged]
    assert len(set(named)) == len(named) and set(named) <= {p for _, _, p in parts}, "each flagged frame, its part"
    collector.close()


def test_a_hardware_trigger_that_never_comes_is_said_once_and_holds_the_line(camera, broker, sim_gate, tmp_path):
    """Line0 as the trigger and nothing wired to it: after `trigger_timeout_s` one event and one alert for the
    silence (not one per timeout), the verdict register on hold, no frame decided."""
    plc, collector = Plc(), Collector(broker.port, "cam-test")
    cfg = camera_config(tmp_path, camera.uri, sim_gate, {"trigger": "Line0", "trigger_timeout_s": 0.5},
                        mqtt={"broker": broker.url}, line={"modbus": f"modbus://127.0.0.1:{plc.port}",
                                                           "register": 10})  # fmt: skip
    proc = start_run(cfg)
    try:
        wait_until(lambda: any(e["event"] == "trigger_timeout" for e in events(collector)), timeout=60)
        time.sleep(2.0)  # four more timeouts of the same silence
    finally:
        summary = stop_run(proc)
    timeouts = [e for e in events(collector) if e["event"] == "trigger_timeout"]
    assert len(timeouts) == 1 and timeouts[0]["after_s"] == 0.5 and timeouts[0]["trigger"] == "Line0", timeouts
    alerts = [json.loads(a) for a in collector.on("/alerts")]
    assert [a["alert"] for a in alerts] == ["no_trigger"] and "no part triggered" in alerts[0]["summary"]
    assert plc.holds() and not plc.parts() and summary["frames"] == 0, summary
    collector.close()


def test_pylon_s_emulated_camera_runs_a_gate_with_its_region_and_frame_ids(broker, sim_gate, tmp_path):
    """Basler's emulator through pypylon: the region, gain and frame rate applied and read back, frames 640 x 480,
    each verdict in the verdict log with its part and the camera's own frame id, both counting up by one; the same
    part ids reach the PLC in order and name the flagged frames."""
    log, plc, collector = tmp_path / "verdicts.jsonl", Plc(), Collector(broker.port, "pylon-test")
    cfg = camera_config(tmp_path, "genicam://pylon/0815-0000", sim_gate,
                        {"trigger": "software", "roi": [16, 8, 640, 480], "gain_db": 1.0, "exposure_us": 3000.0,
                         "frame_rate_hz": 50.0},
                        verdicts={"path": str(log)}, mqtt={"broker": broker.url},
                        line={"modbus": f"modbus://127.0.0.1:{plc.port}", "register": 10,
                              "deadline_ms": 2000.0})  # fmt: skip
    proc = start_run(cfg, env=PYLON)
    try:
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 12 and collector.on("/frames"),
                   timeout=90)  # fmt: skip
    finally:
        summary = stop_run(proc)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["part"] for x in lines] == list(range(1, len(lines) + 1))
    ids = [x["camera"]["frame_id"] for x in lines]
    assert ids == list(range(ids[0], ids[0] + len(lines))), ids
    assert summary["frames"] == len(lines)
    assert [p for _, _, p in plc.parts()] == list(range(1, len(lines) + 1)), "every verdict to the PLC, its part"
    opened = next(e for e in events(collector) if e["event"] == "camera_opened")
    assert opened["settings"]["roi"] == [16, 8, 640, 480] and opened["settings"]["frame_rate_hz"] == 50.0
    flagged = wait_until(lambda: len(f := collector.on("/frames")) + summary["undelivered"] >= summary["decisions"][
        "review"] + summary["decisions"]["reject"] and f)  # fmt: skip
    named = [json.loads(f)["part"] for f in flagged]
    assert len(set(named)) == len(named) and set(named) <= set(range(1, len(lines) + 1)), named
    collector.close()
    res = run_cli("doctor", "--json", env=PYLON)
    cams = json.loads(res.stdout.strip().splitlines()[-1])["cameras"]
    assert {"stack": "pylon", "id": "0815-0000", "model": "Emulation", "serial": "0815-0000",
            "protocol": "BaslerCamEmu"} in cams  # fmt: skip


def test_sparkplug_reports_every_part_s_verdict_in_order(broker, sim_gate, tmp_path):
    """With a triggered camera each part's id and verdict go to SCADA/MES at once (NDATA by exception), one data
    message per part in order, not one every `sparkplug.every_s`; the sequence numbers stay one run."""
    from bouncer.devices.sparkplug import decode

    host = Collector(broker.port, "scada", topic="spBv1.0/line1/#")
    log = tmp_path / "verdicts.jsonl"
    cfg = camera_config(tmp_path, "genicam://pylon/0815-0000", sim_gate, {"trigger": "software"},
                        mqtt={"broker": broker.url}, sparkplug={"group": "line1", "every_s": 30.0},
                        verdicts={"path": str(log)})  # fmt: skip
    proc = start_run(cfg, env=PYLON)
    try:
        wait_until(lambda: len(host.on("/NDATA/cam-g")) >= 10, timeout=90)
    finally:
        stop_run(proc)
    birth = decode(host.on("/NBIRTH/cam-g")[0])
    names = {m["alias"]: m["name"] for m in birth["metrics"]}
    data = [decode(p) for p in host.on("/NDATA/cam-g")]
    seen = [{names[m["alias"]]: m["value"] for m in d["metrics"]} for d in data]
    parts = [v["Last Part/Id"] for v in seen if "Last Part/Id" in v]
    verdicts = {x["part"]: x["decision"] for x in map(json.loads, log.read_text().splitlines())}
    assert parts == list(range(parts[0], parts[0] + len(parts))) and len(parts) >= 10, parts
    assert all(v["Last Part/Verdict"] == verdicts[v["Last Part/Id"]] for v in seen if "Last Part/Id" in v)
    seqs = [d["seq"] for d in data]
    assert seqs == [(birth["seq"] + 1 + i) % 256 for i in range(len(seqs))], seqs
    host.close()


@pytest.mark.parametrize(
    ("camera_section", "needle"),
    [
        ({"exposure_us": 1e9}, "camera.exposure_us: 1e+09 is outside this camera's range 10 to 1e+07"),
        ({"gain_db": 50.0}, "camera.gain_db: 50 is outside this camera's range 0 to 10"),
        ({"frame_rate_hz": 5000.0}, "camera.frame_rate_hz: 5000 is outside this camera's range 0.1 to 1000"),
        ({"pixel_format": "YUV422_8"}, "camera.pixel_format: 'YUV422_8' is not one this camera offers"),
        ({"trigger": "Line3"}, "camera.trigger: 'Line3' is not one of this camera's trigger inputs (Line0)"),
        ({"roi": [0, 0, 4096, 100]}, "camera.roi: [0, 0, 4096, 100] does not fit the sensor (2048 x 2048)"),
        ({"roi": [0, 0, 64]}, "camera.roi: expected [x, y, width, height]"),
        ({"shutter": 1}, "camera.shutter: unknown key"),
    ],
)
def test_a_setting_the_camera_cannot_take_is_one_clear_error(camera, sim_gate, tmp_path, camera_section, needle):
    cfg = camera_config(tmp_path, camera.uri, sim_gate, camera_section)
    res = run_cli("run", str(cfg), timeout=120)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize(
    ("uri", "env", "needle"),
    [
        ("genicam://aravis/no-such-camera", {}, "genicam://aravis/no-such-camera: no such camera"),
        ("genicam://pylon/1234", PYLON, "genicam://pylon/1234: no such camera (serials seen: 0815-0000)"),
        ("genicam://spinnaker/1", {}, "expected genicam://aravis/<device id or address> or genicam://pylon/"),
    ],
)
def test_an_unknown_camera_is_one_clear_error_naming_what_is_there(sim_gate, tmp_path, uri, env, needle):
    cfg = camera_config(tmp_path, uri, sim_gate, {})
    res = run_cli("run", str(cfg), env=env, timeout=120)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


ROWS = {"RG": ("RG", "GB"), "GR": ("GR", "BG"), "BG": ("BG", "GR"), "GB": ("GB", "RG")}  # a 2 x 2 tile


def mosaic(bgr: np.ndarray, pattern: str) -> np.ndarray:
    """What a Bayer sensor with PATTERN (GenICam's name: its first row's first two pixels) records of BGR."""
    channel = {"R": 2, "G": 1, "B": 0}
    out = np.empty(bgr.shape[:2], bgr.dtype)
    for dy, row in enumerate(ROWS[pattern]):
        for dx, colour in enumerate(row):
            out[dy::2, dx::2] = bgr[dy::2, dx::2, channel[colour]]
    return out


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["RG", "GR", "BG", "GB"]), st.tuples(*[st.integers(0, 255)] * 3), st.sampled_from([8, 12, 16]))
def test_bayer_and_deep_mono_frames_become_the_colour_the_sensor_saw(pattern, colour, bits):
    """A flat colour mosaicked as each GenICam Bayer pattern comes back as that colour (OpenCV names its
    patterns from the second row: a swap here would turn red parts blue); deeper pixels are scaled to 8 bits."""
    bgr = np.empty((16, 20, 3), np.uint8)
    bgr[:] = colour
    raw = mosaic(bgr, pattern)
    if bits > 8:
        raw = raw.astype(np.uint16) << (bits - 8)
    out = to_bgr(raw, f"Bayer{pattern}{bits}")
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    assert np.abs(out[4:-4, 4:-4].astype(int) - np.array(colour)).max() <= 1
    grey = ((np.arange(12 * 8).reshape(12, 8) * 37) % (1 << bits)).astype(np.uint16)
    mono = to_bgr(grey if bits > 8 else grey.astype(np.uint8), f"Mono{bits}")
    assert (mono[..., 0] == (grey >> (bits - 8)).astype(np.uint8)).all() and (mono[..., 0] == mono[..., 2]).all()
    rgb = to_bgr(bgr[..., ::-1].copy(), "RGB8")
    assert (rgb == bgr).all() and (to_bgr(bgr, "BGR8Packed") == bgr).all()


@pytest.mark.parametrize("name", ["YUV422_8", "Mono12Packed", "BayerRG12p", "BGRa8", "Coord3D_C16"])
def test_a_pixel_format_bouncer_cannot_read_is_refused_by_name(name):
    with pytest.raises(BouncerError, match=f"the camera sends {name}, which Bouncer cannot read"):
        check_format(name)
    assert check_format("RGB8Packed") == "RGB8" and cv2 is not None


def test_bench_camera_times_both_acquisition_modes_beside_the_decision_alone(built_models, bouncer_home):
    """Through the fake GigE Vision camera (the bench starts and stops its own): every part decided in order,
    the gate fitted on the camera's frames so that they take the full path (mostly accepted), and the camera
    path never faster than the decision it ends in."""
    res = run_cli("bench", "camera", "--frames", "40", "--frame-rate", "50", env={"BOUNCER_HOME": str(bouncer_home)},
                  timeout=600)  # fmt: skip
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    soft, free, alone = out["software_trigger"], out["free_running"], out["decision_alone"]
    assert out["frame_shape"] == [512, 512, 3] and out["pixel_format"] == "BayerRG8"
    assert soft["settings"]["trigger"] == "software" and free["settings"]["frame_rate_hz"] == 50.0
    assert soft["parts_in_order"] and free["parts_in_order"] and soft["events"] == free["events"] == []
    assert out["verdicts"]["accept"] > 0.8 * sum(out["verdicts"].values()), out["verdicts"]
    for row in (soft, free):
        assert alone["latency"]["p50_ms"] < row["latency"]["p50_ms"] < 1000, (alone, row)
    assert 0 < free["fps"] <= 55 and free["camera_frames_missed"] >= 0
    assert "software trigger -> verdict" in res.stdout
