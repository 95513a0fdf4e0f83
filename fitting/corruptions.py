"""Frame corruptions (ImageNet-C style, numpy/OpenCV only) and garbage frames, for evaluation and incidents."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = 0.012 * max(img.shape[:2])  # severity ~3 relative to the frame size
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = max(5, int(0.05 * max(img.shape[:2])) | 1)
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0 / k
    m = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, m, (k, k)), np.float32)
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))


def gaussian_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _clip(img.astype(np.float32) + rng.normal(0, 0.18 * 255, img.shape))


def brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _clip(img.astype(np.float32) + 0.3 * 255)


def contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = img.astype(np.float32)
    return _clip((f - f.mean()) * 0.3 + f.mean())


def jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 8])
    out = cv2.imdecode(enc, cv2.IMREAD_COLOR) if ok else None
    return img if out is None else np.asarray(out)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "gaussian_noise": gaussian_noise,
    "brightness": brightness,
    "contrast": contrast,
    "jpeg": jpeg,
}


def lens_cap(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nearly black with sensor noise: the cap is on."""
    return _clip(rng.normal(4, 1.5, img.shape))


def blown_out(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturated: a flash, or the exposure ran away."""
    return _clip(img.astype(np.float32) * 0.15 + 235 + rng.normal(0, 1.0, img.shape))


def noise_frame(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pure noise: a broken sensor or cable."""
    return rng.integers(0, 256, img.shape, dtype=np.uint8)


GARBAGE: dict[str, Corruption] = {"lens_cap": lens_cap, "blown_out": blown_out, "noise_frame": noise_frame}
