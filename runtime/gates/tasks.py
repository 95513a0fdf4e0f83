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
from typing import Any, ClassVar, Protocol

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.detector import DetectorTask
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

    def uncalibrated(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x)).astype(np.float32)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "score_kind": self.score_kind, "temperature": self.temperature}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, n_classes: int) -> UserScores:
        temperature = float(meta.get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError("task temperature must be positive")
        if meta["score_kind"] not in ("logits", "softmax", "sigmoid"):
            raise ValueError(f"task score_kind {meta['score_kind']!r}")
        return cls(str(meta["score_kind"]), n_classes, temperature)


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

    def uncalibrated(self, x: np.ndarray) -> np.ndarray:
        return self.probs(x)  # a p-value has no temperature

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_reference": len(self.reference)}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.reference": self.reference}

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, n_classes: int) -> AnomalyScore:
        ref = arrays[f"{prefix}.reference"]
        if ref.ndim != 1 or not len(ref) or not np.isfinite(ref).all():
            raise ValueError("anomaly task: reference scores must be a non-empty finite vector")
        return cls(ref)


class TaskHead(Protocol):
    """What a gate certifies, as the bundle, the guard and the evaluations see it. A new task head is a class with
    these and one entry in `TASK_KINDS` (its card's task in `TASK_OF_CARD`)."""

    kind: ClassVar[str]  # its name in gate.json

    def probs(self, x: np.ndarray) -> np.ndarray:
        """N task outputs -> N x C calibrated confidences (an anomaly or detector gate: N x 1)."""
        ...

    def uncalibrated(self, x: np.ndarray) -> np.ndarray:
        """The same before calibration: what evaluations compare the calibrated gate against."""
        ...

    def meta(self) -> dict[str, Any]: ...

    def arrays(self, prefix: str) -> dict[str, np.ndarray]: ...

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, n_classes: int) -> TaskHead:
        """The head `meta` and `arrays` saved; ValueError naming what is wrong."""
        ...


TASK_KINDS: dict[str, type[TaskHead]] = {c.kind: c for c in (LinearHead, UserScores, AnomalyScore, DetectorTask)}
TASK_OF_CARD = {"features": "linear", "classifier": "scores", "anomaly": "anomaly", "detector": "detector"}


def load_task(meta: dict[str, Any], arrays: dict[str, np.ndarray], n_classes: int, prefix: str = "task") -> TaskHead:
    """A task head saved with its `meta` and `arrays` (bundles before format 3: always linear)."""
    kind = meta.get("kind", "linear")
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}")
    return TASK_KINDS[kind].load(meta, arrays, prefix, n_classes)
