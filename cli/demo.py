"""`bouncer demo`: the whole system on one machine. Builds the models (cached), fits a gate on the simulated
line, starts an embedded MQTT broker (amqtt, in-process) unless --broker names one, starts the review
station (web UI on localhost), runs simulated cameras through the incident schedule with a live display,
and prints what was caught, how fast, and what slipped through."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bouncer.bench.servers import free_port
from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.decision import VERDICTS, Verdict


def listen_socket(port: int) -> socket.socket:
    """The review UI's socket, bound before any work: a taken --port is an error up front, never a page that
    the demo announces and does not serve."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise BouncerError(f"--port {port}: cannot serve the review UI on 127.0.0.1:{port} ({exc.strerror}); "
                           "choose another port or leave --port out") from None  # fmt: skip
    return sock


class EmbeddedBroker:
    """amqtt's broker in a thread of this process (MQTT 3.1.1, no shared subscriptions)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)

    def _run(self) -> None:
        from amqtt.broker import Broker

        asyncio.set_event_loop(self._loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 64}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True},
            "topic-check": {"enabled": False},
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to the caller of start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> EmbeddedBroker:
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.CRITICAL)
        self._thread.start()
        if not self._ready.wait(20) or self._error:
            raise BouncerError(f"the embedded MQTT broker did not start: {self._error}")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Tally(Output):
    """Ground truth against decisions for one simulated camera: an output the demo adds to each device."""

    device: str
    total: int
    plan: list
    frames: int = 0
    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    caught: dict[str, int] = field(default_factory=dict)  # incident -> frames from its start to the first catch
    silent: dict[str, int] = field(default_factory=dict)  # incident frames accepted
    false_flags: int = 0  # normal frames sent to review / reject
    false_drift: list[str] = field(default_factory=list)  # brightness / sharpness alarms before the bulb
    gate_events: list[str] = field(default_factory=list)

    def frame(self, done: FrameDone) -> None:
        item, decision = done.item, done.decision
        i = self.frames
        self.frames += 1
        self.decisions[decision.decision] += 1
        truth = item.truth
        flagged = decision.decision != Verdict.ACCEPT
        if truth in (None, "light_bulb"):
            self.false_flags += flagged
            return
        inc = next(p for p in self.plan if p.kind == truth)
        if flagged:
            self.caught.setdefault(truth, i - inc.start)
        else:
            self.silent[truth] = self.silent.get(truth, 0) + 1

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        bulb = next(p for p in self.plan if p.kind == "light_bulb")
        if kind == "drift" and fields.get("signal") in ("brightness", "sharpness"):
            if self.frames < bulb.start:
                self.false_drift.append(f"{fields['signal']} {fields.get('direction')} at frame {self.frames}")
            elif fields["signal"] == "brightness" and fields.get("direction") == "up":
                self.caught.setdefault("light_bulb", self.frames - bulb.start)
        if kind.startswith("gate_"):
            self.gate_events.append(kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "frames": self.frames, "decisions": self.decisions, "caught": self.caught,
            "missed": [p.kind for p in self.plan if p.kind not in self.caught], "silent_failures": self.silent,
            "false_flags": self.false_flags, "false_drift": self.false_drift,
        }  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from rich.console import Console
        from rich.live import Live
    except ImportError as exc:
        raise BouncerError(
            f"the demo needs the [station,demo] extras: pip install 'bouncer[station,demo]' ({exc})"
        ) from None

    from bouncer.cli.main import default_model
    from bouncer.devices.loop import Device, RunSummary
    from bouncer.fitting.fit import fit_gate
    from bouncer.runtime import backends, home
    from bouncer.runtime.config import Config, DeviceSection, DriftSection, GateSection, MqttSection, SourceSection
    from bouncer.sim import incidents, simulator
    from bouncer.station.config import HttpSection, StationConfig, StationSection
    from bouncer.station.service import Station
    from bouncer.station.web import create_app

    if not 1 <= args.devices <= 3:
        raise BouncerError(f"--devices: 1 to 3 simulated cameras, got {args.devices}")
    console = Console(stderr=True)
    frames = args.frames or incidents.frames_needed(args.warmup)
    if frames < incidents.frames_needed(args.warmup):
        raise BouncerError(
            f"--frames {frames}: the incident schedule needs at least {incidents.frames_needed(args.warmup)} "
            f"frames with --warmup {args.warmup}"
        )
    logging.basicConfig(level=logging.WARNING)
    web_socket = listen_socket(args.port or 0)
    port = web_socket.getsockname()[1]

    # 1. models and the gate (both cached under BOUNCER_HOME)
    console.print("[bold]1/4[/] backbone (int8 EfficientNet-Lite0, cached after the first build)")
    model = default_model()
    demo = home.home() / "demo"
    gate = demo / "line.gate"
    backend = backends.load(model, threads=2)
    if not gate.is_file() or _stale(gate, backend):
        console.print("[bold]2/4[/] fitting a gate on the simulated line (washer, gear, bracket, plate)")
        simulator.write_dataset(demo / "train", per_class=40, seed=1)
        simulator.write_dataset(demo / "calib", per_class=80, seed=2)
        fit_gate(backend, demo / "train", demo / "calib", log=lambda m: None).save(gate)
    else:
        console.print(f"[bold]2/4[/] gate {gate} (cached)")
    detector = _detector_gate(Path(args.detector), model, demo, console) if args.detector else None

    # 2. broker and station
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="bouncer-demo-"))
    broker = None
    if args.broker:
        url, protocol, share = args.broker, "v5", "bouncer-station"
    else:
        broker = EmbeddedBroker(free_port()).start()
        url, protocol, share = broker.url, "v311", ""  # amqtt: MQTT 3.1.1, no shared subscriptions
    groups = ["default", *(["detector"] if detector else [])]
    scfg = StationConfig(
        station=StationSection(data_dir=str(work / "station"), groups=groups, share_group=share, worker="demo"),
        mqtt=MqttSection(broker=url, protocol=protocol),
        http=HttpSection(host="127.0.0.1", port=port),
    ).validate()
    station = Station(scfg)
    console.print(f"[bold]3/4[/] station in {work / 'station'} (broker {url})")
    station.init(gate, backend, demo / "train", demo / "calib")
    if detector:
        station.init(detector.gate, detector.backend, detector.train, detector.calib, group="detector")
    password = secrets.token_urlsafe(9)  # the review UI asks who labels: a demo account, admin
    station.accounts.add("demo", "admin", password)
    station.start_mqtt()
    server = uvicorn.Server(uvicorn.Config(create_app(station, None), host="127.0.0.1", port=port, log_level="error"))
    web = threading.Thread(target=server.run, kwargs={"sockets": [web_socket]}, name="station-web", daemon=True)
    web.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not web.is_alive() or time.monotonic() > deadline:
            raise BouncerError(f"the review UI did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    console.print(f"    review UI: [link]http://127.0.0.1:{port}/queue[/link] (log in as demo, password {password})")

    # 3. the simulated cameras, all at once
    plan = incidents.schedule(args.warmup, frames)
    tallies, devices, threads = [], [], []
    results: dict[str, RunSummary | Exception] = {}
    for k in range(args.devices):
        dev_id = f"demo-cam-{k + 1}"
        cfg = Config(
            device=DeviceSection(id=dev_id, profile="generic", data_dir=str(work / dev_id)),
            source=SourceSection(uri=f"line:{100 + k}:{frames}:{args.warmup}"),
            gate=GateSection(bundle=str(gate), model=str(model)),
            mqtt=MqttSection(broker=url, protocol=protocol),
            drift=DriftSection(warmup=args.warmup),
        ).validate()
        tally = Tally(dev_id, frames, plan)
        device = Device(cfg, extra=[tally])
        tallies.append(tally)
        devices.append(device)
    if detector:  # one more camera: the detection line's incidents, through the detector's gate
        cfg = Config(
            device=DeviceSection(id="demo-cam-det", profile="generic", data_dir=str(work / "demo-cam-det"),
                                 group="detector"),
            source=SourceSection(uri=f"detline:200:{frames}:{args.warmup}"),
            gate=GateSection(bundle=str(detector.gate), model=str(detector.model), sidecar=str(model)),
            mqtt=MqttSection(broker=url, protocol=protocol),
            drift=DriftSection(warmup=args.warmup),
        ).validate()  # fmt: skip
        tally = Tally("demo-cam-det", frames, plan)
        tallies.append(tally)
        devices.append(Device(cfg, extra=[tally]))

    def run_device(d: Device, key: str) -> None:
        try:
            results[key] = d.run(once=True, drain_timeout=30.0, handle_signals=False)
        except Exception as exc:  # shown in the summary, never a silent thread death
            results[key] = exc

    console.print(f"[bold]4/4[/] {len(devices)} simulated camera(s), {frames} frames each, incidents after frame "
                  f"{plan[0].start}")  # fmt: skip
    for d, t in zip(devices, tallies, strict=True):
        th = threading.Thread(target=run_device, args=(d, t.device), daemon=True)
        th.start()
        threads.append(th)
    t0 = time.monotonic()
    try:
        with Live(_progress(tallies, station), console=console, refresh_per_second=4, transient=False) as live:
            while any(th.is_alive() for th in threads):
                time.sleep(0.25)
                live.update(_progress(tallies, station))
    except KeyboardInterrupt:
        for d in devices:
            d.stop()
        for th in threads:
            th.join(10)
    console.print()
    elapsed = time.monotonic() - t0
    flagged = sum(t.decisions["review"] + t.decisions["reject"] for t in tallies)
    deadline = time.monotonic() + 20
    while station.store.counts()["frames"] < flagged and time.monotonic() < deadline:
        time.sleep(0.2)

    summary = _summary_table(tallies, plan)
    console.print(summary)
    counts = station.store.counts()
    errors = {k: str(v) for k, v in results.items() if isinstance(v, Exception)}
    console.print(
        f"station: {counts['frames']} flagged frames stored of {flagged} sent, {counts['events']} events; "
        f"{sum(t.frames for t in tallies) / max(elapsed, 1e-9):.0f} frames/s over all cameras"
    )
    for cam, why in errors.items():
        console.print(f"[red]{cam} failed: {why}[/]")
    out = {
        "devices": [t.to_dict() for t in tallies],
        "incidents": [{"kind": p.kind, "start": p.start, "frames": p.length, "caught_by": p.catch} for p in plan],
        "station": {
            "frames_stored": counts["frames"],
            "flagged_sent": flagged,
            "events": counts["events"],
            "url": f"http://127.0.0.1:{port}/",
            "user": "demo",
        },
        "errors": errors,
        "seconds": round(elapsed, 1),
    }
    try:
        if args.duration is None:
            console.print(f"review UI up at http://127.0.0.1:{port}/queue (demo / {password}) - Ctrl-C to stop")
            while True:
                time.sleep(1)
        elif args.duration > 0:
            console.print(f"review UI up at http://127.0.0.1:{port}/queue (demo / {password}) for {args.duration:g} s")
            time.sleep(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(5)
        station.stop()
        if broker:
            broker.stop()
    print(json.dumps(out))
    return 1 if errors else 0


@dataclass
class DetectorDemo:
    model: Path
    gate: Path
    train: Path
    calib: Path
    backend: Any


def _detector_gate(model: Path, backbone: Path, demo: Path, console) -> DetectorDemo:
    """The detector camera's gate: the user's detector (`bouncer models example detector` makes one) with the
    backbone beside it, fitted on the simulated line's detection folders (cached beside the demo's gate)."""
    from bouncer.fitting.fit import fit_gate
    from bouncer.runtime.gates.loading import open_backend
    from bouncer.sim.detection import write_detection_dataset

    if not model.is_file():
        raise BouncerError(f"--detector {model}: no such model (`bouncer models example detector --train DIR --out "
                           "M.onnx` trains one on the simulated line)")  # fmt: skip
    backend = open_backend(model, backbone, paired=True, threads=2)
    if backend.card.task != "detector":
        raise BouncerError(f"--detector {model}: its card says task = {backend.card.task!r}, not 'detector'")
    root = demo / "detector"
    train, calib = root / "train", root / "calib"
    for folder, frames, seed in ((train, 240, 1), (calib, 400, 3)):
        if not (folder / "boxes.jsonl").is_file():
            write_detection_dataset(folder, frames, seed)
    gate = root / f"{backend.card.model_hash[:12]}.gate"
    if not gate.is_file() or _stale(gate, backend):
        console.print("[bold]2/4[/] fitting the detector camera's gate on the simulated detection line")
        fit_gate(backend, train, calib, target_accuracy=0.9, log=lambda m: None).save(gate)
    else:
        console.print(f"[bold]2/4[/] detector gate {gate} (cached)")
    return DetectorDemo(model, gate, train, calib, backend)


def _stale(gate: Path, backend) -> bool:
    from bouncer.runtime.gates.bundle import BundleError, GateBundle

    try:
        b = GateBundle.load(gate)
    except BundleError:
        return True
    # a gate from an older Bouncer lacks what the drift monitor scales by: fit it again
    return b.backbone_hash != backend.card.model_hash or not b.fit.drift_reference


def _progress(tallies: list[Tally], station):
    from rich.table import Table

    t = Table(title="simulated line", expand=False)
    for col in ("camera", "frames", "accept", "review", "reject", "incidents caught"):
        t.add_column(col, justify="right" if col != "camera" else "left")
    for x in tallies:
        t.add_row(x.device, f"{x.frames}/{x.total}", str(x.decisions["accept"]), str(x.decisions["review"]),
                  str(x.decisions["reject"]), f"{len(x.caught)}/{len(x.plan)}")  # fmt: skip
    t.caption = f"station: {station.store.counts()['frames']} flagged frames stored"
    return t


def _summary_table(tallies: list[Tally], plan: list):
    from rich.table import Table

    t = Table(title="incidents: caught after how many frames (silent failures = incident frames accepted)")
    t.add_column("incident")
    t.add_column("caught by")
    for x in tallies:
        t.add_column(x.device, justify="right")
    for p in plan:
        cells = []
        for x in tallies:
            cell = f"after {x.caught[p.kind]} frames" if p.kind in x.caught else "[red]missed[/]"
            if x.silent.get(p.kind):
                cell += f", {x.silent[p.kind]} silent"
            cells.append(cell)
        t.add_row(p.kind, p.catch, *cells)
    t.add_row("", "", *["" for _ in tallies])
    for label, fn in (
        ("frames", lambda x: str(x.frames)),
        ("accepted", lambda x: str(x.decisions["accept"])),
        ("review", lambda x: str(x.decisions["review"])),
        ("reject", lambda x: str(x.decisions["reject"])),
        ("silent failures", lambda x: str(sum(x.silent.values()))),
        ("normal frames flagged", lambda x: str(x.false_flags)),
        ("false drift alarms", lambda x: str(len(x.false_drift))),
    ):
        t.add_row(label, "", *[fn(x) for x in tallies])
    return t


def add_demo(sub, add) -> None:
    d = add("demo", cmd_demo, "the whole system on one machine: broker, station, simulated cameras, incidents")
    d.add_argument("--devices", type=int, default=2, help="simulated cameras (1-3)")
    d.add_argument("--frames", type=int, help="frames per camera (default: what the incident schedule needs)")
    d.add_argument("--warmup", type=int, default=500, help="drift-monitor warm-up frames before the incidents")
    d.add_argument("--broker", help="use this MQTT broker (mqtt://HOST:PORT) instead of the embedded one")
    d.add_argument("--port", type=int, help="review UI port (default: a free one)")
    d.add_argument("--duration", type=float, help="keep the UI up this long after the run, s (default: until Ctrl-C)")
    d.add_argument("--data-dir", type=Path, help="station and device data (default: a new temporary folder)")
    d.add_argument("--detector", type=Path, help="one more camera on a detection line, guarding this YOLO detector "
                   "(ONNX with its card; `bouncer models example detector` trains one on the simulator)")  # fmt: skip
