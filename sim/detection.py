"""The simulated line in detection mode: several parts per frame, their boxes in the ground truth.

Frames are written in the layout YOLO trainers read (`images/NAME.png`, `labels/NAME.txt` with one
`class cx cy w h` row per box, normalised) plus `boxes.jsonl`, the ground truth Bouncer's own tools read
(class names and pixel corners, unknown objects included: they are in no label file, since the line never
labelled them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bouncer.sim.simulator import FRAME_H, FRAME_W, KNOWN_CLASSES, PARTS, Scene, belt, finish, place

SCALE = (0.38, 0.5)  # parts at about 45-70 px: three or four fit a frame side by side
MARGIN = 4  # a box is kept at least this far inside the frame


@dataclass(frozen=True)
class Box:
    cls: str
    x1: float
    y1: float
    x2: float
    y2: float

    def as_list(self) -> list:
        return [self.cls, round(self.x1, 1), round(self.y1, 1), round(self.x2, 1), round(self.y2, 1)]


def _overlaps(a: tuple[float, float, float, float], boxes: list[Box], gap: float = 6.0) -> bool:
    return any(a[0] < b.x2 + gap and b.x1 < a[2] + gap and a[1] < b.y2 + gap and b.y1 < a[3] + gap for b in boxes)


def render_scene(parts: list[str], rng: np.random.Generator) -> tuple[np.ndarray, list[Box]]:
    """One BGR frame with each of `parts` placed where it overlaps no other (a part that finds no room after a
    few tries is left out), and the box of every part placed."""
    light, phase = float(rng.uniform(0.95, 1.05)), int(rng.integers(0, 24))
    frame = belt(rng, phase, light)
    boxes: list[Box] = []
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
        for _ in range(20):
            s = Scene(cx=float(rng.uniform(40, FRAME_W - 40)), cy=float(rng.uniform(35, FRAME_H - 35)),
                      angle=float(rng.uniform(-np.pi, np.pi)), scale=float(rng.uniform(*SCALE)), light=light,
                      belt_phase=phase)  # fmt: skip
            ys, xs = np.nonzero(PARTS[part][0](s) > 127)
            if not len(xs):
                continue
            corners = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            inside = corners[0] >= MARGIN and corners[1] >= MARGIN and corners[2] <= FRAME_W - MARGIN
            if inside and corners[3] <= FRAME_H - MARGIN and not _overlaps(corners, boxes):
                place(frame, part, s, rng)
                boxes.append(Box(part, *corners))
                break
    return finish(frame, rng), boxes


def random_parts(rng: np.random.Generator, known: tuple[str, ...] = KNOWN_CLASSES, max_parts: int = 4,
                 unknown: tuple[str, ...] = (), unknown_rate: float = 0.0) -> list[str]:  # fmt: skip
    """1..max_parts known parts; with probability `unknown_rate` one of them is replaced by an unknown object."""
    parts = [str(p) for p in rng.choice(known, size=int(rng.integers(1, max_parts + 1)))]
    if unknown and rng.random() < unknown_rate:
        parts[int(rng.integers(0, len(parts)))] = str(rng.choice(unknown))
    return parts


def write_detection_dataset(out: Path, frames: int, seed: int = 0, known: tuple[str, ...] = KNOWN_CLASSES,
                            unknown: tuple[str, ...] = (), unknown_rate: float = 0.0) -> Path:  # fmt: skip
    """`frames` frames into OUT/images, OUT/labels (YOLO rows, known classes only) and OUT/boxes.jsonl."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    index = {c: i for i, c in enumerate(known)}
    with open(out / "boxes.jsonl", "w") as truth:
        for i in range(frames):
            frame, boxes = render_scene(random_parts(rng, known, unknown=unknown, unknown_rate=unknown_rate), rng)
            name = f"frame_{i:05d}"
            cv2.imwrite(str(out / "images" / f"{name}.png"), frame)
            rows = [
                f"{index[b.cls]} {(b.x1 + b.x2) / 2 / FRAME_W:.6f} {(b.y1 + b.y2) / 2 / FRAME_H:.6f} "
                f"{(b.x2 - b.x1) / FRAME_W:.6f} {(b.y2 - b.y1) / FRAME_H:.6f}"
                for b in boxes
                if b.cls in index
            ]
            (out / "labels" / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
            truth.write(json.dumps({"image": f"images/{name}.png", "boxes": [b.as_list() for b in boxes]}) + "\n")
    (out / "classes.json").write_text(json.dumps(list(known)) + "\n")
    return out


def read_truth(folder: Path) -> dict[str, list[Box]]:
    """Image path (absolute) -> its ground-truth boxes, from `boxes.jsonl`."""
    rows = [json.loads(line) for line in (folder / "boxes.jsonl").read_text().splitlines() if line.strip()]
    return {str(folder / r["image"]): [Box(str(b[0]), *map(float, b[1:])) for b in r["boxes"]] for r in rows}
