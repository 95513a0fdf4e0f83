"""Frame sources behind one iterator of FrameItem: image folders, OpenCV VideoCapture (camera index,
RTSP/HTTP URL, video file) and the production-line simulator.

A live source that fails (camera unplugged, stream down) reconnects with exponential backoff and
reports each loss and recovery as an item with `event` set, never an exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.runtime.errors import BouncerError, ImageError
from bouncer.runtime.images import read_bgr, to_bgr, walk_images


@dataclass
class FrameItem:
    key: str  # stable name of the frame within its source (a path, or a frame counter)
    source: str  # URI or path, as the station should show it
    frame: np.ndarray | None = None
    error: str | None = None  # unreadable frame: the guard rejects it with reason "unreadable"
    event: dict | None = None  # camera lost / recovered
    truth: str | None = None  # simulated line: the incident this frame belongs to (ground truth)
    part: int | None = None  # a triggered camera: the part this frame shows (trigger count since the source opened)
    camera: dict | None = None  # a GenICam camera: its own frame id and timestamp


class Source:
    """Iterating yields frames; setting `stop` ends a live source promptly (even while it waits to reconnect)."""

    uri: str
    stop: threading.Event
    finite: bool = False  # a finite source is processed once, completely; progress survives restarts
    live: bool = False  # live sources may drop frames under load; frozen-frame checks apply
    stream: bool = True  # consecutive frames come from one scene (frozen-frame checks make sense)

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __iter__(self) -> Iterator[FrameItem]:
        raise NotImplementedError


class FolderSource(Source):
    stream = False  # independent images: two identical files are not a frozen camera

    def __init__(self, folder: Path, loop: bool) -> None:
        super().__init__()
        self.folder, self.loop = folder, loop
        self.uri = str(folder)
        self.finite = not loop
        if not walk_images(folder):
            raise BouncerError(f"{folder}: no image files to read")

    def __iter__(self) -> Iterator[FrameItem]:
        while True:
            for path in walk_images(self.folder):
                key = str(path.relative_to(self.folder))
                try:
                    yield FrameItem(key, str(path), frame=read_bgr(path))
                except ImageError as exc:
                    yield FrameItem(key, str(path), error=str(exc))
            if not self.loop:
                return


class VideoSource(Source):
    """A video file (finite) or a camera / network stream (live, reconnecting).

    With `skip_under_load`, a live source is read by a background thread that keeps only the newest
    frame: when the guard is slower than the camera, stale frames are dropped (and counted in
    `dropped`) instead of piling up in the driver's buffer. Files are never skipped.
    """

    def __init__(self, uri: str, max_backoff_s: float = 30.0, skip_under_load: bool = True) -> None:
        super().__init__()
        self.uri = uri
        self.skip_under_load = skip_under_load
        self.dropped = 0
        self.target: int | str = int(uri) if uri.isdigit() else uri
        self.finite = not (uri.isdigit() or "://" in uri)
        self.live = not self.finite
        self.max_backoff_s = max_backoff_s
        if self.finite and not Path(uri).is_file():
            raise BouncerError(f"{uri}: no such video file")

    def _open(self) -> cv2.VideoCapture | None:
        cap = cv2.VideoCapture(self.target)
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def __iter__(self) -> Iterator[FrameItem]:
        n, backoff, lost = 0, 0.5, False
        cap = self._open()
        if cap is None and self.finite:
            raise BouncerError(f"{self.uri}: cannot open the video (codec or file format not supported)")
        while not self.stop.is_set():
            if cap is None:
                if not lost:
                    lost = True
                    yield FrameItem(f"event-{n}", self.uri, event={"event": "camera_lost", "uri": self.uri})
                if self.stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
                cap = self._open()
                continue
            if lost:
                lost, backoff = False, 0.5
                yield FrameItem(f"event-{n}", self.uri, event={"event": "camera_recovered", "uri": self.uri})
            ok, frame = self._read(cap)
            if not ok or frame is None:
                cap.release()
                cap = None
                if self.finite:
                    return
                continue
            key = f"frame-{n:08d}"
            n += 1
            try:
                yield FrameItem(key, self.uri, frame=to_bgr(frame, key))
            except ImageError as exc:
                yield FrameItem(key, self.uri, error=str(exc))

    def _read(self, cap: cv2.VideoCapture) -> tuple[bool, np.ndarray | None]:
        if self.finite or not self.skip_under_load:
            return cap.read()
        reader = getattr(cap, "_bouncer_reader", None)
        if reader is None:
            reader = _LatestFrame(cap)
            cap._bouncer_reader = reader  # type: ignore[attr-defined]
        ok, frame, skipped = reader.take(self.stop)
        self.dropped += skipped
        return ok, frame


class _LatestFrame:
    """Reads a live capture continuously and keeps only the newest frame."""

    def __init__(self, cap: cv2.VideoCapture) -> None:
        self.cap = cap
        self.cond = threading.Condition()
        self.frame: np.ndarray | None = None
        self.ok = True
        self.fresh = 0
        threading.Thread(target=self._run, daemon=True, name="bouncer-capture").start()

    def _run(self) -> None:
        while True:
            ok, frame = self.cap.read()
            with self.cond:
                self.ok, self.frame = ok, frame
                self.fresh += 1
                self.cond.notify()
            if not ok:
                return

    def take(self, stop: threading.Event) -> tuple[bool, np.ndarray | None, int]:
        with self.cond:
            while self.fresh == 0:
                if stop.is_set():
                    return False, None, 0
                self.cond.wait(0.2)
            skipped, self.fresh = self.fresh - 1, 0
            return self.ok, self.frame, skipped


PLUGIN_GROUP = "bouncer.sources"


def _plugin(scheme: str) -> Callable[..., Source] | None:
    """A source plug-in for URIs `SCHEME:...`, from the entry points of the installed distributions (the
    simulator registers `sim` and `line`, the GenICam cameras `genicam`): the camera core names no plug-in. A
    plug-in is called with the URI and the config's `[camera]` section (or None)."""
    found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == scheme]
    return found[0].load() if found else None


def open_source(uri: str, loop: bool = False, skip_under_load: bool = True, camera: Any = None) -> Source:
    """CAMERA: the config's `[camera]` section, for plug-ins that drive a camera (`genicam:`)."""
    scheme, sep, _ = uri.partition(":")
    if sep and scheme.isidentifier() and len(scheme) > 1:
        opener = _plugin(scheme)
        if opener is not None:
            return opener(uri, camera)
    path = Path(uri)
    if path.is_dir():
        return FolderSource(path, loop)
    if uri.isdigit() or "://" in uri or path.is_file():
        return VideoSource(uri, skip_under_load=skip_under_load)
    schemes = ", ".join(sorted(f"{ep.name}:..." for ep in entry_points(group=PLUGIN_GROUP))) or "none installed"
    raise BouncerError(f"source {uri!r}: not a folder, video file, camera index, URL or plug-in source ({schemes})")
