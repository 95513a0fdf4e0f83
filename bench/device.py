"""`bouncer bench device`: guarded vs bare frames per second (640x480, int8 backbone, 2 threads), the
outbox's backlog drain rate to a local Mosquitto after an outage, and peak resident memory."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.bench.hotpath import camera_frame, small_gate
from bouncer.devices.prefetch import Prefetch
from bouncer.runtime import backends, schemas
from bouncer.runtime.config import load_config
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.outbox import Outbox
from bouncer.runtime.preprocess import preprocess
from bouncer.runtime.sources.streams import FrameItem, Source
from bouncer.sim import simulator


def _seconds(fn, frames: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    fn(frames)
    return time.perf_counter() - t0


class FramesSource(Source):
    """Frames in memory, as a live camera would hand them over (one scene: the frozen check applies)."""

    uri = "sim:0"

    def __init__(self, frames: list[np.ndarray], first: int) -> None:
        super().__init__()
        self.frames, self.first = frames, first

    def __iter__(self) -> Iterator[FrameItem]:
        for i, f in enumerate(self.frames):
            yield FrameItem(f"f{self.first + i}", self.uri, frame=f)


def bench_loop(model: Path, work: Path, n_frames: int = 60, rounds: int = 15, block: int = 20) -> dict[str, float]:
    from bouncer.devices.loop import Device

    backend = backends.load(model, 2)
    bundle = small_gate(backend, work / "gate")
    gate_path = bundle.save(work / "line.gate")
    cfg = load_config(
        None,
        {
            "device.id": "bench",
            "device.data_dir": str(work / "data"),
            "source.uri": "sim:0",
            "gate.bundle": str(gate_path),
            "gate.model": str(model),
            "device.profile": "x86-ipc",
        },
    )
    device = Device(cfg)
    device.source = type("S", (), {"stream": True, "uri": "sim:0"})()
    device.source_uri = "sim:0"
    rng = np.random.default_rng(11)
    # a line's mix: mostly known parts, one in ten an unfamiliar part that is flagged and queued
    frames = [camera_frame("bolt" if i % 10 == 9 else simulator.KNOWN_CLASSES[i % 4], rng) for i in range(n_frames)]
    pp = device.guard.bundle.preprocessing
    buf = np.empty((1, 3, pp.height, pp.width), np.float32)
    state: dict[str, Any] = {"n": 0}

    def bare(part: list[np.ndarray]) -> None:
        for frame in part:
            device.guard.backend.run(preprocess(frame, pp, out=buf))

    def guarded(part: list[np.ndarray]) -> None:
        """The device loop's own path: the prefetch thread reads and prepares, the loop decides and hands over."""
        prefetch = Prefetch(FramesSource(part, state["n"]), lambda: device.guard, device.arrive, lambda _: False)
        for arrived in prefetch:
            device.process(arrived.item, None, False, arrived)
        prefetch.close()
        state["n"] += len(part)

    def sequential(part: list[np.ndarray]) -> None:
        """The same loop one step after another (the loop before the prefetch thread): the baseline."""
        prev = None
        for frame in part:
            state["n"] += 1
            prev = device.process(FrameItem(f"f{state['n']}", "sim:0", frame=frame), prev, finite=False)

    for fn in (bare, guarded, sequential):  # warm up
        fn(frames[:5])
    # Interleaved in blocks of `block` frames (two unfamiliar parts each), bare and guarded on the same
    # frames, which goes first alternating, many times over: this machine's speed drifts by 30% within
    # seconds, and a pair of adjacent blocks sees the same drift. The ratio is the median of the pairs'.
    times: dict[Any, list[float]] = {bare: [], guarded: [], sequential: []}
    order = (bare, guarded, sequential)
    for r in range(rounds):
        for i in range(0, n_frames, block):
            part = frames[i : i + block]
            k = (r * 3 + i // block) % 3
            for fn in order[k:] + order[:k]:  # each goes first in turn
                times[fn].append(_seconds(fn, part) / len(part))
    bare_s, guarded_s, seq_s = (np.array(times[f]) for f in order)
    b, g = 1 / float(np.median(bare_s)), 1 / float(np.median(guarded_s))
    ratio = float(np.median(bare_s / guarded_s))
    device.close()  # the outbox's writer done
    flagged = device.outbox.depth()
    return {
        "bare_fps": round(b, 1),
        "guarded_fps": round(g, 1),
        "guarded_over_bare": round(ratio, 3),
        "sequential_fps": round(1 / float(np.median(seq_s)), 1),
        "sequential_over_bare": round(float(np.median(bare_s / seq_s)), 3),
        "pairs": len(bare_s),
        "flagged_queued": flagged,
    }


def bench_drain(work: Path, messages: int = 2000, size: int = 50_000) -> dict[str, float]:
    """A backlog built while the broker was down, then drained to a local Mosquitto."""
    from bouncer.devices.link import MqttLink

    if not shutil.which("mosquitto"):
        raise BouncerError("the drain benchmark needs mosquitto (apt-get install mosquitto)")
    box = Outbox(work / "drain.sqlite", max_bytes=10**10)
    blob = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    for i in range(messages):
        box.put(f"m{i}", schemas.topic("bench", "frames"), blob, "review")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 0\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        cfg = load_config(
            None,
            {
                "device.id": "bench",
                "source.uri": "sim:0",
                "gate.bundle": "x",
                "mqtt.broker": f"mqtt://127.0.0.1:{port}",
            },
        )
        link = MqttLink(cfg.mqtt, "bench", box)
        t0 = time.perf_counter()
        link.start()
        while box.depth() and time.perf_counter() - t0 < 120:
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        left = box.depth()
        link.stop()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        box.close()
    return {
        "outbox_drain_msgs_per_s": round((messages - left) / elapsed, 1),
        "outbox_drain_mb_per_s": round((messages - left) * size / elapsed / 1e6, 1),
        "drain_messages": messages,
        "drain_left": left,
    }


def device_peak_rss(model: Path, gate: Path, work: Path, frames: int = 200) -> float:
    """Peak resident memory of a real `bouncer run` process over 640x480 frames (MB)."""
    import sys

    import cv2

    src = work / "rss_frames"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(frames):
        cv2.imwrite(str(src / f"{i:04d}.jpg"), camera_frame(simulator.KNOWN_CLASSES[i % 4] if i % 10 else "bolt", rng))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bouncer",
            "run",
            "--source",
            str(src),
            "--gate",
            str(gate),
            "--model",
            str(model),
            "--device-id",
            "rss",
            "--data-dir",
            str(work / "rss_data"),
            "--once",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def bench_device(model: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result: dict[str, Any] = bench_loop(model, work)
        result |= bench_drain(work)
        result["peak_rss_mb"] = round(device_peak_rss(model, work / "line.gate", work), 1)
    return result
