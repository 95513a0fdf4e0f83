"""The simulated line as camera sources, reached by `bouncer run` through the `bouncer.sources` entry points
(pyproject.toml): `sim:SEED`, an endless stream of known parts, `line:SEED[:FRAMES[:WARMUP]]`, the line
with its incident schedule and ground truth, and `detline:SEED[:FRAMES[:WARMUP]]`, the same schedule in detection
mode (several parts per frame, for a detector gate)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.sources.streams import FrameItem, Source
from bouncer.sim import incidents, simulator


class SimulatorSource(Source):
    """The simulated line as an endless stream (sim:SEED)."""

    live = True

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.uri = f"sim:{seed}"

    def __iter__(self) -> Iterator[FrameItem]:
        rng = np.random.default_rng(self.seed)
        n = 0
        while True:
            part = simulator.KNOWN_CLASSES[int(rng.integers(len(simulator.KNOWN_CLASSES)))]
            yield FrameItem(f"frame-{n:08d}", self.uri, frame=simulator.render(part, rng))
            n += 1


class LineSource(Source):
    """The simulated line with its incident schedule (line:SEED[:FRAMES[:WARMUP]]); frames carry their ground
    truth. WARMUP (default 500) should match the device's drift.warmup."""

    finite = True

    def __init__(self, seed: int, frames: int, warmup: int = 500, detection: bool = False) -> None:
        super().__init__()
        self.seed, self.frames, self.warmup, self.detection = seed, frames, warmup, detection
        self.uri = f"{'detline' if detection else 'line'}:{seed}:{frames}:{warmup}"

    def __iter__(self) -> Iterator[FrameItem]:
        for f in incidents.line(self.seed, self.frames, self.warmup, self.detection):
            if self.stop.is_set():
                return
            key = f"frame-{f.index:08d}"  # the station shows which frame of the schedule it is
            yield FrameItem(key, f"{self.uri}#{key}", frame=f.frame, truth=f.truth)


def open_sim(uri: str, camera: object = None) -> SimulatorSource:
    try:
        return SimulatorSource(int(uri[4:] or 0))
    except ValueError:
        raise BouncerError(f"source {uri!r}: expected sim:SEED with an integer seed") from None


def open_line(uri: str, camera: object = None) -> LineSource:
    scheme, _, rest = uri.partition(":")
    try:
        parts = [int(x) for x in rest.split(":")]
        warmup = parts[2] if len(parts) > 2 else 500
        seed, frames = parts[0], parts[1] if len(parts) > 1 else incidents.frames_needed(warmup)
        if len(parts) > 3 or frames < 1 or warmup < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise BouncerError(f"source {uri!r}: expected {scheme}:SEED[:FRAMES[:WARMUP]] (positive integers)") from None
    return LineSource(seed, frames, warmup, detection=scheme == "detline")
