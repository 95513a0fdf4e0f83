"""Synthetic local defects made from a line's own frames: the held-out "unknown" of head selection where the
line has nothing else to hold out (a single known class), and one more fold where it has.

Each defect is small and local, like the new defect types a line meets (a blowhole, a scratch, a smudge of
foreign texture, a dark inactive area, a chipped edge), and keeps the frame's exposure and sharpness,
so the quality gate does not catch it: only the OOD heads can. Seeded: the same frames and seed give the same defects.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Defect = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _size(img: np.ndarray) -> int:
    return min(img.shape[:2])


def _contrast(img: np.ndarray, rng: np.random.Generator) -> float:
    """A signed grey-level shift that stands out from this frame: 1.5-3 of its standard deviations."""
    sd = max(float(img.std()), 12.0)
    return float(rng.choice([-1, 1]) * rng.uniform(1.5, 3.0) * sd)


def _blend(img: np.ndarray, mask: np.ndarray, shift: float) -> np.ndarray:
    out = img.astype(np.float32) + shift * mask[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft-edged dark or bright ellipse (a hole, a stain, a bump): 6-16% of the short side across."""
    h, w = img.shape[:2]
    s = _size(img)
    mask = np.zeros((h, w), np.float32)
    axes = (max(2, int(s * rng.uniform(0.03, 0.08))), max(2, int(s * rng.uniform(0.03, 0.08))))
    centre = (int(rng.uniform(0.15, 0.85) * w), int(rng.uniform(0.15, 0.85) * h))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), max(axes) / 4), np.float32)
    return _blend(img, mask / max(float(mask.max()), 1e-6), _contrast(img, rng))


def crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crack or scratch: a jagged random walk across 30-70% of the frame, sometimes branching."""
    h, w = img.shape[:2]
    s = _size(img)
    mask = np.zeros((h, w), np.float32)
    thickness = max(1, round(s * rng.uniform(0.008, 0.02)))
    start = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h])
    for _ in range(1 + int(rng.random() < 0.3)):  # a branch starts where the crack does
        angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, 8))
        step = s * rng.uniform(0.3, 0.7) / 8
        line = start + np.cumsum(np.stack([np.cos(angle), np.sin(angle)], 1) * step, 0)
        cv2.polylines(mask, [np.vstack([start, line]).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA)
    return _blend(img, mask, -abs(_contrast(img, rng)) if rng.random() < 0.8 else abs(_contrast(img, rng)))


def dark_region(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An inactive or shaded area: a soft polygon over 8-25% of the frame, 30-60% darker."""
    h, w = img.shape[:2]
    centre = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h])
    radius = np.sqrt(rng.uniform(0.08, 0.25) * h * w / np.pi)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 7))))
    pts = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radius * rng.uniform(0.7, 1.3, (len(angles), 1))
    mask = np.zeros((h, w), np.float32)
    cv2.fillPoly(mask, [pts.astype(np.int32)], 1.0, cv2.LINE_AA)
    mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), max(radius / 8, 1.0)), np.float32)
    factor = 1 - rng.uniform(0.3, 0.6) * mask[..., None]
    return np.clip(img.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def chipped_edge(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A broken corner or edge: a triangle at the border filled with the frame's darkest grey."""
    h, w = img.shape[:2]
    s = _size(img)
    a, b = s * rng.uniform(0.12, 0.3), s * rng.uniform(0.12, 0.3)
    corner = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])[int(rng.integers(4))]
    sx, sy = (1 if corner[0] == 0 else -1), (1 if corner[1] == 0 else -1)
    tri = np.stack([corner, corner + np.array([sx * a, 0.0]), corner + np.array([0.0, sy * b])]).astype(np.int32)
    out = img.copy()
    cv2.fillPoly(out, [tri], np.percentile(img, 1, axis=(0, 1)).tolist(), cv2.LINE_AA)
    return out


def texture_swap(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch of the frame's own texture, rotated and pasted elsewhere (a foreign texture, a misprint)."""
    h, w = img.shape[:2]
    p = max(4, int(_size(img) * rng.uniform(0.15, 0.3)))
    y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
    y1, x1 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
    patch = np.rot90(img[y0 : y0 + p, x0 : x0 + p], int(rng.integers(1, 4)))
    out = img.copy()
    out[y1 : y1 + p, x1 : x1 + p] = np.clip(patch.astype(np.float32) * rng.uniform(0.6, 1.4), 0, 255).astype(np.uint8)
    return out


DEFECTS: dict[str, Defect] = {
    "blob": blob,
    "crack": crack,
    "dark_region": dark_region,
    "chipped_edge": chipped_edge,
    "texture_swap": texture_swap,
}


def synthesize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One defect of a kind drawn at random."""
    name = list(DEFECTS)[int(rng.integers(len(DEFECTS)))]
    return DEFECTS[name](img, rng)
