"""Device identity on the broker (issue 29): the station issues each device and itself a Mosquitto identity and
writes the password file and ACL; a real Mosquitto started with them refuses anonymous clients, keeps each device
to its own topics, lets only the station command devices, and drops a revoked identity after a reload."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from helpers import Mosquitto, StationProcess, device_toml, free_port, http_json, run_cli, wait_until
from test_station import frame_message

from bouncer.runtime import schemas
from bouncer.station.broker_auth import acl_text


def issue(config: Path, name: str, *flags: str) -> str:
    res = run_cli("station", "device", "add", str(config), name, *flags)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.splitlines()[1].strip()


class Client:
    """A paho MQTT v5 client as `name` (None: anonymous); remembers how the broker answered."""

    def __init__(self, port: int, name: str | None, password: str | None = None) -> None:
        self.connected, self.refused = threading.Event(), threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.puback: dict[int, int] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{name}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)  # fmt: skip
        if name is not None:
            self.c.username_pw_set(name, password)
        self.c.on_connect = lambda c, u, f, rc, p: (self.refused if rc.is_failure else self.connected).set()
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.granted.extend(r.value for r in rcs)
        self.c.on_publish = lambda c, u, mid, rc, p: self.puback.__setitem__(mid, rc.value)
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()

    def up(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (self.connected.is_set() or self.refused.is_set()):
            time.sleep(0.05)
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK's reason code (0: accepted, 135: not authorized)."""
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        wait_until(lambda: info.mid in self.puback, 10)
        return self.puback[info.mid]

    def subscribe(self, topic: str) -> int:
        n = len(self.granted)
        self.c.subscribe(topic, qos=1)
        wait_until(lambda: len(self.granted) > n, 10)
        return self.granted[-1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_each_device_speaks_only_for_itself_on_the_broker(station_dir, sim_gate, sim_folder, tmp_path):
    cfg = tmp_path / "station.toml"
    cfg.write_text(f'[station]\ndata_dir = "{station_dir}"\n')
    station_pw = issue(cfg, "station-1", "--station")
    cam1, cam2 = issue(cfg, "cam-1"), issue(cfg, "cam-2")
    listed = run_cli("station", "device", "list", str(cfg)).stdout.split()
    assert listed == ["cam-1", "device", "cam-2", "device", "station-1", "station"], listed
    auth = station_dir / "broker"
    assert (auth / "passwd").stat().st_mode & 0o777 == 0o600
    assert "station-1:$7$101$" in (auth / "passwd").read_text() and cam1 not in (auth / "passwd").read_text()

    broker = Mosquitto(tmp_path / "broker", auth_dir=auth)
    broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    cfg.write_text(f'[station]\ndata_dir = "{station_dir}"\n[mqtt]\nbroker = "{url}"\nusername = "station-1"\n'
                   'password_env = "STATION_MQTT_PASSWORD"\n')  # fmt: skip
    station = StationProcess(cfg, free_port(), env={"STATION_MQTT_PASSWORD": station_pw}).start()
    clients: list[Client] = []
    try:
        anonymous = Client(broker.port, None)
        wrong = Client(broker.port, "cam-1", "not-the-password")
        clients += [anonymous, wrong]
        assert not anonymous.up() and anonymous.refused.is_set(), "an anonymous client is refused"
        assert not wrong.up() and wrong.refused.is_set()

        # a real device with its identity: its frames (all sent, audit rate 1) reach the station
        dev = device_toml(tmp_path / "cam1.toml", device={"id": "cam-1", "data_dir": str(tmp_path / "cam1")},
                          source={"uri": str(sim_folder / "gear")}, gate={"bundle": str(sim_gate)},
                          mqtt={"broker": url, "username": "cam-1"}, outbox={"audit_rate": 1.0})  # fmt: skip
        res = run_cli("run", str(dev), "--once", env={"BOUNCER_MQTT_PASSWORD": cam1})
        assert res.returncode == 0, res.stderr[-3000:]
        sent = len(list((sim_folder / "gear").iterdir()))
        assert '"undelivered": 0' in res.stdout, res.stdout[-2000:]
        wait_until(lambda: http_json(f"{station.url}/api/queue?limit=500")[1]["counts"]["frames"] >= sent, 60)

        c1, c2 = Client(broker.port, "cam-1", cam1), Client(broker.port, "cam-2", cam2)
        st = Client(broker.port, "station-1", station_pw)
        clients += [c1, c2, st]
        assert c1.up() and c2.up() and st.up()
        assert c2.subscribe(schemas.topic("cam-2", "cmd")) == 1
        assert c2.subscribe(schemas.gate_topic("default")) == 1
        c1.subscribe(schemas.topic("cam-2", "#"))  # Mosquitto 2.0 grants it, then delivers nothing it may not read

        forged = frame_message("cam-2", 7)
        assert c1.publish(schemas.topic("cam-2", "frames"), forged.encode()) == 135
        assert c1.publish(schemas.topic("cam-2", "events"), schemas.event("cam-2", "gate_rollback")) == 135
        assert c1.publish(schemas.topic("cam-2", "status"), schemas.status("cam-2", "offline")) == 135
        command = schemas.encode({"id": "c1", "command": "pause"})
        assert c1.publish(schemas.topic("cam-2", "cmd"), command) == 135, "only the station commands devices"
        ann = schemas.GateAnnouncement("default", "FORGED", 99, "b" * 64).encode()
        assert c1.publish(schemas.gate_topic("default"), ann) == 135, "only the station announces gates"
        assert c2.publish(schemas.topic("cam-2", "frames"), frame_message("cam-2", 8).encode()) == 0
        assert st.publish(schemas.topic("cam-2", "cmd"), command) == 0
        wait_until(lambda: any(t.endswith("/cmd") for t, _ in c2.messages), 10)
        assert [t for t, _ in c2.messages if t.endswith("/cmd")] == [schemas.topic("cam-2", "cmd")]
        wait_until(lambda: http_json(f"{station.url}/api/frames/{frame_message('cam-2', 8).id}")[0] == 200, 30)
        assert http_json(f"{station.url}/api/frames/{forged.id}")[0] == 404
        assert not [e for e in http_json(f"{station.url}/api/events?kind=gate_")[1] if e["device"] == "cam-2"]
        assert not c1.messages, "no device reads another's frames or commands"

        # revoked: after the reload the identity cannot connect again
        res = run_cli("station", "device", "remove", str(cfg), "cam-2")
        assert res.returncode == 0, res.stderr[-2000:]
        broker.reload()
        time.sleep(0.5)
        again = Client(broker.port, "cam-2", cam2)
        clients.append(again)
        assert not again.up() and again.refused.is_set(), "a revoked device is refused"
        res = run_cli("station", "device", "add", str(cfg), "cam-1")
        assert res.returncode == 2 and "exists" in res.stderr and "Traceback" not in res.stderr
        res = run_cli("station", "device", "add", str(cfg), "cam 1")
        assert res.returncode == 2 and "device id" in res.stderr
    finally:
        for c in clients:
            c.close()
        station.stop()
        broker.stop()


def test_the_documented_acl_is_the_one_the_station_writes():
    from helpers import REPO

    assert (REPO / "docs" / "mosquitto" / "acl").read_text() == acl_text(["station"]), (
        "docs/mosquitto/acl: write it with bouncer.station.broker_auth.acl_text(['station'])"
    )
