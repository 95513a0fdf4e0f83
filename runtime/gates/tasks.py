"""Task heads: what a gate certifies. Each turns the model's task output into per-class confidences.

- LinearHead (heads.py, kind "linear"): Bouncer's own classifier on the backbone's features.
- UserScores (kind "scores"): the user's classifier; its scores made logits again and temperature-scaled.
- AnomalyScore (kind "anomaly"): the user's anomaly model; its raw score made a conformal p-value against
  good calibration frames, the one "confidence" that the frame is good.
- DetectorTask (kind "detector"): the user's YOLO-family detector; its candidates decoded and NMS'd in the hot
  path, each box's class score calibrated per class, and the frame's confidence the certainty of its least
  certain candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bouncer.runtime import kernels
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import LinearHead, softmax

SUM_TOLERANCE = 1e-2  # softmax outputs (float16/int8 exports round) must sum to one within this


def check_scores(x: np.ndarray, score_kind: str, n_classes: int, where: str) -> np.ndarray:
    """A classifier's scores as the card describes them, or an error naming what is off."""
    x = np.asarray(x, np.float64)
    x = x.reshape(len(x), -1)
    if x.shape[1] != n_classes:
        raise BouncerError(f"{where}: scores have {x.shape[1]} columns, the card names {n_classes} classes")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise BouncerError(f"{where}: {int(bad.sum())} of {len(x)} frames have NaN or infinite scores")
    if score_kind in ("softmax", "sigmoid") and ((x < -1e-6) | (x > 1 + 1e-6)).any():
        raise BouncerError(
            f"{where}: the card says score_kind = {score_kind!r} but scores lie outside [0, 1] "
            f"(min {x.min():.3g}, max {x.max():.3g}); use score_kind = 'logits'"
        )
    if score_kind == "softmax":
        sums = x.sum(1)
        off = np.abs(sums - 1) > SUM_TOLERANCE
        if off.any():
            raise BouncerError(
                f"{where}: the card says score_kind = 'softmax' but {int(off.sum())} of {len(x)} frames' scores do "
                f"not sum to one (e.g. {sums[off][0]:.4g}); use 'sigmoid' for independent per-class probabilities"
            )
    return x


@dataclass
class UserScores:
    """The user's classifier, calibrated: probabilities are mapped back to logits (softmax: log p, the logits up
    to a constant; sigmoid: log-odds), then one temperature fitted on calibration frames."""

    kind: ClassVar[str] = "scores"
    score_kind: str
    n_classes: int
    temperature: float = 1.0

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if self.score_kind == "softmax":
            return np.log(np.clip(x, 1e-12, 1.0))
        if self.score_kind == "sigmoid":
            p = np.clip(x, 1e-7, 1 - 1e-7)
            return np.log(p) - np.log1p(-p)
        return x

    def probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x) / self.temperature).astype(np.float32)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "score_kind": self.score_kind, "temperature": self.temperature}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {}


@dataclass
class AnomalyScore:
    """p = (1 + #good calibration scores >= s) / (n + 1): for a good frame, P(p <= a) <= a. Accepting frames with
    p above a threshold t >= a keeps the false-alarm rate on good frames at most t (the card states it)."""

    kind: ClassVar[str] = "anomaly"
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))  # good calibration scores, sorted

    def __post_init__(self) -> None:
        self.reference = np.sort(np.asarray(self.reference, np.float64).ravel())

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, np.float64).reshape(len(scores), -1)[:, 0]
        n = len(self.reference)
        at_least = n - np.searchsorted(self.reference, s, side="left")
        p = (1.0 + at_least) / (n + 1.0)
        return np.where(np.isfinite(s), p, np.nan)

    def loo_pvalues(self) -> np.ndarray:
        """Each good calibration frame's p-value against the others (in the reference's sorted order): what a new
        good frame's p-value is distributed as."""
        n = len(self.reference)
        at_least = n - np.searchsorted(self.reference, self.reference, side="left") - 1
        return (1.0 + at_least) / n

    def probs(self, x: np.ndarray) -> np.ndarray:
        return self.pvalues(x)[:, None].astype(np.float32)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_reference": len(self.reference)}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.reference": self.reference}


@dataclass(frozen=True)
class Detections:
    """One frame's candidates after NMS, best first: corners in model-input pixels, class index, calibrated
    probability that the box is a true object of that class; `bad` counts candidates with NaN/inf outputs."""

    boxes: np.ndarray  # M x 4 float32: x1 y1 x2 y2
    classes: np.ndarray  # M int64
    probs: np.ndarray  # M float64
    bad: int

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
        return Detections(boxes, cls, self.calibrate(cls, best), bad)

    def probs(self, x: np.ndarray) -> np.ndarray:
        """N frames' raw outputs -> N x 1 frame confidences (the certainty of each frame's least certain box)."""
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, *x.shape[-2:])
        return np.array([[self.detect(r).certainty()] for r in x], np.float32)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "layout": self.layout, "min_score": self.min_score, "iou": self.iou,
                "max_candidates": self.max_candidates}  # fmt: skip

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.platt_a": self.platt_a, f"{prefix}.platt_b": self.platt_b}


TaskHead = LinearHead | UserScores | AnomalyScore | DetectorTask
TASK_OF_CARD = {"features": "linear", "classifier": "scores", "anomaly": "anomaly", "detector": "detector"}


def uncalibrated_probs(task: TaskHead, x: np.ndarray) -> np.ndarray:
    """Confidences before calibration (temperature 1; an anomaly score's p-value has none): what evaluations
    compare the calibrated gate against."""
    if isinstance(task, AnomalyScore | DetectorTask):
        return task.probs(x)
    return softmax(task.logits(x)).astype(np.float32)


def task_meta(task: TaskHead) -> dict[str, Any]:
    if isinstance(task, LinearHead):
        return {"kind": "linear", "temperature": task.temperature}
    return task.meta()


def task_arrays(task: TaskHead, prefix: str = "task") -> dict[str, np.ndarray]:
    if isinstance(task, LinearHead):
        return {f"{prefix}.weight": task.weight, f"{prefix}.bias": task.bias}
    return task.arrays(prefix)


def load_task(meta: dict[str, Any], arrays: dict[str, np.ndarray], n_classes: int, prefix: str = "task") -> TaskHead:
    """A task head saved by task_meta/task_arrays (bundles before format 3: always linear)."""
    kind = meta.get("kind", "linear")
    temperature = float(meta.get("temperature", 1.0))
    if kind in ("linear", "scores") and not temperature > 0:
        raise ValueError("task temperature must be positive")
    if kind == "linear":
        head = LinearHead(arrays[f"{prefix}.weight"].astype(np.float32), arrays[f"{prefix}.bias"].astype(np.float32),
                          temperature)  # fmt: skip
        if head.weight.ndim != 2 or head.weight.shape[0] != n_classes or head.bias.shape != (n_classes,):
            raise ValueError(f"task head shape {head.weight.shape} does not match {n_classes} classes")
        return head
    if kind == "scores":
        if meta["score_kind"] not in ("logits", "softmax", "sigmoid"):
            raise ValueError(f"task score_kind {meta['score_kind']!r}")
        return UserScores(str(meta["score_kind"]), n_classes, temperature)
    if kind == "anomaly":
        ref = arrays[f"{prefix}.reference"]
        if ref.ndim != 1 or not len(ref) or not np.isfinite(ref).all():
            raise ValueError("anomaly task: reference scores must be a non-empty finite vector")
        return AnomalyScore(ref)
    if kind == "detector":
        a, b = arrays[f"{prefix}.platt_a"], arrays[f"{prefix}.platt_b"]
        if a.shape != (n_classes,) or b.shape != (n_classes,) or not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"detector task: calibration for {n_classes} classes expected")
        if meta.get("layout") not in kernels.LAYOUTS:
            raise ValueError(f"detector task: layout {meta.get('layout')!r}")
        if not (0 <= float(meta["min_score"]) < 1 and 0 <= float(meta["iou"]) <= 1 and int(meta["max_candidates"]) > 0):
            raise ValueError("detector task: min_score, iou or max_candidates out of range")
        return DetectorTask(str(meta["layout"]), n_classes, a, b, float(meta["min_score"]), float(meta["iou"]),
                            int(meta["max_candidates"]))  # fmt: skip
    raise ValueError(f"unknown task kind {kind!r}")
