"""The pylon side of a GenICam source (runtime/sources/genicam.py): Basler cameras through Basler's own pypylon,
which ships the pylon runtime and its camera emulator (PYLON_CAMEMU=N: N emulated cameras; extra `[cameras]`)."""

from __future__ import annotations

from typing import Any

from bouncer.runtime.config import CameraSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.sources.genicam import CameraGone, Grabbed, check_range, check_trigger

BUFFERS = 8


def _pylon() -> tuple[Any, Any]:
    try:
        from pypylon import genicam, pylon
    except ImportError:
        raise BouncerError("genicam://pylon needs pypylon: pip install 'bouncer[cameras]'") from None
    return pylon, genicam


def list_cameras() -> list[dict[str, str]]:
    pylon, _ = _pylon()
    return [{"id": d.GetSerialNumber(), "model": d.GetModelName(), "serial": d.GetSerialNumber(),
             "protocol": d.GetDeviceClass()} for d in pylon.TlFactory.GetInstance().EnumerateDevices()]  # fmt: skip


class PylonCamera:
    def __init__(self, ident: str) -> None:
        self.pylon, self.genicam = _pylon()
        self.ident = ident
        factory = self.pylon.TlFactory.GetInstance()
        devices = list(factory.EnumerateDevices())
        chosen = [d for d in devices if d.GetSerialNumber() == ident] if ident else devices[:1]
        if not chosen:
            seen = ", ".join(d.GetSerialNumber() for d in devices) or "none"
            raise BouncerError(f"genicam://pylon/{ident}: no such camera (serials seen: {seen})")
        try:
            self.cam = self.pylon.InstantCamera(factory.CreateDevice(chosen[0]))
            self.cam.Open()
        except self.genicam.GenericException as exc:
            raise BouncerError(f"genicam://pylon/{ident}: cannot open the camera ({exc.GetDescription()})") from None
        self.nodes = self.cam.GetNodeMap()

    def _node(self, key: str, *names: str) -> Any:
        for name in names:
            node = self.nodes.GetNode(name)
            if node is not None and self.genicam.IsWritable(node):
                return node
        raise BouncerError(f"camera.{key}: this camera has no {' or '.join(names)} to set")

    def describe(self) -> dict[str, str]:
        info = self.cam.GetDeviceInfo()
        return {"vendor": info.GetVendorName(), "model": info.GetModelName(), "serial": info.GetSerialNumber(),
                "id": info.GetSerialNumber()}  # fmt: skip

    def pixel_format(self) -> str:
        return str(self.cam.PixelFormat.GetValue())

    def apply(self, s: CameraSection) -> dict[str, Any]:
        try:
            if s.pixel_format:
                formats = list(self.cam.PixelFormat.Symbolics)
                if s.pixel_format not in formats:
                    raise BouncerError(f"camera.pixel_format: {s.pixel_format!r} is not one this camera offers "
                                       f"({', '.join(formats)})")  # fmt: skip
                self.cam.PixelFormat.SetValue(s.pixel_format)
            if s.roi:
                x, y, w, h = s.roi
                sw, sh = self.cam.WidthMax.GetValue(), self.cam.HeightMax.GetValue()
                if x + w > sw or y + h > sh:
                    raise BouncerError(f"camera.roi: {s.roi} does not fit the sensor ({sw} x {sh})")
                self.cam.OffsetX.SetValue(0)
                self.cam.OffsetY.SetValue(0)
                self.cam.Width.SetValue(w)
                self.cam.Height.SetValue(h)
                self.cam.OffsetX.SetValue(x)
                self.cam.OffsetY.SetValue(y)
            for key, value, names in (("exposure_us", s.exposure_us, ("ExposureTime", "ExposureTimeAbs")),
                                      ("gain_db", s.gain_db, ("Gain",)),
                                      ("frame_rate_hz", s.frame_rate_hz,
                                       ("AcquisitionFrameRate", "AcquisitionFrameRateAbs"))):  # fmt: skip
                if value is not None:
                    if key == "frame_rate_hz" and self._read("AcquisitionFrameRateEnable") is not None:
                        self.cam.AcquisitionFrameRateEnable.SetValue(True)  # Basler's clock is off until enabled
                    node = self._node(key, *names)
                    check_range(key, value, node.GetMin(), node.GetMax())
                    node.SetValue(value)
            self.cam.TriggerSelector.SetValue("FrameStart")
            check_trigger(s.trigger, list(self.cam.TriggerSource.Symbolics))
            return {"pixel_format": self.pixel_format(),
                    "roi": [self.cam.OffsetX.GetValue(), self.cam.OffsetY.GetValue(), self.cam.Width.GetValue(),
                            self.cam.Height.GetValue()],
                    "exposure_us": self._read("ExposureTime", "ExposureTimeAbs"), "gain_db": self._read("Gain"),
                    "frame_rate_hz": self._read("AcquisitionFrameRate", "AcquisitionFrameRateAbs"),
                    "trigger": s.trigger}  # fmt: skip
        except self.genicam.GenericException as exc:
            raise BouncerError(f"genicam://pylon/{self.ident}: setting up the camera failed: "
                               f"{exc.GetDescription()}") from None  # fmt: skip

    def _read(self, *names: str) -> float | None:
        for name in names:
            node = self.nodes.GetNode(name)
            if node is not None and self.genicam.IsReadable(node):
                return float(node.GetValue())
        return None

    def start(self, trigger: str) -> None:
        try:
            self.cam.TriggerMode.SetValue("Off" if trigger == "off" else "On")
            if trigger != "off":
                self.cam.TriggerSource.SetValue("Software" if trigger == "software" else trigger)
            self.cam.MaxNumBuffer.SetValue(BUFFERS)
            self.cam.StartGrabbing(self.pylon.GrabStrategy_OneByOne)
        except self.genicam.GenericException as exc:
            raise CameraGone(f"starting acquisition: {exc.GetDescription()}") from None

    def software_trigger(self) -> None:
        try:
            if self.cam.WaitForFrameTriggerReady(5000, self.pylon.TimeoutHandling_Return):
                self.cam.ExecuteSoftwareTrigger()
        except self.genicam.GenericException as exc:
            raise CameraGone(f"software trigger: {exc.GetDescription()}") from None

    def grab(self, timeout_s: float) -> Grabbed | None:
        try:
            while self.cam.IsGrabbing():
                result = self.cam.RetrieveResult(int(timeout_s * 1000), self.pylon.TimeoutHandling_Return)
                if not result.IsValid():
                    return None
                try:
                    if result.GrabSucceeded():
                        return Grabbed(result.GetArray().copy(), int(result.GetBlockID()),
                                       int(result.GetTimeStamp()))  # fmt: skip
                finally:  # a failed grab (incomplete frame) is skipped: the next one
                    result.Release()
        except self.genicam.GenericException as exc:
            raise CameraGone(f"grab: {exc.GetDescription()}") from None
        raise CameraGone("the camera stopped grabbing")

    def alive(self) -> bool:
        return not self.cam.IsCameraDeviceRemoved()

    def close(self) -> None:
        try:
            self.cam.StopGrabbing()
            self.cam.Close()
        except self.genicam.GenericException:
            pass
