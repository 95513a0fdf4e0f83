"""The device runtime against a real Mosquitto: delivery, crashes, broker restarts, disk budget, commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import Collector, run_cli

from bouncer.devices.loop import Device
from bouncer.runtime import schemas
from bouncer.runtime.config import load_config
from bouncer.runtime.outbox import Outbox
from bouncer.sim import simulator


def frames_folder(root: Path, parts: tuple[str, ...], per_class: int, seed: int) -> Path:
    simulator.write_dataset(root, parts, per_class=per_class, seed=seed)
    return root


def device_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bouncer", "run", *args]


def test_once_delivers_every_flagged_frame_per_schema(broker, sim_gate, tmp_path, bouncer_home):
    src = frames_folder(tmp_path / "frames", ("gear", "washer", "bolt", "giraffe"), 4, seed=3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    collector = Collector(broker.port)
    plain = subprocess.Popen(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "bouncer/v1/+/frames", "-C", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    res = run_cli(
        "run",
        "--source",
        str(src),
        "--gate",
        str(sim_gate),
        "--broker",
        broker.url,
        "--device-id",
        "cam-1",
        "--data-dir",
        str(tmp_path / "data"),
        "--once",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    flagged = summary["decisions"]["review"] + summary["decisions"]["reject"]
    assert summary["frames"] == 17 and flagged >= 9 and summary["undelivered"] == 0
    frames = collector.wait_for("/frames", flagged)
    msgs = [schemas.FrameMessage.decode(p) for p in frames]
    assert len({m.id for m in msgs}) == flagged
    by_source = {Path(m.source).name: m for m in msgs}
    assert by_source["broken.jpg"].reasons == ["unreadable"] and by_source["broken.jpg"].decision == "reject"
    bolts = [m for m in msgs if "bolt" in m.source]
    assert len(bolts) == 4 and all(m.decision == "review" and "ood" in m.reasons for m in bolts)
    m = bolts[0]
    img = cv2.imdecode(np.frombuffer(m.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[2] == 3
    # every input head selection can choose from, so that the station can choose again when it retrains
    f = m.feature_arrays()
    assert f["features"].shape == (1280,) and f["pool_s32"].shape == (192,)
    assert f["pool_s2"].shape == (16,) and f["map_s16@max"].shape == (112,)
    assert m.gate_version and len(m.backbone_hash) == 64 and m.device == "cam-1"
    # a plain mosquitto_sub sees a well-formed JSON payload
    out, _ = plain.communicate(timeout=10)
    assert json.loads(out)["v"] == 1
    status = [json.loads(p) for p in collector.on("/status")]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    collector.close()
    # a second run with the same data dir does not process finished frames again
    res = run_cli(
        "run",
        "--source",
        str(src),
        "--gate",
        str(sim_gate),
        "--broker",
        broker.url,
        "--device-id",
        "cam-1",
        "--data-dir",
        str(tmp_path / "data"),
        "--once",
    )
    assert json.loads(res.stdout.strip().splitlines()[-1])["skipped_done"] == 17


def test_nothing_lost_across_broker_restarts_and_sigkill(broker, sim_gate, tmp_path, bouncer_home):
    """Broker stopped and started twice mid-stream, the device killed with SIGKILL and restarted:
    every flagged frame arrives, duplicates only with the same id."""
    src = frames_folder(tmp_path / "frames", ("bolt", "giraffe"), 60, seed=5)  # all flagged (unfamiliar)
    expected = 120
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        f'[device]\nid = "cam-9"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[source]\nuri = "{src}"\nmax_fps = 12.0\n[gate]\nbundle = "{sim_gate}"\n'
        f'[mqtt]\nbroker = "{broker.url}"\n'
    )
    collector = Collector(broker.port, "collector-crash-test")
    env = {**os.environ, "BOUNCER_HOME": str(bouncer_home)}
    dev = subprocess.Popen(device_cmd(str(cfg), "--once"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.5)
    for _ in range(2):
        broker.stop()
        time.sleep(0.7)
        broker.start()
        time.sleep(0.7)
    dev.send_signal(signal.SIGKILL)
    dev.wait(timeout=10)
    assert dev.returncode == -signal.SIGKILL
    res = subprocess.run(
        device_cmd(str(cfg), "--once", "--drain-timeout", "60"), env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] > 0 and summary["undelivered"] == 0
    frames = collector.wait_for("/frames", expected, timeout=60)
    msgs = [schemas.FrameMessage.decode(p) for p in frames]
    ids = {m.id for m in msgs}
    assert len(ids) == expected, (len(ids), len(msgs))
    by_id: dict[str, set[str]] = {}
    for m in msgs:
        by_id.setdefault(m.id, set()).add(m.source)
    assert all(len(sources) == 1 for sources in by_id.values())  # a duplicate is the same frame
    collector.close()


def test_malformed_commands_are_rejected_with_events(broker, sim_gate, tmp_path, bouncer_home):
    import paho.mqtt.client as mqtt

    collector = Collector(broker.port, "collector-cmd")
    env = {**os.environ, "BOUNCER_HOME": str(bouncer_home)}
    dev = subprocess.Popen(
        device_cmd(
            "--source",
            "sim:3",
            "--gate",
            str(sim_gate),
            "--broker",
            broker.url,
            "--device-id",
            "cam-5",
            "--data-dir",
            str(tmp_path / "data"),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert collector.wait_for("/status", 1, timeout=60), "device never came online"
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        cmd_topic = schemas.topic("cam-5", "cmd")
        bad = [
            b"\xff\xfe\x00 not utf-8",
            b"{not json",
            b'{"v": 1, "command": "selfdestruct", "id": "x"}',
            b'{"v": 2, "command": "ping", "id": "x"}',
            b"[1, 2, 3]",
            b" " * (9 * 1024 * 1024),
        ]
        for payload in bad:
            pub.publish(cmd_topic, payload, qos=1).wait_for_publish(5)
        pub.publish(cmd_topic, schemas.encode({"id": "c1", "command": "ping"}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 30
        events: list[dict] = []
        while time.monotonic() < deadline:
            events = [json.loads(p) for p in collector.on("/events")]
            if sum(e["event"] == "command_rejected" for e in events) >= len(bad) and any(
                e["event"] == "command_done" for e in events
            ):
                break
            time.sleep(0.1)
        rejected = [e for e in events if e["event"] == "command_rejected"]
        assert len(rejected) == len(bad), events
        assert any("not UTF-8" in e["reason"] for e in rejected)
        assert any("Invalid enum value" in e["reason"] and "at `$.command`" in e["reason"] for e in rejected)
        assert any("exceeds" in e["reason"] for e in rejected)
        assert any(e["event"] == "command_done" and e["command_id"] == "c1" for e in events)
        assert dev.poll() is None  # still running
        pub.loop_stop()
        pub.disconnect()
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=30)
    assert dev.returncode == 0, dev.stderr.read()[-2000:]
    time.sleep(0.5)
    assert json.loads(collector.on("/status")[-1])["state"] == "offline"
    collector.close()


def test_disk_budget_evicts_in_the_stated_order(sim_gate, tmp_path, bouncer_home):
    """No broker reachable and a tiny budget: the oldest rejects go first, then reviews; counted, reported."""
    src = tmp_path / "frames"
    frames_folder(src / "a", ("bolt",), 30, seed=7)  # reviews (ood)
    cap = np.full((240, 320, 3), 3, np.uint8)
    for i in range(10):
        (src / "b").mkdir(exist_ok=True)
        cv2.imwrite(str(src / "b" / f"cap{i}.png"), cap)
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        f'[device]\nid = "cam-7"\ndata_dir = "{tmp_path / "data"}"\n[source]\nuri = "{src}"\n'
        f'[gate]\nbundle = "{sim_gate}"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1"\n[outbox]\nmax_mb = 0.2\n'
    )
    res = run_cli("run", str(cfg), "--once", "--drain-timeout", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    from bouncer.runtime.outbox import Outbox

    box = Outbox(tmp_path / "data" / "outbox.sqlite", 10**9)
    kinds = [p.kind for p in box.pending(limit=10_000)]
    evicted = box.counter("evicted")
    assert evicted > 0 and box.bytes <= 0.2 * 1024 * 1024
    assert "event" in kinds  # eviction events are kept, never evicted
    events = [json.loads(p.payload) for p in box.pending(limit=10_000) if p.kind == "event"]
    assert any(e["event"] == "eviction" for e in events)
    box.close()


def test_a_full_disk_ends_the_run_with_one_line_and_loses_no_frame(sim_gate, tmp_path, bouncer_home):
    """The outbox's file may grow no further (RLIMIT_FSIZE: SQLite then reports a full disk) while every frame is
    flagged: the run ends with one line naming the outbox, no traceback, and a second run with room decides again
    each frame not yet on disk, so every flagged frame is in the outbox once."""
    import resource

    src = frames_folder(tmp_path / "frames", ("bolt", "giraffe"), 20, seed=13)  # all flagged (unfamiliar)
    data = tmp_path / "data"
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[device]\nid = "cam-8"\ndata_dir = "{data}"\n[source]\nuri = "{src}"\n'
                   f'[gate]\nbundle = "{sim_gate}"\n')  # fmt: skip
    limit = 600_000  # bytes per file: a few flagged frames' worth of write-ahead log

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run(device_cmd(str(cfg), "--once"), capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk, env={**os.environ, "BOUNCER_HOME": str(bouncer_home)})  # fmt: skip
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert "outbox.sqlite" in last and "disk" in last, last
    box = Outbox(data / "outbox.sqlite", 10**10)
    stored = {p.msg_id for p in box.pending(limit=10_000) if p.topic.endswith("/frames")}
    marked = box.done(str(src))
    box.close()
    assert 0 < len(marked) < 40 and len(stored) >= len(marked)  # nothing marked done that is not on disk
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] == len(marked)
    box = Outbox(data / "outbox.sqlite", 10**10)
    frames = [schemas.FrameMessage.decode(p.payload) for p in box.pending(limit=10_000) if p.topic.endswith("/frames")]
    box.close()
    assert len(frames) == len({m.id for m in frames}) == 40 and {Path(m.source).name for m in frames} == {
        p.name for p in src.rglob("*.png")}  # fmt: skip


def test_outbox_eviction_order_unit(tmp_path):
    from bouncer.runtime.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite", max_bytes=1000)
    for i in range(3):
        box.put(f"rev{i}", "t", b"x" * 200, "review")
        box.put(f"rej{i}", "t", b"x" * 200, "reject")
    box.put("ev", "t", b"x" * 10, "event")
    left = [p.msg_id for p in box.pending()]
    assert left == ["rev0", "rev1", "rev2", "rej2", "ev"]  # oldest rejects went first
    evicted = box.put("rev3", "t", b"x" * 200, "review")
    assert evicted == ["rej2"]
    evicted = box.put("rev4", "t", b"x" * 200, "review")
    assert evicted == ["rev0"]
    assert box.counter("evicted") == 4
    assert box.put("rev4", "t", b"x" * 200, "review") == []  # the same id twice is stored once
    box.ack(box.pending()[0].rowid)
    assert box.depth() == 4
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_bytes=1000)  # reopened: the state is on disk
    assert again.depth() == 4 and again.counter("evicted") == 4

    def interrupted():
        raise KeyboardInterrupt

    again._victim = interrupted  # a put stopped halfway through its eviction: nothing of it stays
    with pytest.raises(KeyboardInterrupt):
        again.put("rev5", "t", b"x" * 400, "review")
    del again._victim
    assert again.depth() == 4 and "rev5" not in {p.msg_id for p in again.pending()}
    assert again.put("rev6", "t", b"x" * 10, "review") == [] and again.depth() == 5  # the next write begins
    again.close()


def test_video_file_and_lost_camera(sim_gate, tmp_path, bouncer_home):
    """A video file is processed frame by frame (--once); a camera URL that refuses is reported as an
    event and retried, never a crash."""
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    rng = np.random.default_rng(0)
    for i in range(12):
        writer.write(simulator.render(("gear", "bolt")[i % 2], rng))
    writer.release()
    res = run_cli(
        "run",
        "--source",
        str(video),
        "--gate",
        str(sim_gate),
        "--device-id",
        "cam-v",
        "--data-dir",
        str(tmp_path / "d1"),
        "--once",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 12 and summary["decisions"]["review"] >= 6
    env = {**os.environ, "BOUNCER_HOME": str(bouncer_home)}
    dev = subprocess.Popen(
        device_cmd(
            "--source",
            "http://127.0.0.1:1/cam.mjpg",
            "--gate",
            str(sim_gate),
            "--device-id",
            "cam-l",
            "--data-dir",
            str(tmp_path / "d2"),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(6)
    assert dev.poll() is None, dev.stderr.read()[-2000:]
    dev.send_signal(signal.SIGTERM)
    dev.wait(timeout=30)
    from bouncer.runtime.outbox import Outbox

    box = Outbox(tmp_path / "d2" / "outbox.sqlite")
    events = [json.loads(p.payload)["event"] for p in box.pending() if p.kind == "event"]
    box.close()
    assert "camera_lost" in events


def test_metrics_endpoint(sim_gate, tmp_path, bouncer_home):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BOUNCER_HOME": str(bouncer_home)}
    dev = subprocess.Popen(
        device_cmd(
            "--source",
            "sim:1",
            "--gate",
            str(sim_gate),
            "--device-id",
            "cam-m",
            "--data-dir",
            str(tmp_path / "d"),
            "--metrics-port",
            str(port),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        text = ""
        for _ in range(100):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
                if "bouncer_frames_total" in text and "bouncer_frames_total 0.0" not in text:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert "bouncer_frames_total" in text and "bouncer_stage_seconds_bucket" in text
        assert 'bouncer_decisions_total{decision="accept"' in text and "bouncer_gate_info" in text
        # the Grafana dashboard in docs/ reads only metrics and labels this device serves
        import json
        import re

        from helpers import REPO

        board = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
        assert len(exprs) >= 10 and all(p["gridPos"] and p["title"] for p in board["panels"])
        served = set(re.findall(r"^(?:# TYPE )?(bouncer_[a-z_]+)", text, re.M))
        for expr in exprs:
            for name in re.findall(r"bouncer_[a-z_]+", expr):
                assert name in served or name.removesuffix("_bucket") in served, (name, sorted(served))
            for label in re.findall(r"by \(([a-z_, ]+)\)", expr):
                for lab in (x.strip() for x in label.split(",")):
                    assert lab in ("instance", "le") or f'{lab}="' in text or lab == "signal", (lab, expr)
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=30)


def _certs(d: Path) -> None:
    """A test CA, a server certificate for 127.0.0.1 and two client certificates (device, station)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=bouncer-test-ca",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn, ext in (
        ("server", "127.0.0.1", ["-extfile", "san.ext"]),
        ("cam", "cam-t", []),
        ("station", "station", []),
    ):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={cn}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *ext,
        )


def test_tls_with_client_certificates(sim_gate, tmp_path, bouncer_home):
    import socket
    import ssl

    import paho.mqtt.client as mqtt

    certs = tmp_path / "certs"
    certs.mkdir()
    _certs(certs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\ncafile {certs}/ca.crt\ncertfile {certs}/server.crt\nkeyfile {certs}/server.key\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        got: list[bytes] = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.tls_set(
            ca_certs=str(certs / "ca.crt"),
            certfile=str(certs / "station.crt"),
            keyfile=str(certs / "station.key"),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        sub.on_connect = lambda c, u, f, rc, p: c.subscribe("bouncer/v1/+/frames", qos=1)
        sub.on_message = lambda c, u, m: got.append(m.payload)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        src = frames_folder(tmp_path / "frames", ("bolt",), 3, seed=2)
        cfg = tmp_path / "d.toml"
        cfg.write_text(
            f'[device]\nid = "cam-t"\ndata_dir = "{tmp_path / "data"}"\n[source]\nuri = "{src}"\n'
            f'[gate]\nbundle = "{sim_gate}"\n[mqtt]\nbroker = "mqtts://127.0.0.1:{port}"\n'
            f'ca = "{certs}/ca.crt"\ncert = "{certs}/cam.crt"\nkey = "{certs}/cam.key"\n'
        )
        time.sleep(0.5)
        res = run_cli("run", str(cfg), "--once", "--drain-timeout", "90")  # under CI load the TLS handshake is slow
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["undelivered"] == 0
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(got) == 3
        # a device without a client certificate is refused, and its frames stay in its outbox
        cfg.write_text(
            cfg.read_text()
            .replace(f'cert = "{certs}/cam.crt"\nkey = "{certs}/cam.key"\n', "")
            .replace(str(tmp_path / "data"), str(tmp_path / "data2"))
        )
        res = run_cli("run", str(cfg), "--once", "--drain-timeout", "3")
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert res.returncode == 0 and summary["undelivered"] == 3 + summary["alerts"]  # the alert they opened
        sub.loop_stop()
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def test_the_verdict_log_writes_every_verdict_and_rotates(sim_gate, tmp_path):
    """An output added as one module (devices/verdict_log.py) and one entry in devices/assembly.py: every verdict
    a JSON line, a flagged frame's line naming its outbox message, the file rotated at its size."""
    frames = simulator.write_dataset(tmp_path / "f", ("gear", "giraffe"), per_class=5, seed=3)
    log_path = tmp_path / "plant" / "verdicts.jsonl"
    cfg = load_config(None, {"device.id": "cam-v", "device.data_dir": str(tmp_path / "dev"), "source.uri": str(frames),
                             "gate.bundle": str(sim_gate), "verdicts.path": str(log_path)})  # fmt: skip
    summary = Device(cfg).run(once=True, handle_signals=False).to_dict()
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(rows) == summary["frames"] == 10 and summary["verdict_log"]["written"] == 10
    assert [r["sequence"] for r in rows] == list(range(1, 11))
    flagged = [r for r in rows if r["decision"] != "accept"]
    assert flagged and all(r["frame_id"] for r in flagged) and all(r["frame_id"] is None for r in rows
                                                                  if r["decision"] == "accept")  # fmt: skip
    box = Outbox(tmp_path / "dev" / "outbox.sqlite")
    ids = {json.loads(p.payload)["id"] for p in box.pending(limit=100) if p.kind in ("review", "reject")}
    box.close()
    assert {r["frame_id"] for r in flagged} == ids
    small = load_config(None, {"device.id": "cam-w", "device.data_dir": str(tmp_path / "dev2"),
                               "source.uri": str(frames), "gate.bundle": str(sim_gate),
                               "verdicts.path": str(tmp_path / "v2.jsonl"), "verdicts.max_mb": 0.0005})  # fmt: skip
    report = Device(small).run(once=True, handle_signals=False).to_dict()["verdict_log"]
    assert report["rotations"] >= 1 and (tmp_path / "v2.jsonl.1").is_file()


def test_an_output_that_fails_to_start_or_stop_leaves_nothing_open(sim_gate, tmp_path):
    """Outputs start in order and stop in order; one that raises at its stop is logged and the rest still stop
    (the outbox closes, the reports arrive); one that raises at its start stops those already started."""
    from bouncer.devices.outputs import Output

    class Recorder(Output):
        def __init__(self, name: str, fail_start: bool = False, fail_stop: bool = False) -> None:
            self.name, self.fail_start, self.fail_stop, self.seen = name, fail_start, fail_stop, []

        def start(self) -> None:
            self.seen.append("start")
            if self.fail_start:
                raise RuntimeError(f"{self.name} cannot start")

        def frame(self, done) -> None:
            self.seen.append("frame")

        def stop(self) -> None:
            self.seen.append("stop")
            if self.fail_stop:
                raise RuntimeError(f"{self.name} cannot stop")

        def report(self) -> dict:
            return {"frames": self.seen.count("frame")}

    frames = simulator.write_dataset(tmp_path / "f", ("gear",), per_class=3, seed=5)

    def config(name: str):
        return load_config(None, {"device.id": name, "device.data_dir": str(tmp_path / name),
                                  "source.uri": str(frames), "gate.bundle": str(sim_gate)})  # fmt: skip

    a, b = Recorder("a", fail_stop=True), Recorder("b")
    summary = Device(config("cam-a"), extra=[a, b]).run(once=True, handle_signals=False).to_dict()
    assert a.seen == ["start", "frame", "frame", "frame", "stop"] and b.seen[-1] == "stop"
    assert summary["a"] == {"frames": 3} and summary["b"] == {"frames": 3}
    Outbox(tmp_path / "cam-a" / "outbox.sqlite").close()  # closed by the run: it opens again
    first, broken, never = Recorder("first"), Recorder("broken", fail_start=True), Recorder("never")
    device = Device(config("cam-b"), extra=[first, broken, never])
    with pytest.raises(RuntimeError, match="broken cannot start"):
        device.run(once=True, handle_signals=False)
    assert first.seen == ["start", "stop"] and broken.seen == ["start"] and never.seen == []


def test_the_prefetch_thread_keeps_order_the_frozen_check_and_the_guard_s_decisions(sim_gate, tmp_path):
    """Frames read and prepared ahead on their own thread decide exactly as one at a time: same verdicts and
    reasons in source order, a repeated frame still frozen (the previous frame travels with the preparing), an
    event in its place, a source that fails mid-run raised in the loop thread, and a stop leaves the thread ended."""
    import threading

    from bouncer.devices.prefetch import Prefetch
    from bouncer.runtime.sources.streams import FrameItem, Source

    rng = np.random.default_rng(8)
    frames = [cv2.resize(simulator.render(simulator.KNOWN_CLASSES[i % 4] if i % 5 else "bolt", rng), (640, 480))
              for i in range(12)]  # fmt: skip
    frames[7] = frames[6].copy()  # the camera froze for one frame

    class Frames(Source):
        uri = "mem:0"

        def __init__(self, fail_at: int | None = None) -> None:
            super().__init__()
            self.fail_at = fail_at

        def __iter__(self):
            for i, f in enumerate(frames):
                if i == self.fail_at:
                    raise OSError("the capture card went away")
                if i == 3:
                    yield FrameItem("event-3", self.uri, event={"event": "camera_recovered"})
                yield FrameItem(f"f{i}", self.uri, frame=f)

    device = Device(load_config(None, {"device.id": "cam-p", "device.data_dir": str(tmp_path / "d"),
                                       "source.uri": "sim:0", "gate.bundle": str(sim_gate)}))  # fmt: skip
    one_by_one, prev = [], None
    for f in frames:
        d, _, prev = device.guard.score_frame(f, prev)
        one_by_one.append((d.decision, d.label, d.reasons))
    assert "frozen" in one_by_one[7][2] and "frozen" not in one_by_one[6][2]

    seen = []
    prefetch = Prefetch(Frames(), lambda: device.guard, device.arrive, lambda item: item.key == "f11")
    for arrived in prefetch:
        if arrived.item.event:
            seen.append(arrived.item.event["event"])
            continue
        d, _, _ = device.guard.finish(arrived.prepared)
        seen.append((arrived.item.key, (d.decision, d.label, d.reasons)))
    prefetch.close()
    assert seen == [(f"f{i}", one_by_one[i]) for i in range(3)] + ["camera_recovered"] + [
        (f"f{i}", one_by_one[i]) for i in range(3, 11)], seen  # fmt: skip
    assert prefetch.skipped == 1

    failing = Prefetch(Frames(fail_at=5), lambda: device.guard, device.arrive, lambda item: False)
    got = []
    with pytest.raises(OSError, match="capture card went away"):
        for arrived in failing:
            got.append(arrived.item.key)
    failing.close()
    assert got == ["f0", "f1", "f2", "event-3", "f3", "f4"]

    stopped = Prefetch(Frames(), lambda: device.guard, device.arrive, lambda item: False)
    next(iter(stopped))
    stopped.close()
    assert not any(t.name == "bouncer-prefetch" and t.is_alive() for t in threading.enumerate())
    device.outbox.close()
