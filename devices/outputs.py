"""What the frame loop tells, behind one protocol: each decided frame goes to every output in turn.

The loop (devices/loop.py) reads a frame, has the guard decide it and hands the result to its outputs; it knows
none of them by name. An output is started before the first frame, sees every frame and every event, is flushed
and stopped after the last, and may add a section to the run's summary. Adding one is a module with the output and its
builder, and one line in devices/assembly.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bouncer.runtime.gates.decision import Decision
from bouncer.runtime.sources.streams import FrameItem


@dataclass
class FrameDone:
    """One decided frame as every output sees it. An output earlier in the list may add to it: the outbox sets
    `frame_id` once a flagged frame is queued for disk (its message id), for the alerts after it."""

    item: FrameItem
    decision: Decision
    outputs: dict[str, np.ndarray] | None  # the backbone's outputs (None when the frame never reached it)
    sequence: int  # frames decided this run, this one included
    t_in: float  # perf_counter() when the frame reached the guard
    spent_s: float  # the guard's time on it
    gate_version: str  # the gate that decided it
    source_uri: str  # the source the frame came from
    finite: bool  # the source is a folder or a file (frame ids are then stable across restarts)
    frame_id: str | None = None


class Output:
    """The protocol, with nothing to do as each method's default: an output overrides what it needs.

    `frame` runs on the frame loop's thread and must not wait on a network; `event` runs on the thread that
    emitted the event (the frame loop, the MQTT client, the updater)."""

    name = "output"
    section: str | None = None  # where `report` goes in the run summary: under this key, or at the top by name

    def start(self) -> None:
        return None

    def frame(self, done: FrameDone) -> None:
        return None

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        return None

    def flush(self) -> None:
        """Wait until what `frame` handed to the output's own thread is done (the outbox: written to disk)."""
        return None

    def stop(self) -> None:
        return None

    def report(self) -> dict[str, Any] | None:
        return None
