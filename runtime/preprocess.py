"""Frame -> model input: OpenCV resize, then one fused pass (kernels.normalize_chw) to normalised CHW."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import cv2
import numpy as np

from bouncer.runtime import kernels
from bouncer.runtime.errors import BouncerError


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input; travels inside the model (metadata) or its card."""

    height: int = 224
    width: int = 224
    color: Literal["rgb", "bgr"] = "rgb"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    # stretch: plain resize; letterbox: keep the aspect ratio and pad with the mean colour.
    resize: Literal["stretch", "letterbox"] = "stretch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std"):
            if key in known:
                v = known[key]
                known[key] = tuple(float(x) for x in (v if isinstance(v, list | tuple) else [v] * 3))
                if len(known[key]) != 3:
                    raise BouncerError(f"preprocessing.{key}: need one value or three, got {v!r}")
        if "std" in known and any(s == 0 for s in known["std"]):
            raise BouncerError("preprocessing.std: must not be zero")
        if known.get("color", "rgb") not in ("rgb", "bgr"):
            raise BouncerError(f"preprocessing.color: 'rgb' or 'bgr', got {known['color']!r}")
        if known.get("resize", "stretch") not in ("stretch", "letterbox"):
            raise BouncerError(f"preprocessing.resize: 'stretch' or 'letterbox', got {known['resize']!r}")
        return cls(**known)


def shrink(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to width x height: halve with area averaging while the image is at least twice the target
    (OpenCV's exact 2:1 path, fast), then bilinear to the exact size.

    Equivalent to area averaging for large reductions at a fraction of INTER_AREA's cost at odd ratios
    (640x480 -> 224x224: 1.3 ms with INTER_AREA, 0.15 ms this way), and free of the aliasing a single
    bilinear step would add.
    """
    img = halve_while(img, width, height)
    if (img.shape[1], img.shape[0]) != (width, height):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    return img


def halve_while(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve (area averaging) while both sides stay at least the target's: the shared first steps of `shrink`."""
    while img.shape[1] >= 2 * width and img.shape[0] >= 2 * height:
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return img


def resize_frame(bgr: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Resize a BGR uint8 frame to the model's size (stretched, or letterboxed with the mean colour)."""
    if pp.resize == "stretch":
        return shrink(bgr, pp.width, pp.height)
    h, w = bgr.shape[:2]
    scale = min(pp.width / w, pp.height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = shrink(bgr, nw, nh)
    fill = pp.mean[::-1] if pp.color == "rgb" else pp.mean  # the pad is the mean colour, in BGR order
    out = np.empty((pp.height, pp.width, 3), np.uint8)
    out[:] = np.clip(np.round(fill), 0, 255).astype(np.uint8)
    y0, x0 = (pp.height - nh) // 2, (pp.width - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = small
    return out


def preprocess(bgr: np.ndarray, pp: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW normalised model input (written into `out` if given)."""
    img = resize_frame(bgr, pp)
    buf = kernels.normalize_chw(img, pp.mean, pp.std, pp.color == "rgb", None if out is None else out[0])
    return buf[None] if out is None else out
