"""Frame n+1 read and prepared while frame n's backbone runs.

The device loop is one frame at a time, but its steps need not wait for each other: reading a frame (a camera's
driver, a JPEG decode), the read of the PLC's part id, the halving, the quality statistics and the model input
of the next frame run on this thread while the loop thread is inside the backbone call (ONNX Runtime, LiteRT and
the C++ kernels release the GIL). Order is kept: one thread prepares, in source order, into a bounded queue; the
frozen-frame check sees the previous frame as before. A full queue holds the source back (a live source then
drops stale frames itself, as it does when the loop falls behind)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from bouncer.runtime.gates.guard import Guard, Prepared
from bouncer.runtime.sources.streams import FrameItem, Source

DEPTH = 2  # prepared frames waiting; with the one being prepared and the one deciding, DEPTH + 2 input buffers


@dataclass
class Arrival:
    """A frame from the source with what was done to it on arrival."""

    item: FrameItem
    t_in: float  # perf_counter() when it came from the source: the line's deadline counts from here
    prepared: Prepared | None  # None for events and unreadable frames


class Prefetch:
    """Iterating yields the source's items as `Arrival`s, each prepared by the guard `guard()` returns then."""

    def __init__(self, source: Source, guard: Callable[[], Guard], arrive: Callable[[FrameItem], None],
                 skip: Callable[[FrameItem], bool], period_s: float = 0.0) -> None:  # fmt: skip
        self.source, self.guard, self.arrive, self.skip = source, guard, arrive, skip
        self.period_s = period_s  # `source.max_fps`: read no faster, here, so that frames wait in no queue
        self.skipped = 0
        self._q: queue.Queue[Arrival | BaseException | None] = queue.Queue(maxsize=DEPTH)
        self._stop = threading.Event()
        self._buffers: list[np.ndarray] = []
        self._thread = threading.Thread(target=self._run, name="bouncer-prefetch", daemon=True)

    def _buffer(self, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """The n-th frame's model input buffer: a ring of DEPTH + 2, so none is reused while still in use."""
        if not self._buffers or self._buffers[0].shape != shape:
            self._buffers = [np.empty(shape, np.float32) for _ in range(DEPTH + 2)]
        return self._buffers[n % len(self._buffers)]

    def _put(self, what: Arrival | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(what, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        prev: np.ndarray | None = None
        n = 0
        try:
            for item in self.source:
                if self._stop.is_set():
                    return
                t_in = time.perf_counter()
                if item.event is None and self.skip(item):
                    self.skipped += 1
                    continue
                prepared = None
                if item.event is None:
                    self.arrive(item)
                    if item.frame is not None:
                        guard = self.guard()
                        pp = guard.bundle.preprocessing
                        out = self._buffer(n, (1, 3, pp.height, pp.width))
                        prepared = guard.prepare(item.frame, prev if self.source.stream else None, out=out)
                        n += 1
                    prev = prepared.grey if prepared is not None else None
                if not self._put(Arrival(item, t_in, prepared)):
                    return
                if self.period_s and item.event is None:
                    self._stop.wait(max(0.0, self.period_s - (time.perf_counter() - t_in)))
        except BaseException as exc:  # the loop thread raises it: a source failing must end the run, said once
            self._put(exc)
            return
        self._put(None)

    def __iter__(self) -> Iterator[Arrival]:
        self._thread.start()
        while True:
            got = self._q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self) -> None:
        """Stop preparing (the source's own stop ends a read that waits); frames not yet decided are dropped
        unmarked, so a finite source decides them on its next run."""
        self._stop.set()
        self.source.stop.set()
        self._thread.join(timeout=5)
