"""The frame decision, written once: the verdicts, the record a frame's decision travels in, and the rule
(quality passes, fused OOD score at most its threshold, confidence at least the acceptance threshold) that the
guard applies per frame and replay, fit and evaluation apply to whole arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Verdict(StrEnum):
    ACCEPT = "accept"
    REVIEW = "review"
    REJECT = "reject"


VERDICTS = tuple(v.value for v in Verdict)


@dataclass(frozen=True)
class Flags:
    """Per frame, which part of the rule fired (arrays of N)."""

    ood: np.ndarray
    low_confidence: np.ndarray
    accepted: np.ndarray


def rule(
    quality_ok: np.ndarray, confidence: np.ndarray, fused: np.ndarray, ood_threshold: float, threshold: float | None
) -> Flags:
    """The acceptance rule on N frames. `threshold` None: no threshold met the target, nothing is accepted."""
    quality_ok = np.asarray(quality_ok, bool)
    ood = ~(np.asarray(fused) <= ood_threshold)  # NaN is out of distribution
    conf = np.asarray(confidence)
    low = np.ones(conf.shape, bool) if threshold is None else ~(conf >= threshold)
    return Flags(ood, low, quality_ok & ~ood & ~low)


def rule_one(confidence: float, fused: float, ood_threshold: float, threshold: float | None) -> tuple[bool, bool]:
    """`rule` for one frame that passed the quality gate, in plain Python: (ood, low_confidence). The guard calls
    it every frame, where building arrays cost 15 us; tests/test_gates.py checks it against `rule`."""
    return not fused <= ood_threshold, threshold is None or not confidence >= threshold


@dataclass
class Decision:
    decision: Verdict
    label: str | None = None
    confidence: float | None = None
    ood_score: float | None = None
    # conformal p-value of ood_score among the good calibration frames: where the frame sits on the gate's
    # catch-versus-flag curve (flagged as ood when below the operating point's share of good frames flagged)
    ood_pvalue: float | None = None
    reasons: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)  # what fired: stat, value, threshold
    quality: dict[str, float] = field(default_factory=dict)
    boxes: list[dict[str, Any]] | None = None  # a detector gate's kept boxes: class, p, box (frame pixels)
    size: tuple[int, int] | None = None  # the frame's width and height: the boxes' pixel space
    candidates: np.ndarray | None = None  # a detector's candidates after NMS: M x 6 corners, class, raw score

    def flag(self, detail: dict[str, Any]) -> Decision:
        """Send the frame to review for `detail["reason"]`, with what fired."""
        self.decision = Verdict.REVIEW
        self.reasons.append(detail["reason"])
        self.details.append(detail)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": str(self.decision),
            "label": self.label,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "ood_score": None if self.ood_score is None else round(self.ood_score, 4),
            "ood_pvalue": None if self.ood_pvalue is None else round(self.ood_pvalue, 6),
            "reasons": self.reasons,
            "details": self.details,
            "quality": {k: round(v, 4) for k, v in self.quality.items()},
        } | ({} if self.boxes is None else {"boxes": self.boxes})


def unreadable(message: str) -> Decision:
    return Decision(Verdict.REJECT, reasons=["unreadable"], details=[{"reason": "unreadable", "error": message}])
