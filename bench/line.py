"""`bouncer bench line`: the verdict's latency from frame in to verdict written, to a Modbus TCP PLC (pymodbus's
own server on loopback plays it) and into the OPC UA server's address space, beside the same frames' decision
alone (frame in to decision, no line output) in the same run: what the line stage adds."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.bench.hotpath import camera_frame, small_gate
from bouncer.bench.servers import free_port, wait_for_port
from bouncer.runtime import backends
from bouncer.runtime.config import load_config
from bouncer.runtime.gates.guard import Guard
from bouncer.sim import simulator


def _plc(port: int) -> None:
    """pymodbus's Modbus TCP server, 100 holding registers, on its own thread (the PLC)."""
    from pymodbus.server import StartAsyncTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    device = SimDevice(id=1, simdata=SimData(0, count=100, values=0, datatype=DataType.REGISTERS))
    serve = StartAsyncTcpServer(context=device, address=("127.0.0.1", port))
    threading.Thread(target=lambda: asyncio.run(serve), daemon=True).start()
    wait_for_port(port, "the Modbus server", 10.0)


def _pct(values: list[float]) -> dict[str, float]:
    a = np.array(values) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def bench_line(model: Path, frames: int = 400) -> dict[str, Any]:
    from bouncer.devices.loop import Device

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backend = backends.load(model, 2)
        bundle = small_gate(backend, work / "gate")
        gate = bundle.save(work / "line.gate")
        rng = np.random.default_rng(5)
        src = work / "frames"
        src.mkdir()
        images = []
        for i in range(frames):  # the line's mix: one in ten an unfamiliar part
            images.append(camera_frame("bolt" if i % 10 == 9 else simulator.KNOWN_CLASSES[i % 4], rng))
            cv2.imwrite(str(src / f"{i:04d}.png"), images[-1])
        # the baseline: each frame's decision alone, the same frames, the same backbone and threads
        guard, alone = Guard(bundle, backend), []
        for img in images:
            t0 = time.perf_counter()
            guard.score_frame(img, None)
            alone.append(time.perf_counter() - t0)
        port = free_port()
        _plc(port)
        cfg = load_config(
            None,
            {
                "device.id": "bench-line",
                "device.data_dir": str(work / "data"),
                "device.profile": "x86-ipc",
                "source.uri": str(src),
                "gate.bundle": str(gate),
                "gate.model": str(model),
                "line.modbus": f"modbus://127.0.0.1:{port}",
                "line.opcua": f"opc.tcp://127.0.0.1:{free_port()}/bouncer/",
                "line.deadline_ms": 1000.0,
            },
        )
        summary = Device(cfg).run(once=True, handle_signals=False)
    line = summary.outputs.get("line", {})
    return {
        "frames": summary.frames,
        "decision_alone": _pct(alone),
        "modbus": line.get("line-modbus", {}),
        "opcua": line.get("line-opcua", {}),
    }
