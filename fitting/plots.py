"""Small PNG plots drawn with OpenCV, so evaluation needs no plotting library on a device."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

W, H, M = 640, 480, 60
COLOURS = [(200, 90, 30), (40, 40, 220), (40, 160, 40), (150, 60, 150), (0, 150, 200)]


def _canvas(title: str, xlabel: str, ylabel: str, ymax: float) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (M, M // 2), (W - M // 2, H - M), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (M, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (W // 2 - 60, H - 15), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, M // 2 - 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i in range(6):
        x = M + i * (W - M // 2 - M) // 5
        y = H - M - i * (H - M - M // 2) // 5
        cv2.putText(img, f"{i / 5:.1f}", (x - 10, H - M + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{ymax * i / 5:.3g}", (5, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.line(img, (M, y), (W - M // 2, y), (225, 225, 225), 1)
    return img


def _xy(x: float, y: float, ymax: float) -> tuple[int, int]:
    px = M + x * (W - M // 2 - M)
    py = H - M - min(y / ymax, 1.0) * (H - M - M // 2)
    return round(px), round(py)


def line_plot(
    curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str, xlabel: str, ylabel: str
) -> Path:
    ymax = max([max(ys, default=0) for _, ys in curves.values()] + [1e-3]) * 1.1
    img = _canvas(title, xlabel, ylabel, ymax)
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = np.array([_xy(x, y, ymax) for x, y in zip(xs, ys, strict=True)], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, name, (M + 10, M // 2 + 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
    return path


def reliability_plot(bins: list[dict[str, float]], path: Path, title: str) -> Path:
    img = _canvas(title, "confidence", "accuracy", 1.0)
    cv2.line(img, _xy(0, 0, 1), _xy(1, 1, 1), (160, 160, 160), 1, cv2.LINE_AA)
    for b in bins:
        if b["count"]:
            cv2.rectangle(img, _xy(b["lo"], b["accuracy"], 1), _xy(b["hi"], 0, 1), (200, 90, 30), -1)
            cv2.rectangle(img, _xy(b["lo"], b["accuracy"], 1), _xy(b["hi"], 0, 1), (0, 0, 0), 1)
    cv2.imwrite(str(path), img)
    return path
