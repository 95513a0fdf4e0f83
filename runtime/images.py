"""Reading images from disk without surprises: every failure becomes an ImageError naming the file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from bouncer.runtime.errors import BouncerError, ImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
MIN_SIDE = 8
MAX_PIXELS = 64_000_000  # larger than any industrial camera frame; guards memory on a device


def read_bgr(path: str | Path) -> np.ndarray:
    """Decode any common image file to a BGR uint8 HxWx3 array (grey and alpha are converted)."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # validateInputImageSize: the header claims more than OPENCV_IO_MAX_IMAGE_PIXELS
        if "MAX_IMAGE" in str(exc):
            raise ImageError(f"{path}: image too large (its header claims more than {MAX_PIXELS} pixels)") from None
        raise ImageError(f"{path}: not a decodable image ({str(exc).strip()[-120:]})") from None
    if img is None:
        raise ImageError(f"{path}: not a decodable image")
    return to_bgr(img, str(path))


def to_bgr(img: np.ndarray, name: str = "frame") -> np.ndarray:
    """Normalise dtype and channel count of a decoded frame to BGR uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageError(f"{name}: unsupported shape {img.shape} (need grey, BGR or BGRA)")
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image too small ({w}x{h}, need at least {MIN_SIDE}px a side)")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({w}x{h})")
    return np.ascontiguousarray(img)


def walk_images(root: Path) -> list[Path]:
    """Image files under a folder, following symlinked folders (data sets are often linked in)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders searched recursively for image files, in a stable order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from walk_images(p)
        elif p.exists():
            yield p
        else:
            raise BouncerError(f"{p}: no such file or folder")


def image_folder(root: str | Path) -> dict[str, list[Path]]:
    """ImageFolder layout: one sub-folder per class. Raises if there is nothing usable."""
    root = Path(root)
    if not root.is_dir():
        raise BouncerError(f"{root}: not a folder")
    classes = {d.name: walk_images(d) for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {k: v for k, v in classes.items() if v}
    if not classes:
        raise BouncerError(f"{root}: no class sub-folders with images (expected ROOT/CLASS/IMAGE)")
    return classes


def list_images(root: str | Path) -> list[Path]:
    """All images under a folder (any layout); raises if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise BouncerError(f"{root}: not a folder")
    files = list(iter_image_paths([root]))
    if not files:
        raise BouncerError(f"{root}: no image files found")
    return files
