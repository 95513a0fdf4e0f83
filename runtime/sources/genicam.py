"""GenICam cameras (GigE Vision, USB3 Vision) as a frame source: `genicam://aravis/<device id or address>` through
Aravis (any vendor) and `genicam://pylon/<serial>` through Basler's pypylon, both in the extra `[cameras]`
(docs/cameras.md).

The camera is opened, set up from the device config's `[camera]` section and read back when the source is opened,
so an unknown camera, a feature it lacks or a value outside its range is one clear error before the loop starts.
Each frame arrives in the camera's pixel format and is converted to BGR once (OpenCV's C++ demosaicing). Each
frame is one part: its part id is the trigger count since the source opened (software trigger: the triggers
Bouncer sent; hardware trigger or free running: the frames the camera sent, so a part whose frame never came
leaves a gap the PLC sees), beside the camera's own frame id and timestamp. A camera that stops answering is
reported (`camera_lost`), reopened with backoff and reported again (`camera_recovered`); a triggered camera that
sends nothing for `camera.trigger_timeout_s` is reported once per silence (`trigger_timeout`), and the line
output puts the line on hold meanwhile.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from bouncer.runtime.config import CameraSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.sources.streams import FrameItem, Source

STACKS = ("aravis", "pylon")
# GenICam (PFNC) names Bouncer reads, and the older names pylon's emulator still uses for some
ALIASES = {"RGB8Packed": "RGB8", "BGR8Packed": "BGR8"}
MONO_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono14": 14, "Mono16": 16}
BAYER = {"RG": cv2.COLOR_BayerRG2RGB, "GR": cv2.COLOR_BayerGR2RGB, "BG": cv2.COLOR_BayerBG2RGB,
         "GB": cv2.COLOR_BayerGB2RGB}  # fmt: skip  # OpenCV names a pattern from its second row: XY2RGB is BGR out
READABLE = "Mono8/10/12/14/16, Bayer{RG,GR,BG,GB}{8,10,12,16} (unpacked), RGB8, BGR8"


class CameraGone(Exception):
    """The camera stopped answering (cable pulled, power cycle, process gone): reopen it."""


@dataclass(frozen=True)
class Grabbed:
    pixels: np.ndarray  # as the camera sent it: (h, w) uint8/uint16, or (h, w, 3) uint8
    frame_id: int  # the camera's own frame (block) id
    timestamp_ns: int  # the camera's clock; 0 where it has none


class CameraDriver(Protocol):
    """One camera stack's side: what `GenicamSource` asks of Aravis or pylon. Errors of the stack come out as
    `CameraGone` (lost while running) or `BouncerError` (a wrong id or setting: not worth retrying)."""

    def describe(self) -> dict[str, str]: ...
    def pixel_format(self) -> str: ...
    def apply(self, settings: CameraSection) -> dict[str, Any]: ...
    def start(self, trigger: str) -> None: ...
    def software_trigger(self) -> None: ...
    def grab(self, timeout_s: float) -> Grabbed | None: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


def parse_uri(uri: str) -> tuple[str, str]:
    """genicam://STACK/ID -> (stack, id); the id may be empty (the first camera found)."""
    rest = uri.removeprefix("genicam://")
    stack, _, ident = rest.partition("/")
    if not uri.startswith("genicam://") or stack not in STACKS:
        raise BouncerError(f"source {uri!r}: expected genicam://aravis/<device id or address> or "
                           "genicam://pylon/<serial>")  # fmt: skip
    return stack, ident


def check_format(name: str) -> str:
    """The PFNC name Bouncer will convert from, or a clear error for one it cannot read."""
    name = ALIASES.get(name, name)
    if name in MONO_BITS or name in ("RGB8", "BGR8"):
        return name
    if name.startswith("Bayer") and name[5:7] in BAYER and name[7:] in ("8", "10", "12", "16"):
        return name
    raise BouncerError(f"camera.pixel_format: the camera sends {name}, which Bouncer cannot read (it reads "
                       f"{READABLE}): set camera.pixel_format to one of these")  # fmt: skip


def to_bgr(pixels: np.ndarray, pixel_format: str) -> np.ndarray:
    """One conversion from the camera's pixel format to 8-bit BGR."""
    name = ALIASES.get(pixel_format, pixel_format)
    if name == "BGR8":
        return np.ascontiguousarray(pixels.reshape(pixels.shape[0], -1, 3))
    if name == "RGB8":
        return cv2.cvtColor(pixels.reshape(pixels.shape[0], -1, 3), cv2.COLOR_RGB2BGR)
    bits = MONO_BITS.get(name) or int(name[7:])
    plane = pixels if bits == 8 else (pixels.astype(np.uint16) >> (bits - 8)).astype(np.uint8)
    if name.startswith("Mono"):
        return cv2.cvtColor(plane, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(plane, BAYER[name[5:7]])


def open_driver(stack: str, ident: str) -> CameraDriver:
    if stack == "aravis":
        from bouncer.runtime.sources.aravis_camera import AravisCamera

        return AravisCamera(ident)
    from bouncer.runtime.sources.pylon_camera import PylonCamera

    return PylonCamera(ident)


def list_cameras() -> list[dict[str, str]]:
    """Every camera each installed stack can see (`bouncer doctor`); a stack not installed is listed as such."""
    from bouncer.runtime.sources import aravis_camera, pylon_camera

    found = []
    for stack, lister in (("aravis", aravis_camera.list_cameras), ("pylon", pylon_camera.list_cameras)):
        try:
            found += [{"stack": stack, **cam} for cam in lister()]
        except BouncerError as exc:
            found.append({"stack": stack, "error": str(exc)})
    return found


class GenicamSource(Source):
    """One GenICam camera, one frame per part (see the module's docstring)."""

    live = True

    def __init__(self, uri: str, settings: CameraSection) -> None:
        super().__init__()
        self.stack, self.ident = parse_uri(uri)
        self.uri = uri
        self.settings = settings
        self.parts = 0  # parts (triggers) since the source opened
        self.driver: CameraDriver | None = None
        self.readback: dict[str, Any] = {}
        self.camera: dict[str, str] = {}
        self._connect()  # here, so a wrong id or setting fails `bouncer run` before the loop starts

    def _connect(self) -> None:
        driver = open_driver(self.stack, self.ident)
        try:
            self.camera = driver.describe()
            self.readback = driver.apply(self.settings)
            self.format = check_format(driver.pixel_format())
            driver.start(self.settings.trigger)
        except BaseException:
            driver.close()
            raise
        self.driver = driver

    def _reconnect(self) -> bool:
        try:
            self._connect()
            return True
        except (BouncerError, CameraGone):
            return False

    def _drop(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver = None

    def _next(self) -> Grabbed | None:
        """The next part's frame, or None when none came within the trigger timeout."""
        assert self.driver is not None
        if self.settings.trigger == "software":
            self.driver.software_trigger()
        return self.driver.grab(self.settings.trigger_timeout_s)

    def __iter__(self) -> Generator[FrameItem, None, None]:
        backoff, silent = 0.5, False
        yield self._event("camera_opened", camera=self.camera, settings=self.readback)  # what the camera runs with
        try:
            while not self.stop.is_set():
                if self.driver is None:
                    if self.stop.wait(backoff) or self.stop.is_set():
                        return
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
                    if self._reconnect():
                        backoff, silent = 0.5, False
                        yield self._event("camera_recovered", camera=self.camera, settings=self.readback)
                    continue
                try:
                    got = self._next()
                    if got is None and not self.driver.alive():
                        raise CameraGone("no answer to a read")
                except CameraGone as exc:
                    self._drop()
                    yield self._event("camera_lost", reason=str(exc)[:200])
                    continue
                if got is None:
                    if not silent:
                        silent = True
                        yield self._event("trigger_timeout", after_s=self.settings.trigger_timeout_s,
                                          trigger=self.settings.trigger)  # fmt: skip
                    continue
                silent = False
                self.parts += 1
                yield self._item(got)
        finally:
            self._drop()

    def _event(self, kind: str, **fields: Any) -> FrameItem:
        return FrameItem(f"event-{self.parts}", self.uri, event={"event": kind, "uri": self.uri, **fields})

    def _item(self, got: Grabbed) -> FrameItem:
        key = f"part-{self.parts:08d}"
        camera = {"frame_id": got.frame_id, "timestamp_ns": got.timestamp_ns}
        try:
            frame = to_bgr(got.pixels, self.format)
        except (cv2.error, ValueError) as exc:  # a short or odd-sized buffer
            return FrameItem(key, self.uri, error=f"{self.format} frame unreadable: {exc}", part=self.parts,
                             camera=camera)  # fmt: skip
        return FrameItem(key, self.uri, frame=frame, part=self.parts, camera=camera)


def open_genicam(uri: str, settings: CameraSection | None = None) -> GenicamSource:
    """The `genicam` source plug-in (pyproject.toml's `bouncer.sources` entry points)."""
    return GenicamSource(uri, settings or CameraSection())


def check_range(key: str, value: float, lo: float, hi: float) -> None:
    """Cameras differ in what they do with a value out of range (refuse, clamp, or take it): Bouncer refuses."""
    if not lo <= value <= hi:
        raise BouncerError(f"camera.{key}: {value:g} is outside this camera's range {lo:g} to {hi:g}")


def check_trigger(trigger: str, sources: list[str]) -> None:
    if trigger in ("off", "software"):
        if trigger == "software" and "Software" not in sources:
            raise BouncerError("camera.trigger: this camera has no software trigger (its trigger sources: "
                               f"{', '.join(sources) or 'none'})")  # fmt: skip
        return
    if trigger not in sources:
        inputs = ", ".join(s for s in sources if s != "Software") or "none"
        raise BouncerError(f"camera.trigger: {trigger!r} is not one of this camera's trigger inputs ({inputs}); "
                           "or 'off', 'software'")  # fmt: skip
