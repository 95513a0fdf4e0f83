"""The Aravis side of a GenICam source (runtime/sources/genicam.py): any GigE Vision or USB3 Vision camera,
through Aravis's GObject introspection bindings (Debian `gir1.2-aravis-0.8`, PyPI `pygobject`: extra `[cameras]`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bouncer.runtime.config import CameraSection
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.sources.genicam import CameraGone, Grabbed, check_range, check_trigger

BUFFERS = 8


def _aravis() -> Any:
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError):
        raise BouncerError("genicam://aravis needs Aravis 0.8 and PyGObject: apt-get install gir1.2-aravis-0.8 "
                           "and pip install 'bouncer[cameras]'") from None  # fmt: skip
    return Aravis


def list_cameras() -> list[dict[str, str]]:
    arv = _aravis()
    arv.update_device_list()
    return [{"id": arv.get_device_id(i), "address": arv.get_device_address(i) or "",
             "model": arv.get_device_model(i) or "", "serial": arv.get_device_serial_nbr(i) or "",
             "protocol": arv.get_device_protocol(i) or ""} for i in range(arv.get_n_devices())]  # fmt: skip


class AravisCamera:
    def __init__(self, ident: str) -> None:
        self.arv = _aravis()
        self.ident = ident
        self.stream: Any = None
        try:
            self.cam = self.arv.Camera.new(ident or None)
        except Exception as exc:  # GLib.Error: "Device 'x' not found"
            seen = ", ".join(c["id"] for c in list_cameras()) or "none"
            raise BouncerError(f"genicam://aravis/{ident}: no such camera ({_message(exc)}; cameras seen: "
                               f"{seen})") from None  # fmt: skip

    def describe(self) -> dict[str, str]:
        c = self.cam
        return {"vendor": c.get_vendor_name() or "", "model": c.get_model_name() or "",
                "serial": c.get_device_serial_number() or "", "id": c.get_device_id() or ""}  # fmt: skip

    def pixel_format(self) -> str:
        return str(self.cam.get_pixel_format_as_string())

    def apply(self, s: CameraSection) -> dict[str, Any]:
        c = self.cam
        try:
            if s.pixel_format:
                formats = list(c.dup_available_pixel_formats_as_strings())
                if s.pixel_format not in formats:
                    raise BouncerError(f"camera.pixel_format: {s.pixel_format!r} is not one this camera offers "
                                       f"({', '.join(formats)})")  # fmt: skip
                c.set_pixel_format_from_string(s.pixel_format)
            if s.roi:
                x, y, w, h = s.roi
                sw, sh = c.get_sensor_size()
                if x + w > sw or y + h > sh:
                    raise BouncerError(f"camera.roi: {s.roi} does not fit the sensor ({sw} x {sh})")
                c.set_region(x, y, w, h)
            if s.exposure_us is not None:
                if not c.is_exposure_time_available():
                    raise BouncerError("camera.exposure_us: this camera has no exposure time to set")
                check_range("exposure_us", s.exposure_us, *c.get_exposure_time_bounds())
                c.set_exposure_auto(self.arv.Auto.OFF) if c.is_exposure_auto_available() else None
                c.set_exposure_time(s.exposure_us)
            if s.gain_db is not None:
                if not c.is_gain_available():
                    raise BouncerError("camera.gain_db: this camera has no gain to set")
                check_range("gain_db", s.gain_db, *c.get_gain_bounds())
                c.set_gain_auto(self.arv.Auto.OFF) if c.is_gain_auto_available() else None
                c.set_gain(s.gain_db)
            if s.frame_rate_hz is not None:
                if not c.is_frame_rate_available():
                    raise BouncerError("camera.frame_rate_hz: this camera has no frame rate to set")
                check_range("frame_rate_hz", s.frame_rate_hz, *c.get_frame_rate_bounds())
                c.set_frame_rate(s.frame_rate_hz)
            check_trigger(s.trigger, list(c.dup_available_trigger_sources() or []))
            region = c.get_region()
            return {"pixel_format": self.pixel_format(), "roi": [region.x, region.y, region.width, region.height],
                    "exposure_us": c.get_exposure_time() if c.is_exposure_time_available() else None,
                    "gain_db": c.get_gain() if c.is_gain_available() else None,
                    "frame_rate_hz": c.get_frame_rate() if c.is_frame_rate_available() else None,
                    "trigger": s.trigger}  # fmt: skip
        except BouncerError:
            raise
        except Exception as exc:
            raise BouncerError(
                f"genicam://aravis/{self.ident}: setting up the camera failed: {_message(exc)}"
            ) from None

    def start(self, trigger: str) -> None:
        c = self.cam
        try:
            c.set_acquisition_mode(self.arv.AcquisitionMode.CONTINUOUS)
            if trigger == "off":
                c.clear_triggers()
            else:
                c.set_trigger("Software" if trigger == "software" else trigger)
            self.stream = c.create_stream(None, None)
            payload = c.get_payload()
            for _ in range(BUFFERS):
                self.stream.push_buffer(self.arv.Buffer.new_allocate(payload))
            c.start_acquisition()
        except Exception as exc:
            raise CameraGone(f"starting acquisition: {_message(exc)}") from None

    def software_trigger(self) -> None:
        try:
            self.cam.software_trigger()
        except Exception as exc:
            raise CameraGone(f"software trigger: {_message(exc)}") from None

    def grab(self, timeout_s: float) -> Grabbed | None:
        while True:
            buf = self.stream.timeout_pop_buffer(int(timeout_s * 1e6))
            if buf is None:
                return None
            try:
                if buf.get_status() == self.arv.BufferStatus.SUCCESS:
                    return self._grabbed(buf)
            finally:  # an incomplete frame (lost packets) is skipped: the next one
                self.stream.push_buffer(buf)

    def _grabbed(self, buf: Any) -> Grabbed:
        h, w = buf.get_image_height(), buf.get_image_width()
        data = np.frombuffer(buf.get_data(), np.uint8)
        bits = (buf.get_image_pixel_format() >> 16) & 0xFF  # PFNC: bits per pixel in the code's third byte
        pixels: np.ndarray
        try:
            if bits == 24:
                pixels = data[: h * w * 3].reshape(h, w, 3)
            elif bits == 16:
                pixels = data[: h * w * 2].view(np.uint16).reshape(h, w)
            else:
                pixels = data[: h * w].reshape(h, w)
        except ValueError:  # a buffer shorter than its header says: unreadable, reported as such
            pixels = data[:0]
        return Grabbed(pixels.copy(), int(buf.get_frame_id()), int(buf.get_timestamp()))

    def alive(self) -> bool:
        try:
            self.cam.get_string("DeviceVendorName")
            return True
        except Exception:
            return False

    def close(self) -> None:
        try:
            if self.stream is not None:
                self.cam.stop_acquisition()
        except Exception:  # a camera already gone cannot be told to stop
            pass
        self.stream = None
        self.cam = None


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)
