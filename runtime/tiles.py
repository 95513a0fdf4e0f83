"""Tiled scoring for frames much larger than the backbone input: a pit a few pixels wide on a 1130 x 460 frame
vanishes when the whole frame is shrunk to 224 x 224, but not in a tile of a quarter of it.

A tiling is a grid of `rows` x `cols` overlapping tiles laid over the whole frame, whatever its size (a tile is
a share of the frame, not a pixel size, so a camera with a slightly different ROI still gets the same views).
Each tile goes through the backbone as one more frame of a batch; the tile heads (`knn:OUTPUT@tiles`) score every
tile and the frame by its most unusual tile. The cost is one backbone call per tile: the line's choice, printed by
`bouncer fit` and `bench hotpath`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bouncer.runtime.errors import BouncerError

OVERLAP = 0.25  # share of a tile its neighbour also sees: a defect on a seam is whole in one of them
# auto: tiles only for frames at least this many times the backbone input on both sides, each tile at most
# MAX_ZOOM times the input (so a tile is shrunk by at most that much where the whole frame is shrunk by 2-5x)
AUTO_RATIO = 2.0
MAX_ZOOM = 1.5
MAX_TILES = 64


@dataclass(frozen=True)
class Tiling:
    rows: int
    cols: int
    overlap: float = OVERLAP

    def __post_init__(self) -> None:
        if min(self.rows, self.cols) < 1 or self.rows * self.cols < 2:
            raise BouncerError(f"tiles {self.rows}x{self.cols}: need at least two tiles (rows and columns >= 1)")
        if self.rows * self.cols > MAX_TILES:
            raise BouncerError(f"tiles {self.rows}x{self.cols}: at most {MAX_TILES} tiles per frame")
        if not 0 <= self.overlap < 0.9:
            raise BouncerError(f"tiles: overlap must be in [0, 0.9), got {self.overlap}")

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    def rects(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Each tile's (x1, y1, x2, y2) in a width x height frame, row by row; together they cover it."""
        th, ys = _axis(height, self.rows, self.overlap)
        tw, xs = _axis(width, self.cols, self.overlap)
        return [(x, y, x + tw, y + th) for y in ys for x in xs]

    def crops(self, frame: np.ndarray) -> list[np.ndarray]:
        """The tiles of a frame (views, no copy)."""
        return [frame[y1:y2, x1:x2] for x1, y1, x2, y2 in self.rects(frame.shape[1], frame.shape[0])]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "overlap": self.overlap}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tiling:
        return cls(int(d["rows"]), int(d["cols"]), float(d.get("overlap", OVERLAP)))


def _axis(length: int, n: int, overlap: float) -> tuple[int, list[int]]:
    """Tile length and start positions of n tiles overlapping by `overlap` over `length` pixels."""
    if n == 1:
        return length, [0]
    size = min(length, math.ceil(length / (n - (n - 1) * overlap)))
    return size, [round(i * (length - size) / (n - 1)) for i in range(n)]


def parse_tiles(spec: str) -> Tiling | str:
    """`--tiles`: "auto", "off" or ROWSxCOLS (e.g. 2x4)."""
    s = spec.strip().lower()
    if s in ("auto", "off"):
        return s
    rows, sep, cols = s.partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit():
        raise BouncerError(f"--tiles {spec!r}: expected auto, off or ROWSxCOLS (e.g. 2x4)")
    return Tiling(int(rows), int(cols))


def auto_tiling(width: int, height: int, in_width: int, in_height: int) -> Tiling | None:
    """The grid for frames of this size, or None where the whole frame loses little at the backbone's input."""
    if width < AUTO_RATIO * in_width or height < AUTO_RATIO * in_height:
        return None
    rows = max(1, math.ceil((height / (MAX_ZOOM * in_height) - OVERLAP) / (1 - OVERLAP)))
    cols = max(1, math.ceil((width / (MAX_ZOOM * in_width) - OVERLAP) / (1 - OVERLAP)))
    return Tiling(min(rows, 8), min(cols, 8))


def resolve_tiling(spec: str, sizes: list[tuple[int, int]], in_width: int, in_height: int) -> Tiling | None:
    """The tiling a fit offers head selection: none, the named grid, or auto's for the line's median frame size.
    A named grid whose tiles would be smaller than the backbone input is refused (upscaled tiles add nothing)."""
    choice = parse_tiles(spec)
    if choice == "off" or not sizes:
        return None
    w = int(np.median([s[0] for s in sizes]))
    h = int(np.median([s[1] for s in sizes]))
    if choice == "auto":
        return auto_tiling(w, h, in_width, in_height)
    assert isinstance(choice, Tiling)
    x1, y1, x2, y2 = choice.rects(w, h)[0]
    if x2 - x1 < in_width / 2 or y2 - y1 < in_height / 2:
        raise BouncerError(
            f"--tiles {choice}: tiles of {x2 - x1} x {y2 - y1} px on the line's {w} x {h} frames are smaller than "
            f"half the backbone input ({in_width} x {in_height}); use fewer tiles"
        )
    return choice
