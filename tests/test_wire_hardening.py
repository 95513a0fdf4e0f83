"""The station against a hostile network (issue 29): no message stops storage or speaks for another device, no
request acts for a user from another page, no bomb costs the memory it claims."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
from helpers import StationProcess, free_port, http_json, publish_all, station_config, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage
from test_station import consumer, frame_message

from bouncer.runtime import schemas
from bouncer.runtime.config import MqttSection
from bouncer.station.consumer import Consumer
from bouncer.station.store import Store, unpack_features


def valid_frame(device: str, i: int) -> dict:
    return json.loads(frame_message(device, i).encode())


def payload(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def poison() -> list[tuple[str, bytes, str]]:
    """(topic, payload, what the quarantine reason names): each once stopped storage or passed unchecked."""
    frames = schemas.topic("cam-1", "frames")
    f = valid_frame("cam-1", 100)
    forged_alert = schemas.alert("cam-1", "drift", key="k", summary="s", since=1.0, frames=0, frame_ids=[],
                                 group="default", gate_version="v1")  # fmt: skip
    deep = b'{"v": 1, "details": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    items = [
        (frames, payload({**f, "source": "\ud800"}), "lone surrogate"),
        (frames, payload({**f, "ts": 1e308}), "$.ts"),
        (frames, payload({**f, "confidence": float("nan")}), "not JSON"),
        (frames, payload({**f, "id": "cam-1-00100\n"}), "$.id"),
        (frames, payload({**f, "features": {"../x": f["features"]["features"]}}), "$.features"),
        (
            frames,
            payload({**f, "features": {"a": {"shape": [-1], "fp16": f["features"]["features"]["fp16"]}}}),
            "shape[0]",
        ),
        (frames, deep, "not JSON"),
        # a device speaks only for itself, on every kind of message
        (schemas.topic("evil-1", "events"), schemas.event("cam-1", "gate_rollback", version="v1"), "on the topic"),
        (schemas.topic("evil-1", "events"), schemas.event("cam-1", "gate_commit", version="FORGED"), "on the topic"),
        (schemas.topic("evil-1", "status"), schemas.status("cam-1", "offline"), "on the topic"),
        (schemas.topic("evil-1", "stats"), schemas.encode({"device": "cam-1", "frames": 3}), "on the topic"),
        (schemas.topic("evil-1", "alerts"), forged_alert, "on the topic"),
    ]
    return items


def test_poison_messages_are_quarantined_and_storage_goes_on(broker, tmp_path):
    c = consumer(broker, tmp_path / "st", "w1")
    try:
        bad = poison()
        # a feature named `file` once killed the writer thread (numpy.savez's own argument): now it is just a name
        odd = {**valid_frame("cam-1", 1)}
        odd["features"] = {"file": odd["features"]["features"], "allow_pickle": odd["features"]["pool_s32"]}
        publish_all(broker.port, [(t, p) for t, p, _ in bad] + [(schemas.topic("cam-1", "frames"), payload(odd))])
        publish_all(broker.port, [(schemas.topic("cam-1", "frames"), frame_message("cam-1", 2).encode()),
                                  (schemas.topic("cam-1", "events"), schemas.event("cam-1", "drift"))])  # fmt: skip
        wait_until(lambda: c.store.counts()["frames"] == 2 and c.counts["quarantined"] >= len(bad), 60)
        assert c.counts["quarantined"] == len(bad), c.store.quarantined()
        reasons = [q["reason"] for q in c.store.quarantined(100)]
        for _, _, needle in bad:
            assert any(needle in r for r in reasons), (needle, reasons)
        row = c.store.rows("SELECT features FROM frames WHERE id = ?", (odd["id"],))
        assert set(unpack_features(row[0][0])) == {"file", "allow_pickle"}
        assert [e["event"] for e in c.store.events("", 10)] == ["drift"]  # no forged gate event, no audit record
        assert not [a for a in c.store.audit_log() if a["actor"] == "device:cam-1"]
        assert not [d for d in c.store.devices() if d["device"] == "cam-1"], "no status or stats for cam-1 taken"
        health = c.health()
        assert health["ok"] and health["writer_alive"], health
    finally:
        c.stop()
    assert not c.health()["ok"], "a stopped consumer is not healthy"


def test_ingest_that_stores_nothing_while_messages_wait_is_unhealthy_until_it_recovers(broker, tmp_path):
    c = consumer(broker, tmp_path / "st", "w1")
    try:
        frames = tmp_path / "st" / "frames"
        frames.mkdir(parents=True, exist_ok=True)
        frames.rmdir()
        frames.write_text("a file where the frames' folder should be: every object write fails (OSError)")
        msg = frame_message("cam-1", 1)
        publish_all(broker.port, [(schemas.topic("cam-1", "frames"), msg.encode())])
        health = wait_until(lambda: (h := c.health(stall_s=1.0))["stalled"] and h, 30)
        assert not health["ok"] and health["waiting"] == 1 and health["writer_alive"], health
        frames.unlink()
        wait_until(lambda: c.store.frame(msg.id) is not None, 30)
        assert c.health(stall_s=1.0)["ok"], "stored again: healthy again"
        assert c.counts["quarantined"] == 0, "an outage quarantines nothing"
    finally:
        c.stop()


def test_a_message_that_fails_three_times_while_others_are_stored_is_quarantined_not_redelivered_forever(tmp_path):
    store = Store(tmp_path / "st")
    c = Consumer(MqttSection(broker="mqtt://127.0.0.1:1"), store, "workers", "w1", groups=["default"])
    try:
        good, bad = frame_message("cam-1", 1), frame_message("cam-1", 2)
        good.id, bad.id = "aa" + good.id, "zz" + bad.id
        (tmp_path / "st" / "frames").mkdir(parents=True, exist_ok=True)
        (tmp_path / "st" / "frames" / "zz").write_text(
            "a file where zz/ should be: this frame's object cannot be written"
        )
        batch = [message(schemas.topic("cam-1", "frames"), m.encode(), i) for i, m in enumerate((good, bad))]
        assert c._store_batch(batch)
        assert store.frame(good.id) is not None and store.frame(bad.id) is None
        assert c.counts["retries"] == 3 and c.counts["quarantined"] == 1, c.counts
        assert "failed 3 times while others were stored" in store.quarantined()[0]["reason"]
    finally:
        store.close()


def test_a_frame_the_database_refuses_is_set_aside_and_the_rest_of_its_batch_is_stored(broker, postgres, tmp_path):
    """PostgreSQL text cannot hold NUL, SQLite can: a store error that is no outage quarantines that frame alone."""
    store = Store(tmp_path / "pg", database=postgres)
    c = Consumer(MqttSection(broker=broker.url), store, "workers", "w1", groups=["default"])
    batch = [message(schemas.topic("cam-1", "frames"), frame_message("cam-1", i).encode(), i) for i in range(3)]
    nul = {**valid_frame("cam-1", 7), "source": "a\u0000b"}
    batch.insert(1, message(schemas.topic("cam-1", "frames"), payload(nul), 9))
    assert c._store_batch(batch)
    assert store.counts()["frames"] == 3 and c.counts["quarantined"] == 1
    assert "internal error" in store.quarantined()[0]["reason"]
    store.close()


def message(topic: str, body: bytes, mid: int = 1) -> MQTTMessage:
    m = MQTTMessage(mid, topic.encode())
    m.payload, m.qos = body, 1
    return m


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["frames", "events", "alerts", "status", "stats", "cmd", "other"]))
    device = draw(st.sampled_from(["cam-1", "cam-2", "x" * 65, "a+b"]))
    topic = f"{schemas.PREFIX}/{device}/{kind}"
    how = draw(st.sampled_from(["bytes", "json", "mutate"]))
    if how == "bytes":
        return topic, draw(st.binary(max_size=200))
    if how == "json":
        return topic, json.dumps(draw(JSON)).encode()
    base = valid_frame("cam-1", draw(st.integers(0, 50)))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*base, "features", "extra"]))
        base[key] = draw(JSON)
    return topic, json.dumps(base).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(hostile(), min_size=1, max_size=6))
def test_arbitrary_payloads_never_stop_a_consumer_and_valid_frames_still_arrive(batch, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    store = Store(root)
    c = Consumer(MqttSection(broker="mqtt://127.0.0.1:1"), store, "workers", "fuzz", groups=["default"])
    try:
        msgs = [message(t, p, i + 1) for i, (t, p) in enumerate(batch)]
        assert c._store_batch(msgs)
        good = frame_message("cam-9", 1)
        assert c._store_batch([message(schemas.topic("cam-9", "frames"), good.encode(), 99)])
        assert store.frame(good.id) is not None
        handled = c.counts["frames"] + c.counts["duplicates"] + c.counts["events"] + c.counts["quarantined"]
        assert handled >= 1
    finally:
        store.close()


def test_a_guessed_frame_id_is_a_conflict_not_a_silent_duplicate(tmp_path):
    store = Store(tmp_path / "st")
    try:
        real = frame_message("cam-1", 5)
        forged = frame_message("cam-1", 6)
        forged.id = real.id
        assert store.add_frames([forged]) == [True]  # published ahead with the camera's next id
        assert store.add_frames([real]) == [False]
        assert store.conflicts == 1
        ev = store.events("frame_conflict")
        assert len(ev) == 1 and ev[0]["frame_id"] == real.id
        assert store.add_frames([forged]) == [False] and store.conflicts == 1, "a redelivery is no conflict"
    finally:
        store.close()


def test_device_ids_are_keyed_with_a_secret_of_the_device(tmp_path):
    from bouncer.devices.ids import KEY_FILE, device_key, message_id

    key = device_key(tmp_path / "dev")
    assert device_key(tmp_path / "dev") == key and len(key) == 32
    assert (tmp_path / "dev" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    other = device_key(tmp_path / "dev2")
    a = message_id(key, "cam-1", "/frames", "0001.png", True)
    assert a == message_id(key, "cam-1", "/frames", "0001.png", True), "a re-run re-sends the same id"
    assert a != message_id(other, "cam-1", "/frames", "0001.png", True), "no one without the key can derive it"
    assert schemas.DEVICE_ID.match(a)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / KEY_FILE).write_bytes(b"short")
    with pytest.raises(Exception, match="not 32"):
        device_key(tmp_path / "bad")


def test_names_and_ids_are_matched_whole():
    for bad in ("cam-1\n", "\ncam-1", "cam 1", ""):
        with pytest.raises(schemas.SchemaError):
            schemas.check_device_id(bad)
    with pytest.raises(schemas.SchemaError, match="new class name"):
        schemas.parse_label("new:bo\nlt", ["gear"], None)


# ---- bombs --------------------------------------------------------------------------------------------


def peak_mb(code: str) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; its peak memory and its output."""
    # VmHWM belongs to the new address space; ru_maxrss carries the parent's peak across fork and exec.
    wrapped = code + (
        "\nimport re; print('PEAK', int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 1024)"
    )
    res = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=300)
    peak = float(res.stdout.rsplit("PEAK", 1)[1]) if "PEAK" in res.stdout else float("inf")
    return peak, res.stdout + res.stderr


def test_an_image_bomb_is_refused_from_its_header(tmp_path):
    import cv2

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(cv2.imencode(".png", np.zeros((20000, 20000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1])
    assert bomb.stat().st_size < 1_000_000
    peak, out = peak_mb(f"""
from bouncer.runtime.images import read_bgr
from bouncer.runtime.errors import ImageError
try:
    read_bgr({str(bomb)!r})
except ImageError as exc:
    print("REFUSED", exc)
""")
    print(f"image bomb: {bomb.stat().st_size} bytes claiming 20000 x 20000, peak {peak:.0f} MB")
    assert "REFUSED" in out and "too large" in out, out
    assert peak < 600, out


def test_a_bundle_bomb_is_refused_before_it_inflates(tmp_path):
    bomb = tmp_path / "bomb.gate"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("gate.json", "{}")
        with z.open("arrays.npz", "w", force_zip64=True) as f:
            chunk = bytes(16 << 20)
            for _ in range(80):  # 1.3 GB of zeros, about 1.3 MB deflated
                f.write(chunk)
    peak, out = peak_mb(f"""
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.errors import BouncerError
try:
    GateBundle.load({str(bomb)!r})
except BouncerError as exc:
    print("REFUSED", exc)
""")
    print(f"bundle bomb: {bomb.stat().st_size} bytes inflating to 1.3 GB, peak {peak:.0f} MB")
    assert "REFUSED" in out and "would inflate" in out, out
    assert peak < 600, out


# ---- the web side ------------------------------------------------------------------------------------


def raw(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None):
    """(status, headers, body) of a real HTTP request."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_web_side_refuses_forged_requests_and_throttles_logins(station_dir, tmp_path):
    cfg = station_config(tmp_path / "web.toml", station_dir)
    station = StationProcess(cfg, free_port()).start()
    url = station.url
    try:
        # open mode (loopback, no accounts): a page elsewhere posts a form to create an admin
        form = json.dumps({"name": "mallory", "role": "admin", "password": "long-enough"}).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, _, body = raw(f"{url}/api/users", form, {"Content-Type": kind})
            assert status == 403 and b"application/json" in body, (kind, status, body)
        status, _, _ = raw(f"{url}/api/users", form, {"Content-Type": "application/json",
                                                        "Origin": "http://127.0.0.1:1"})  # fmt: skip
        assert status == 403
        status, _, body = raw(f"{url}/api/users", b"{not json", {"Content-Type": "application/json"})
        assert status == 400 and b"expected a JSON body" in body, body
        status, _, _ = raw(f"{url}/api/users", b"[1]", {"Content-Type": "application/json"})
        assert status == 400
        status, _, body = raw(f"{url}/api/users", b"{}", {"Content-Type": "application/json",
                                                          "Content-Length": str(64 << 20)})  # fmt: skip
        assert status == 413 and b"at most" in body, "a 64 MB body is refused before it is read"
        assert http_json(f"{url}/api/users", {"name": "ops\n", "role": "admin", "password": "long-enough"})[0] == 422
        assert http_json(f"{url}/api/users", {"name": "ops", "role": "admin", "password": "long-enough"})[0] == 200

        # with accounts: no token in a URL, no open redirect
        status, _, _ = raw(f"{url}/api/queue?token=anything")
        assert status == 401
        for target in ("/\\evil.example", "//evil.example", "https://evil.example", "/\t/evil"):
            status, _, page = raw(f"{url}/login?next={urllib.request.quote(target)}")
            assert status == 200 and b'location.href = "/queue"' in page, target
        status, headers, page = raw(f"{url}/login?next=/gates")
        assert b'location.href = "/gates"' in page
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self' 'nonce-" in headers["content-security-policy"]
        nonce = headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">'.encode() in page
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"

        # 30 wrong passwords: the first ones are checked, the rest refused at once, and the station answers
        codes: list[int] = []
        latency: list[float] = []
        done = threading.Event()

        def flood() -> None:
            for _ in range(30):
                codes.append(http_json(f"{url}/api/login", {"name": "ops", "password": "wrong-wrong"})[0])
            done.set()

        threading.Thread(target=flood).start()
        while not done.is_set():
            t = time.perf_counter()
            assert raw(f"{url}/healthz")[0] == 200
            latency.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
        print(f"login flood: {codes.count(401)} checked, {codes.count(429)} throttled; /healthz median "
              f"{np.median(latency):.1f} ms, max {max(latency):.1f} ms over {len(latency)} calls")  # fmt: skip
        assert codes.count(401) == 5 and codes.count(429) == 25, codes
        status, headers, body = raw(f"{url}/api/login", payload({"name": "ops", "password": "long-enough"}),
                                    {"Content-Type": "application/json"})  # fmt: skip
        assert status == 429 and int(headers["retry-after"]) >= 1, "the right password waits its turn too"
    finally:
        station.stop()
    log = cfg.with_suffix(".log").read_text() if cfg.with_suffix(".log").exists() else ""
    assert "Traceback" not in log, log[-3000:]


def test_healthz_says_when_ingest_is_down(broker, station_dir, tmp_path):
    cfg = station_config(tmp_path / "st.toml", station_dir, broker.url)
    station = StationProcess(cfg, free_port()).start()
    try:
        status, body = http_json(f"{station.url}/healthz")
        assert status == 200 and body["ingest"]["writer_alive"], body
        metrics = raw(f"{station.url}/metrics")[2].decode()
        assert "bouncer_station_ingest_healthy 1.0" in metrics, metrics
    finally:
        station.stop()
