"""Helpers shared by the tests: running the CLI as a user would, and a tiny user model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# the real servers the tests start (shared with `bouncer bench station`)
from bouncer.bench.servers import Mosquitto, Postgres, SeaweedFS, free_port, wait_for_port  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BASE = 10  # line.register of the PLC tests


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `bouncer ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bouncer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def tiny_classifier(path: Path, outputs: tuple[str, ...] = ("feat", "scores")) -> Path:
    """Conv -> ReLU -> global pool -> features; Gemm -> 2 class scores. No Bouncer metadata."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, 4)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["feat"]),
        helper.make_node("Gemm", ["feat", "fc"], ["scores"], transB=1),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])], outs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


class Collector:
    """A subscriber with a persistent session (QoS 1): collects every message on `topic` (bouncer/v1/#)."""

    def __init__(self, port: int, client_id: str = "test-collector", topic: str = "bouncer/v1/#") -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def on(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def wait_for(self, suffix: str, n: int, timeout: float = 30.0) -> list[bytes]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.on(suffix)) < n:
            time.sleep(0.05)
        return self.on(suffix)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def station_user(config: Path, name: str, role: str, password: str | None = None) -> str:
    """`bouncer station user add` (password on stdin) then `user token`: the new account's API token."""
    res = subprocess.run([sys.executable, "-m", "bouncer", "station", "user", "add", str(config), name, "--role", role,
                          "--password-stdin"], input=(password or f"{name}-password") + "\n", capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("station", "user", "token", str(config), name)
    assert res.returncode == 0 and res.stdout.startswith("bnc_"), res.stderr[-2000:]
    return res.stdout.strip()


def http_json(url: str, body: object | None = None, token: str | None = None, method: str | None = None):
    """(status, decoded JSON) of a real HTTP request; errors come back as their status, not an exception."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class StationProcess:
    """`bouncer station serve CONFIG` in a subprocess, up once /healthz answers."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None, http: bool = True) -> None:
        """`http`: False for a worker without the web role (ready when it prints its roles)."""
        self.config, self.port, self.env, self.http = config, port, env, http
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> StationProcess:
        import time
        import urllib.request

        self.log = open(self.config.with_suffix(".log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bouncer", "station", str(self.config), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"station exited: {self.config.with_suffix('.log').read_text()[-2000:]}")
            if not self.http:  # a worker without the web role says when it runs
                if "roles " in self.config.with_suffix(".log").read_text():
                    return self
                time.sleep(0.1)
                continue
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("station did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def station_config(
    path: Path, data_dir: Path, broker: str = "", database: str = "", objects: str = "", **http: object
) -> Path:
    lines = ["[station]", f'data_dir = "{data_dir}"'] + ([f'database = "{database}"'] if database else [])
    lines += [f'objects = "{objects}"'] if objects else []
    if broker:
        lines += ["[mqtt]", f'broker = "{broker}"']
    if http:
        lines += ["[http]", *(f"{k} = {json.dumps(v)}" for k, v in http.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def device_toml(path: Path, **sections: dict[str, object]) -> Path:
    """A device's TOML configuration, one table per keyword."""
    text = ""
    for name, values in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path.write_text(text)
    return path


def wait_until(fn, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def publish_all(port: int, items: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in items:
        c.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    c.disconnect()
    c.loop_stop()


def device_messages(sim_gate: Path, model: Path, folder: Path, device: str, group: str = "default") -> list:
    """What a device sends for each frame of FOLDER its gate flags: real decisions, heatmaps and the
    vectors of every candidate input (as devices/loop.py builds them), without running a device."""
    import cv2

    from bouncer.runtime import backends, home, schemas
    from bouncer.runtime.backends.paired import PairedBackend
    from bouncer.runtime.gates import explain
    from bouncer.runtime.gates.bundle import GateBundle
    from bouncer.runtime.gates.guard import Guard
    from bouncer.runtime.gates.heads import frame_vectors
    from bouncer.runtime.images import read_bgr

    bundle = GateBundle.load(sim_gate)
    backend = backends.load(model)
    if bundle.sidecar is not None:  # a gate around a user's model: the cached backbone beside it
        backend = PairedBackend(backend, backends.load(home.cached_model("onnxruntime")))
    guard = Guard(bundle, backend)
    b = guard.bundle
    msgs = []
    for i, path in enumerate(sorted(Path(folder).rglob("*.png"))):
        frame = read_bgr(path)
        d, out, _ = guard.score_frame(frame)
        if d.decision == "accept" or out is None:
            continue
        features = frame_vectors(guard.backend.card, out)
        msgs.append(schemas.FrameMessage.of_decision(
            d, id=f"{device}-{i:05d}", device=device, ts=time.time(), source=str(path), gate_version=b.version,
            backbone_hash=b.backbone_hash, jpeg=cv2.imencode(".jpg", frame)[1].tobytes(), features=features,
            group=group, heatmap=None if (h := explain.heatmap(b, out)) is None else explain.heatmap_png(h),
        ))  # fmt: skip
    return msgs


class Plc:
    """pymodbus's Modbus TCP server with 100 holding registers; every write request is logged with its time.
    `delay_s` makes it answer that late (it blocks its event loop, as a busy PLC would)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        import asyncio
        import threading

        from pymodbus.server import StartAsyncTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        self.port = free_port()
        self.writes: list[tuple[float, int, list[int]]] = []

        def trace(sending: bool, pdu):
            if not sending and getattr(pdu, "function_code", None) == 16:  # write multiple registers
                self.writes.append((time.monotonic(), pdu.address, list(pdu.registers)))
                time.sleep(delay_s)
            return pdu

        device = SimDevice(id=1, simdata=SimData(0, count=100, values=0, datatype=DataType.REGISTERS))
        serve = StartAsyncTcpServer(context=device, address=("127.0.0.1", self.port), trace_pdu=trace)
        threading.Thread(target=lambda: asyncio.run(serve), daemon=True).start()
        wait_for_port(self.port, "the Modbus server", 10.0)

    def set(self, address: int, values: list[int]) -> None:
        """What the PLC's own program writes into its registers (a part id before it triggers the camera)."""
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=5)
        try:
            assert client.connect(), "the Modbus server"
            assert not client.write_registers(address, values, device_id=1).isError()
        finally:
            client.close()

    def verdicts(self) -> list[tuple[float, int, int]]:
        """(time, code, sequence) of every verdict write."""
        return [(t, v[0], v[1]) for t, a, v in self.writes if a == BASE and len(v) == 6]

    def parts(self) -> list[tuple[int, int, int]]:
        """(code, sequence, part id) of every verdict write."""
        return [(v[0], v[1], v[4] << 16 | v[5]) for _, a, v in self.writes if a == BASE and len(v) == 6]

    def holds(self) -> list[float]:
        """When the verdict register alone was set to hold (camera lost or silent, or the guard stopping)."""
        return [t for t, a, v in self.writes if a == BASE and v == [0]]

    def beats(self) -> list[float]:
        return [t for t, a, v in self.writes if a == BASE + 2]
