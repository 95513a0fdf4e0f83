"""A procedural production line, deterministic from a seed.

Parts of several classes lie on a textured conveyor belt under slightly uneven light. The same
renderer makes training/calibration folders (ImageFolder layout) and, later, streams with incidents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FRAME_W, FRAME_H = 320, 240


@dataclass(frozen=True)
class Scene:
    """Per-frame nuisance parameters: where the part sits and how the light falls."""

    cx: float
    cy: float
    angle: float
    scale: float
    light: float
    belt_phase: int


# pixel grids and the lens vignette are the same for every frame: computed once (rendering speed is what
# lets the demo run several simulated cameras on a laptop)
_YY, _XX = np.mgrid[0:FRAME_H, 0:FRAME_W].astype(np.float32)
_VIGNETTE = 1.0 - 0.18 * (((_XX - FRAME_W / 2) / FRAME_W) ** 2 + ((_YY - FRAME_H / 2) / FRAME_H) ** 2) * 4
_TINT = np.array([1.0, 1.02, 1.04], np.float32)


_BANK = np.random.default_rng(20261127).standard_normal((2 * FRAME_H, 6 * FRAME_W), dtype=np.float32)


def _noise(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise: a window at a random offset of one fixed noise field (drawing fresh normals for every
    pixel was most of the rendering time); deterministic from `rng` like everything else."""
    h, w = shape[0], int(np.prod(shape[1:]))
    y, x = int(rng.integers(0, _BANK.shape[0] - h)), int(rng.integers(0, _BANK.shape[1] - w))
    return (_BANK[y : y + h, x : x + w] * np.float32(sigma)).reshape(shape)


def belt(rng: np.random.Generator, phase: int, light: float) -> np.ndarray:
    """Dark rubber belt with ribs that move with `phase`, plus fine grain."""
    x = np.arange(FRAME_W, dtype=np.float32)
    ribs = 6.0 * (((x + phase) % 24) < 3)
    base = 62.0 + ribs[None, :] + _noise(rng, 3.0, (FRAME_H, FRAME_W))
    base = cv2.GaussianBlur(base, (3, 3), 0)
    grey = base * _VIGNETTE * np.float32(light)
    return grey[:, :, None] * _TINT


def _shade(mask: np.ndarray, colour: tuple[float, float, float], s: Scene, rng: np.random.Generator) -> np.ndarray:
    """A metallic diagonal gradient with brushed texture inside `mask`."""
    ca, sa = np.float32(np.cos(s.angle) * 0.35 / 120.0), np.float32(np.sin(s.angle) * 0.35 / 120.0)
    g = 0.75 + (_XX - np.float32(s.cx)) * ca + (_YY - np.float32(s.cy)) * sa
    brushed = cv2.blur(_noise(rng, 10.0, (FRAME_H, FRAME_W)), (15, 1))
    out = g[:, :, None] * np.asarray(colour, np.float32) + brushed[:, :, None]
    return out * np.float32(s.light)


def _poly(points: np.ndarray, s: Scene) -> np.ndarray:
    rot = np.array([[np.cos(s.angle), -np.sin(s.angle)], [np.sin(s.angle), np.cos(s.angle)]])
    return (points * s.scale @ rot.T + [s.cx, s.cy]).astype(np.int32)


def _mask_washer(s: Scene) -> np.ndarray:
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.circle(m, (int(s.cx), int(s.cy)), int(58 * s.scale), 255, -1, cv2.LINE_AA)
    cv2.circle(m, (int(s.cx), int(s.cy)), int(24 * s.scale), 0, -1, cv2.LINE_AA)
    return m


def _mask_gear(s: Scene) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 12 * 8, endpoint=False)
    r = 50 + 9 * (np.sin(12 * t) > 0)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.fillPoly(m, [_poly(pts, s)], 255, cv2.LINE_AA)
    cv2.circle(m, (int(s.cx), int(s.cy)), int(12 * s.scale), 0, -1, cv2.LINE_AA)
    return m


def _mask_bracket(s: Scene) -> np.ndarray:
    pts = np.array([[-60, -45], [60, -45], [60, -15], [-25, -15], [-25, 50], [-60, 50]], np.float64)
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.fillPoly(m, [_poly(pts, s)], 255, cv2.LINE_AA)
    for hx, hy in ((35, -30), (-43, 30)):
        c = _poly(np.array([[hx, hy]], np.float64), s)[0]
        cv2.circle(m, (int(c[0]), int(c[1])), int(7 * s.scale), 0, -1, cv2.LINE_AA)
    return m


def _mask_plate(s: Scene) -> np.ndarray:
    pts = np.array([[-70, -40], [70, -40], [70, 40], [-70, 40]], np.float64)
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.fillPoly(m, [_poly(pts, s)], 255, cv2.LINE_AA)
    for hx, hy in ((-52, -24), (52, -24), (-52, 24), (52, 24)):
        c = _poly(np.array([[hx, hy]], np.float64), s)[0]
        cv2.circle(m, (int(c[0]), int(c[1])), int(6 * s.scale), 0, -1, cv2.LINE_AA)
    return m


def _mask_bolt(s: Scene) -> np.ndarray:
    """A hex bolt: a part type the line has never shown (for unknown-class tests)."""
    t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    head = np.stack([32 * np.cos(t) - 40, 32 * np.sin(t)], 1)
    shaft = np.array([[-15, -13], [75, -13], [75, 13], [-15, 13]], np.float64)
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.fillPoly(m, [_poly(head, s), _poly(shaft, s)], 255, cv2.LINE_AA)
    return m


def _mask_giraffe(s: Scene) -> np.ndarray:
    """A giraffe silhouette: the foreign object no classifier trained on parts should accept."""
    body = np.array(
        [[-55, 5], [30, 5], [38, -10], [45, -70], [62, -78], [66, -70], [52, -62], [46, 0], [40, 20], [-50, 22]],
        np.float64,
    )
    m = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.fillPoly(m, [_poly(body, s)], 255, cv2.LINE_AA)
    for lx in (-48, -36, 22, 34):  # legs
        cv2.fillPoly(m, [_poly(np.array([[lx, 15], [lx + 6, 15], [lx + 6, 70], [lx, 70]], np.float64), s)], 255)
    # the spots: dark patches inside the body
    rng = np.random.default_rng(int(s.cx * 7 + s.cy))
    spots = np.zeros_like(m)
    for _ in range(14):
        c = _poly(np.array([[rng.uniform(-50, 35), rng.uniform(-5, 18)]], np.float64), s)[0]
        cv2.circle(spots, (int(c[0]), int(c[1])), int(4 * s.scale), 255, -1)
    return np.where(spots > 0, (m * 0.55).astype(np.uint8), m)


PARTS: dict[str, tuple[Callable[[Scene], np.ndarray], tuple[float, float, float]]] = {
    "washer": (_mask_washer, (170.0, 172.0, 176.0)),
    "gear": (_mask_gear, (70.0, 130.0, 185.0)),  # BGR: bronze
    "bracket": (_mask_bracket, (150.0, 120.0, 95.0)),  # BGR: blue-grey paint
    "plate": (_mask_plate, (80.0, 140.0, 75.0)),  # BGR: green board
    "bolt": (_mask_bolt, (120.0, 125.0, 130.0)),
    "giraffe": (_mask_giraffe, (60.0, 150.0, 210.0)),  # BGR: tawny
}
KNOWN_CLASSES = ("washer", "gear", "bracket", "plate")
UNKNOWN_PARTS = ("bolt",)  # a part type the line has never shown
FOREIGN = ("giraffe",)  # not a part at all


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        cx=FRAME_W / 2 + rng.uniform(-25, 25),
        cy=FRAME_H / 2 + rng.uniform(-18, 18),
        angle=rng.uniform(-0.5, 0.5),
        scale=rng.uniform(0.9, 1.1),
        light=rng.uniform(0.95, 1.05),
        belt_phase=int(rng.integers(0, 24)),
    )


def render(part: str, rng: np.random.Generator, scene: Scene | None = None) -> np.ndarray:
    """One BGR uint8 frame of `part` on the belt."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    s = scene or random_scene(rng)
    frame = belt(rng, s.belt_phase, s.light)
    place(frame, part, s, rng)
    return finish(frame, rng)


def place(frame: np.ndarray, part: str, s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Lay `part` with its soft shadow onto a float belt frame, in place; returns the part's mask (0..1)."""
    mask_fn, colour = PARTS[part]
    mask = mask_fn(s).astype(np.float32) / 255.0
    # a soft shadow under the part, offset away from the light
    shadow = cv2.GaussianBlur(np.roll(mask, (5, 6), (0, 1)), (0, 0), 4)
    frame *= 1 - 0.45 * shadow[:, :, None]
    part_img = _shade(mask, colour, s, rng)
    frame += (part_img - frame) * mask[:, :, None]
    return mask


def finish(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    frame += _noise(rng, 2.0, frame.shape)  # sensor noise
    return np.clip(frame, 0, 255, out=frame).astype(np.uint8)


def write_dataset(out: Path, parts: tuple[str, ...] = KNOWN_CLASSES, per_class: int = 50, seed: int = 0) -> Path:
    """Write `per_class` PNG frames of each part into OUT/PART/, deterministically from `seed`."""
    for k, part in enumerate(parts):
        d = out / part
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, k])
        for i in range(per_class):
            cv2.imwrite(str(d / f"{part}_{i:04d}.png"), render(part, rng))
    return out
