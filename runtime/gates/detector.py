"""A YOLO-family detector's candidates, decoded and calibrated: the detector gate's task (`DetectorTask`) and its
own sign of an object it cannot name (`OrphanHead`, an OOD head)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bouncer.runtime import kernels
from bouncer.runtime.gates.heads import HEAD_KINDS, OodHead


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two sets of corners (M x 4, K x 4: x1 y1 x2 y2) -> M x K."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass(frozen=True)
class Detections:
    """One frame's candidates after NMS, best first: corners in model-input pixels, class index, calibrated
    probability that the box is a true object of that class; `bad` counts candidates with NaN/inf outputs."""

    boxes: np.ndarray  # M x 4 float32: x1 y1 x2 y2
    classes: np.ndarray  # M int64
    probs: np.ndarray  # M float64
    bad: int
    scores: np.ndarray | None = None  # M raw best scores (what the station recalibrates from)

    def kept(self) -> np.ndarray:
        """The boxes the gate reports: calibrated probability at least one half."""
        return self.probs >= 0.5

    def certainty(self) -> float:
        """How sure the frame's least certain candidate is either way: 1 with no candidate, NaN if `bad`."""
        if self.bad:
            return float("nan")
        return float(np.maximum(self.probs, 1 - self.probs).min()) if len(self.probs) else 1.0


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(s, np.float64), 1e-6, 1 - 1e-6)
    return np.log(s) - np.log1p(-s)


@dataclass
class DetectorTask:
    """A YOLO-family detector's raw output, decoded (kernels.decode_boxes, kernels.nms) and calibrated per class
    (Platt: p = sigmoid(a_c * logit(score) + b_c), fitted on candidates matched to true boxes). A frame's
    confidence is its least certain candidate's certainty max(p, 1 - p): accepting frames above a threshold t
    means no candidate sits in the band (1 - t, t), so every box is clearly kept or clearly dropped."""

    kind: ClassVar[str] = "detector"
    layout: str
    n_classes: int
    platt_a: np.ndarray = field(default_factory=lambda: np.ones(0))
    platt_b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    min_score: float = 0.01  # candidates below this raw score are never looked at
    iou: float = 0.7  # class-aware NMS
    max_candidates: int = 300

    def __post_init__(self) -> None:
        if not len(self.platt_a):
            self.platt_a, self.platt_b = np.ones(self.n_classes), np.zeros(self.n_classes)
        self.platt_a = np.asarray(self.platt_a, np.float64)
        self.platt_b = np.asarray(self.platt_b, np.float64)
        self._code = kernels.LAYOUTS.index(self.layout)

    def calibrate(self, classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        z = self.platt_a[classes] * _logit(scores) + self.platt_b[classes]
        return 1.0 / (1.0 + np.exp(-z))

    def candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One frame's raw output -> (boxes, class indices, raw best scores, bad) after NMS, best first."""
        raw = np.ascontiguousarray(np.asarray(raw, np.float32).reshape(np.shape(raw)[-2:]))
        boxes, scores, bad = kernels.decode_boxes(raw, self._code, self.n_classes, self.min_score,
                                                  self.max_candidates)  # fmt: skip
        keep = kernels.nms(boxes, scores, self.iou)
        s = scores[keep]
        return boxes[keep], s.argmax(axis=1), s.max(axis=1), bad

    def detect(self, raw: np.ndarray) -> Detections:
        boxes, cls, best, bad = self.candidates(raw)
        return Detections(boxes, cls, self.calibrate(cls, best), bad, best)

    def probs(self, x: np.ndarray) -> np.ndarray:
        """N frames' raw outputs -> N x 1 frame confidences (the certainty of each frame's least certain box)."""
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, *x.shape[-2:])
        return np.array([[self.detect(r).certainty()] for r in x], np.float32)

    def uncalibrated(self, x: np.ndarray) -> np.ndarray:
        """What evaluations compare the calibrated gate with: here the calibrated confidence itself (a raw
        detector score has no frame-level confidence to compare)."""
        return self.probs(x)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "layout": self.layout, "min_score": self.min_score, "iou": self.iou,
                "max_candidates": self.max_candidates}  # fmt: skip

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.platt_a": self.platt_a, f"{prefix}.platt_b": self.platt_b}

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, n_classes: int) -> DetectorTask:
        a, b = arrays[f"{prefix}.platt_a"], arrays[f"{prefix}.platt_b"]
        if a.shape != (n_classes,) or b.shape != (n_classes,) or not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"detector: calibration for {n_classes} classes expected")
        if meta.get("layout") not in kernels.LAYOUTS:
            raise ValueError(f"detector: layout {meta.get('layout')!r}")
        min_score, iou, cap = float(meta["min_score"]), float(meta["iou"]), int(meta["max_candidates"])
        if not (0 <= min_score < 1 and 0 <= iou <= 1 and cap > 0):
            raise ValueError("detector: min_score, iou or max_candidates out of range")
        return cls(str(meta["layout"]), n_classes, a, b, min_score, iou, cap)


@dataclass
class OrphanHead(OodHead):
    """A detector's own sign of an object it cannot name: the best raw score among its candidates that are not
    kept and overlap no kept box (IoU under `overlap`). On a line's frames every object is one the detector
    knows, so such orphans score near zero; an unfamiliar object on the belt often draws a weak candidate of the
    nearest class where nothing was kept. Read off the same raw output as the task, with a lower floor."""

    kind: ClassVar[str] = "orphan"
    source: str
    detector: DetectorTask
    overlap: float = 0.1

    def score_vectors(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return np.array([self.frame_score(r) for r in x.reshape(-1, *x.shape[-2:])], np.float32)

    def frame_score(self, raw: np.ndarray) -> float:
        boxes, cls, best, bad = self.detector.candidates(raw)
        if bad:
            return float("nan")
        kept = Detections(boxes, cls, self.detector.calibrate(cls, best), bad).kept()
        rest = ~kept
        if not rest.any():
            return 0.0
        lone = rest.copy()
        if kept.any():
            lone[rest] = iou_matrix(boxes[rest], boxes[kept]).max(axis=1) < self.overlap
        return float(best[lone].max()) if lone.any() else 0.0

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return self.detector.arrays(prefix)

    def meta(self) -> dict[str, Any]:
        return {**self.detector.meta(), "kind": self.kind, "source": self.source, "n_classes": self.detector.n_classes,
                "overlap": self.overlap}  # fmt: skip

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> OrphanHead:
        overlap = float(meta["overlap"])
        if not 0 < overlap <= 1:
            raise ValueError("orphan head: overlap out of range")
        return cls(str(meta["source"]), DetectorTask.load(meta, arrays, prefix, int(meta["n_classes"])), overlap)


HEAD_KINDS[OrphanHead.kind] = OrphanHead  # bundles load it by its kind like the heads of heads.py
