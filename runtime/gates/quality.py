"""Frame-quality gate: statistics from one fused kernel pass (kernels.quality_stats), bounds, reasons.

All statistics are measured on a fixed-size grey downscale so that thresholds fitted on one camera
resolution hold on another. Bounds are fitted from training frames with robust quantiles and Tukey
fences (in log space for scale-like statistics), never hand-set grey levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from bouncer.runtime import kernels
from bouncer.runtime.preprocess import halve_while, shrink

GREY_W, GREY_H = 160, 120
TILES = 4  # 4x4 grid for occlusion / low texture
CLIP_DARK, CLIP_BRIGHT = 8, 247
FROZEN_EPS = 0.01  # mean |difference| in grey levels: a frozen camera repeats the frame exactly
# what the input check can say about a frame (an unreadable frame is rejected before it)
REASONS = ("dark", "overexposed", "low_contrast", "blur", "noise", "occluded", "frozen", "unreadable")
STAT_NAMES = ("mean", "std", "dark_frac", "bright_frac", "sharpness", "tile_std_min")


def grey_small(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(shrink(bgr, GREY_W, GREY_H), cv2.COLOR_BGR2GRAY)


def base_and_grey(frame: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """`halve_while(frame, width, height)` and the `grey_small` of that: what the model input and the quality
    statistics start from. When the grey image is that base halved once (a 4:3 frame of 640 x 480, or a
    power-of-two multiple of it, and a model input of at most 320 x 240), the last halving and the grey
    image come from one pass over the frame (kernels.halve_with_grey; identical results)."""
    img = halve_while(frame, 2 * width, 2 * height)  # all but the last halving
    fused = img.shape[1] >= 2 * width and img.shape[0] >= 2 * height
    if fused and (img.shape[0] // 4, img.shape[1] // 4) == (GREY_H, GREY_W):
        return kernels.halve_with_grey(np.ascontiguousarray(img))
    base = halve_while(img, width, height)
    return base, grey_small(base)


def quality_stats(bgr: np.ndarray, prev: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Statistics of one frame, and its grey downscale (to pass as `prev` with the next frame)."""
    g = grey_small(bgr)
    return grey_stats(g, prev), g


def grey_stats(g: np.ndarray, prev: np.ndarray | None = None) -> dict[str, float]:
    """Statistics of a `grey_small` image (and the previous frame's, for the frozen-camera check)."""
    if prev is not None and prev.shape != g.shape:
        prev = None
    values = kernels.quality_stats(g, prev, TILES, CLIP_DARK, CLIP_BRIGHT)
    stats = dict(zip(kernels.STAT_FIELDS, values.tolist(), strict=True))
    if prev is None:
        del stats["frame_diff"]
    return stats


LOG_FLOOR = 1e-6  # scale-like statistics below this are "exactly flat" (binarised or saturated tiles)


def _fence(values: np.ndarray, log: bool) -> tuple[float, float]:
    """Tukey fences around the 0.5%..99.5% quantiles: a frame outside is unlike any training frame.

    In log scale an exactly flat statistic (a binarised tile's std is 0) sits at the floor; if the line's
    own frames reach the floor, flat is normal there and the lower bound is 0, which every frame passes.
    """
    v = np.log(np.maximum(values, LOG_FLOOR)) if log else values
    q_lo, q25, q75, q_hi = np.quantile(v, [0.005, 0.25, 0.75, 0.995])
    spread = 1.5 * max(q75 - q25, 1e-6)
    lo, hi = q_lo - spread, q_hi + spread
    if not log:
        return float(lo), float(hi)
    return (0.0 if q_lo <= np.log(LOG_FLOOR) else float(np.exp(lo))), float(np.exp(hi))


@dataclass
class QualityGate:
    """Fitted bounds; `check` returns the reasons a frame is unusable (empty: usable)."""

    bounds: dict[str, list[float]] = field(default_factory=dict)
    frozen_eps: float = FROZEN_EPS

    @classmethod
    def fit(cls, stats: list[dict[str, float]]) -> QualityGate:
        table = {k: np.array([s[k] for s in stats], np.float64) for k in STAT_NAMES}
        bounds = {
            "mean": list(_fence(table["mean"], log=False)),
            "std": list(_fence(table["std"], log=True)),
            "sharpness": list(_fence(table["sharpness"], log=True)),
            "tile_std_min": list(_fence(table["tile_std_min"], log=True)),
        }
        for k in ("dark_frac", "bright_frac"):
            # a fraction of clipped pixels: only an upper bound, at least 5% of the frame and twice the 99.5%
            # quantile (most frames clip nothing, so the quartiles are 0 and the fence alone has no margin)
            hi = max(_fence(table[k], log=False)[1], 0.05, 2 * float(np.quantile(table[k], 0.995)))
            bounds[k] = [0.0, hi]
        return cls(bounds=bounds)

    def check(self, stats: dict[str, float]) -> list[dict[str, object]]:
        """Each failed check as {reason, stat, value, threshold}."""
        b = self.bounds
        out: list[dict[str, object]] = []

        def flag(reason: str, stat: str, threshold: float) -> None:
            out.append(
                {"reason": reason, "stat": stat, "value": round(stats[stat], 4), "threshold": round(threshold, 4)}
            )

        if stats["mean"] < b["mean"][0]:
            flag("dark", "mean", b["mean"][0])
        elif stats["dark_frac"] > b["dark_frac"][1]:
            flag("dark", "dark_frac", b["dark_frac"][1])
        if stats["mean"] > b["mean"][1]:
            flag("overexposed", "mean", b["mean"][1])
        elif stats["bright_frac"] > b["bright_frac"][1]:
            flag("overexposed", "bright_frac", b["bright_frac"][1])
        if stats["std"] < b["std"][0]:
            flag("low_contrast", "std", b["std"][0])
        if stats["sharpness"] < b["sharpness"][0]:
            flag("blur", "sharpness", b["sharpness"][0])
        elif stats["sharpness"] > b["sharpness"][1]:
            flag("noise", "sharpness", b["sharpness"][1])
        if stats["tile_std_min"] < b["tile_std_min"][0]:
            flag("occluded", "tile_std_min", b["tile_std_min"][0])
        if "frame_diff" in stats and stats["frame_diff"] < self.frozen_eps:
            flag("frozen", "frame_diff", self.frozen_eps)
        return out

    def to_dict(self) -> dict[str, object]:
        return {"bounds": self.bounds, "frozen_eps": self.frozen_eps}

    @classmethod
    def from_dict(cls, d: dict) -> QualityGate:
        bounds = {k: [float(x) for x in v] for k, v in d["bounds"].items()}
        missing = [k for k in STAT_NAMES if k not in bounds]
        if missing:
            raise ValueError(f"quality bounds lack {', '.join(missing)}")
        return cls(bounds=bounds, frozen_eps=float(d.get("frozen_eps", FROZEN_EPS)))
