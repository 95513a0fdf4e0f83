"""Frame -> model input: 2x2 box halvings (kernels.halve), then one fused bilinear + normalise pass to CHW."""

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
    pad: float | None = None  # letterbox: the border's grey level (0..255; YOLO trainers use 114); None: the mean

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
        if known.get("pad") is not None:
            try:
                known["pad"] = float(known["pad"])
            except (TypeError, ValueError):
                raise BouncerError(f"preprocessing.pad: a grey level 0..255, got {known['pad']!r}") from None
            if not 0 <= known["pad"] <= 255:
                raise BouncerError(f"preprocessing.pad: a grey level 0..255, got {known['pad']}")
        if known.get("resize", "stretch") not in ("stretch", "letterbox"):
            raise BouncerError(f"preprocessing.resize: 'stretch' or 'letterbox', got {known['resize']!r}")
        return cls(**known)


def shrink(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to width x height: halve with 2x2 box averaging while the image is at least twice the target,
    then bilinear to the exact size (the geometry `preprocess` uses, kept as a uint8 image).

    Equivalent to area averaging for large reductions at a fraction of INTER_AREA's cost at odd ratios
    (640x480 -> 224x224: 1.3 ms with INTER_AREA, 0.15 ms this way), and free of the aliasing a single
    bilinear step would add.
    """
    img = halve_while(img, width, height)
    if (img.shape[1], img.shape[0]) != (width, height):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
    return img


def halve_while(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve (2x2 box means) while both sides stay at least twice the target's: the shared first steps of
    `shrink` and `preprocess`."""
    while img.shape[1] >= 2 * width and img.shape[0] >= 2 * height:
        img = kernels.halve(np.ascontiguousarray(img))
    return img


def preprocess(bgr: np.ndarray, pp: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 HxWx3 -> float32 1x3xHxW normalised model input (written into `out` if given): halved
    while at least twice the target, then one fused bilinear + normalise pass (kernels.resize_normalize)."""
    buf = np.empty((1, 3, pp.height, pp.width), np.float32) if out is None else out
    h, w = bgr.shape[:2]
    if pp.resize == "stretch":
        img = halve_while(bgr, pp.width, pp.height)
        rect = None
    else:
        nh, nw = letterbox_rect(w, h, pp)[2:]
        img = halve_while(bgr, nw, nh)
        if pp.pad is None:
            buf.fill(0.0)  # the mean colour normalises to 0
        else:
            for c in range(3):
                buf[0, c].fill((pp.pad - pp.mean[c]) / pp.std[c])
        rect = letterbox_rect(w, h, pp)
    kernels.resize_normalize(np.ascontiguousarray(img), pp.mean, pp.std, pp.color == "rgb", buf[0], rect)
    return buf


def letterbox_rect(w: int, h: int, pp: Preprocessing) -> tuple[int, int, int, int]:
    """Where a w x h frame lands inside the letterboxed input: (top, left, height, width)."""
    scale = min(pp.width / w, pp.height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return (pp.height - nh) // 2, (pp.width - nw) // 2, nh, nw


def input_to_frame(boxes: np.ndarray, w: int, h: int, pp: Preprocessing) -> np.ndarray:
    """Box corners (M x 4: x1 y1 x2 y2) in model-input pixels -> in the w x h frame's pixels, clipped to it."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if pp.resize == "stretch":
        top, left, nh, nw = 0, 0, pp.height, pp.width
    else:
        top, left, nh, nw = letterbox_rect(w, h, pp)
    b[:, 0::2] = np.clip((b[:, 0::2] - left) * np.float32(w / nw), 0, w)
    b[:, 1::2] = np.clip((b[:, 1::2] - top) * np.float32(h / nh), 0, h)
    return b
