"""Every verdict as one JSON line in a local file, for the plant's own tools (an MES import, a log shipper, a
spreadsheet): frame, sequence, decision, class, reasons, the gate, and the outbox id of a flagged frame. Written
through a buffered file on the loop's thread (no network, microseconds a frame), rotated to `PATH.1` at `max_mb`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bouncer.devices.outputs import FrameDone, Output
from bouncer.runtime.config import Config
from bouncer.runtime.errors import BouncerError

if TYPE_CHECKING:
    from bouncer.devices.loop import Device


class VerdictLog(Output):
    name = "verdict_log"

    def __init__(self, path: Path, max_mb: float) -> None:
        self.path, self.max_bytes = path, int(max_mb * 1024 * 1024)
        self.written = self.rotations = 0
        self._file: Any = None

    def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1 << 16)
        except OSError as exc:
            raise BouncerError(f"verdicts.path: cannot write {self.path} ({exc})") from None

    def frame(self, done: FrameDone) -> None:
        d = done.decision
        line = json.dumps({"ts": round(time.time(), 3), "sequence": done.sequence, "frame": done.item.key,
                           "decision": d.decision, "label": d.label, "reasons": d.reasons,
                           "gate": done.gate_version, "frame_id": done.frame_id, "part": done.item.part,
                           "camera": done.item.camera})  # fmt: skip
        try:
            self._file.write(line + "\n")
            if self._file.tell() >= self.max_bytes:
                self._rotate()
        except OSError:  # a full disk must not stop the line: the outbox and the PLC still get the verdict
            return
        self.written += 1

    def _rotate(self) -> None:
        self._file.close()
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("a", encoding="utf-8", buffering=1 << 16)
        self.rotations += 1

    def stop(self) -> None:
        if self._file is not None:
            self._file.close()

    def report(self) -> dict[str, Any]:
        return {"path": str(self.path), "written": self.written, "rotations": self.rotations}


def build(cfg: Config, device: Device) -> Iterator[Output]:
    if cfg.verdicts.path:
        yield VerdictLog(Path(cfg.verdicts.path), cfg.verdicts.max_mb)
