"""`bouncer bench camera`: frames per second and latency from software trigger to verdict through Aravis's fake
GigE Vision camera (its own process on loopback), beside the decision alone on the same frames, one run.

The trigger-to-verdict path is what a PLC waits for: trigger sent, frame over GigE Vision (GVSP on loopback),
pixel conversion, the gate's decision. The decision alone is the same frames, already converted, decided again:
the difference is what the camera stack costs. Two rows through the camera: software triggered (the fake camera
answers a trigger on its own 25 Hz trigger clock, whatever its frame rate, so this row shows that clock), and
free running at `frame_rate_hz`, timed from the camera's exposure timestamp to the verdict (transfer over GVSP,
pixel conversion, decision) with the camera's frames the loop missed. The gate is fitted, as a one-class line,
on the camera's own frames (its moving test pattern), so that timed frames take the full path (quality,
backbone, heads) instead of being turned away by the quality check as something the line never showed."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.bench.servers import FakeGigECamera
from bouncer.runtime import backends
from bouncer.runtime.config import CameraSection, load_config
from bouncer.runtime.sources.genicam import GenicamSource
from bouncer.runtime.sources.streams import FrameItem


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.array(ms)
    return {"p50_ms": round(float(np.median(a)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2)}


def _line_gate(backend: backends.Backend, source: GenicamSource, work: Path, n: int = 300) -> Path:
    """A one-class gate fitted on the camera's own frames: one in five to train, the rest to calibrate (at 99%
    the risk control needs at least 230 calibration frames)."""
    from bouncer.fitting.fit import fit_gate

    stream = iter(source)
    try:
        frames = [item.frame for item in itertools.islice(stream, n + 1) if item.frame is not None]
    finally:
        stream.close()  # releases the camera: GigE Vision gives control to one client at a time
    for i, frame in enumerate(frames):
        folder = work / ("train" if i % 5 == 0 else "calib") / "pattern"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)
    gate = fit_gate(backend, work / "train", work / "calib", log=lambda m: None)
    return gate.save(work / "line.gate")


def _timed_run(device: Any, source: GenicamSource, frames: int) -> dict[str, Any]:
    """`frames` parts through the device loop's own `process`: per frame, the time from the trigger (software:
    before the loop asks for the frame) or from the camera's exposure timestamp (free running: the fake camera
    stamps its frames with this machine's wall clock) to the verdict, and the camera's frame ids (gaps: frames the
    loop did not keep up with)."""
    stream = iter(source)
    try:
        first = next(stream)
        assert first.event and first.event["event"] == "camera_opened", first.event
        prev = None
        for _ in range(5):  # warm up: the first frames pay for buffers and the backbone's first runs
            prev = device.process(next(stream), prev, finite=False)
        got: list[FrameItem] = []
        latency: list[float] = []
        events: list[str] = []
        t_start = time.perf_counter()
        while len(got) < frames:
            t0 = time.perf_counter()
            item = next(stream)  # software: sends the trigger, waits for the frame, converts its pixels
            if item.event:  # a timeout or a loss is counted, not timed
                events.append(item.event["event"])
                device.process(item, prev, finite=False)
                continue
            prev = device.process(item, prev, finite=False)
            if source.settings.trigger == "software":
                latency.append((time.perf_counter() - t0) * 1e3)
            else:
                latency.append((time.time_ns() - (item.camera or {})["timestamp_ns"]) / 1e6)
            got.append(item)
        elapsed = time.perf_counter() - t_start
    finally:
        stream.close()  # releases the camera: GigE Vision gives control to one client at a time
    ids = [(i.camera or {})["frame_id"] for i in got]
    parts = [i.part or 0 for i in got]
    return {
        "items": got,
        "settings": first.event["settings"],
        "fps": round(len(got) / elapsed, 1),
        "latency": _percentiles(latency),
        "camera_frames_missed": int(sum(max(0, b - a - 1) for a, b in itertools.pairwise(ids))),
        "parts_in_order": parts == sorted(parts) and len(set(parts)) == len(parts),
        "events": events,
    }


def bench_camera(
    model: Path, work: Path, frames: int = 200, pixel_format: str = "BayerRG8", frame_rate_hz: float = 100.0
) -> dict[str, Any]:
    from bouncer.devices.loop import Device

    backend = backends.load(model, 2)
    free = CameraSection(trigger="off", pixel_format=pixel_format, frame_rate_hz=frame_rate_hz)
    triggered = CameraSection(trigger="software", pixel_format=pixel_format)
    cam = FakeGigECamera(serial="BENCH1").start()
    try:
        gate = _line_gate(backend, GenicamSource(cam.uri, free), work)
        given = {"device.id": "bench-cam", "device.data_dir": str(work / "data"), "source.uri": "sim:0",
                 "gate.bundle": str(gate), "gate.model": str(model)}  # fmt: skip
        device = Device(load_config(None, given))
        device.source_uri = cam.uri
        soft = _timed_run(device, GenicamSource(cam.uri, triggered), frames)
        running = _timed_run(device, GenicamSource(cam.uri, free), frames)
        verdicts = {str(k): v for k, v in device.summary.decisions.items()}
    finally:
        cam.stop()
    alone: list[float] = []
    prev = None
    t_start = time.perf_counter()
    for item in running["items"]:
        t0 = time.perf_counter()
        prev = device.process(item, prev, finite=False)
        alone.append((time.perf_counter() - t0) * 1e3)
    alone_fps = round(len(alone) / (time.perf_counter() - t_start), 1)
    device.close()
    first = running["items"][0].frame
    result: dict[str, Any] = {"frames": frames, "frame_shape": list(first.shape if first is not None else ()),
                              "pixel_format": pixel_format, "verdicts": verdicts}  # fmt: skip
    for name, run in (("software_trigger", soft), ("free_running", running)):
        result[name] = {k: v for k, v in run.items() if k != "items"}
    result["decision_alone"] = {"fps": alone_fps, "latency": _percentiles(alone)}
    return result


def print_camera(res: dict[str, Any]) -> None:
    h, w = res["frame_shape"][:2]
    soft, free, alone = res["software_trigger"], res["free_running"], res["decision_alone"]
    print(f"fake GigE Vision camera on loopback, {res['pixel_format']} {w}x{h}, {res['frames']} parts per row, "
          f"int8 backbone, 2 threads; verdicts {res['verdicts']}")  # fmt: skip
    print(f"  {'':<44} {'fps':>7} {'p50 ms':>8} {'p95 ms':>8} {'missed':>7}")
    rows = (
        ("software trigger -> verdict", soft),
        (f"free running {free['settings'].get('frame_rate_hz')} Hz, exposure -> verdict", free),
        ("decision alone (same frames, in memory)", {**alone, "camera_frames_missed": ""}),
    )
    for name, r in rows:
        lat = r["latency"]
        print(
            f"  {name:<44} {r['fps']:7.1f} {lat['p50_ms']:8.2f} {lat['p95_ms']:8.2f} {r['camera_frames_missed']!s:>7}"
        )
    print(f"  parts in order: {soft['parts_in_order'] and free['parts_in_order']}; the fake camera answers a "
          "software trigger on its own 25 Hz trigger clock")  # fmt: skip
