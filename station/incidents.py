"""Incidents: the flagged frames that belong together, so an operator labels a new defect type, a giraffe or a
smeared lens once instead of once per frame.

Frames of one group are taken in the order they were made; a frame joins an open incident when it was flagged
for the same kind of thing (the same quality reasons; or, for frames the model saw, OOD or only unsure), came at
most `gap_s` after the incident's last frame, and, for frames the model saw, its feature vector is close to the
incident's mean (cosine at least `similarity`): two new part types seen in the same minute stay two incidents.
Grouping is recomputed from the store each time (no state to keep in step), over the oldest unlabelled frames.

Measured on the default demo (`bouncer demo`, two cameras, 271 flagged frames): 12 incidents, no frame grouped
with another incident's (the simulator's ground truth); at a cosine of 0.8, 10 incidents, still none; at 0.75,
8 with 14 frames wrong. A detector camera's frames hold several parts each, so a frame vector does not tell a
frame with an unknown object from another frame the OOD heads flagged: its OOD incidents mix them (18 of 264
frames in that run), and `o` opens an incident's frames to label them one by one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bouncer.station.store import Frame, unpack_features

GAP_S = 120.0  # a pause longer than this ends an incident
SIMILARITY = 0.85  # cosine of a frame's vector to the incident's mean vector
QUALITY_REJECT = "reject"  # frames the quality gate stopped: grouped by their reasons alone (no vector)
VECTOR_KEYS = ("features", "sidecar.pool_s32", "sidecar.features")  # the vector compared, first one present


def frame_vector(features: dict[str, np.ndarray]) -> np.ndarray | None:
    key = next((k for k in VECTOR_KEYS if k in features), None) or next(iter(sorted(features)), None)
    if key is None:
        return None
    v = np.asarray(features[key], np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and np.isfinite(n) else None


@dataclass
class Incident:
    """Frames that belong together; `id` is its first frame's."""

    kind: tuple[str, ...]
    frames: list[Frame] = field(default_factory=list)
    mean: np.ndarray | None = None  # running mean of the unit vectors
    last_ts: float = 0.0

    @property
    def id(self) -> str:
        return self.frames[0].id

    def fits(self, f: Frame, kind: tuple[str, ...], v: np.ndarray | None, gap_s: float, similarity: float) -> float:
        """How well `f` fits (higher is better), or -1 if it does not."""
        if kind != self.kind or f.ts - self.last_ts > gap_s or f.ts < self.frames[0].ts - gap_s:
            return -1.0
        if v is None or self.mean is None:
            return 0.0 if (v is None) == (self.mean is None) else -1.0
        cos = float(v @ self.mean / (np.linalg.norm(self.mean) or 1.0))
        return cos if cos >= similarity else -1.0

    def add(self, f: Frame, v: np.ndarray | None) -> None:
        self.frames.append(f)
        self.last_ts = max(self.last_ts, f.ts)
        if v is not None:
            n = len(self.frames)
            self.mean = v.copy() if self.mean is None else self.mean + (v - self.mean) / n

    def to_dict(self, preview: int = 8) -> dict[str, Any]:
        reasons = Counter(r for f in self.frames for r in f.reasons)
        predicted = Counter(f.predicted for f in self.frames if f.predicted)
        return {
            "id": self.id,
            "group": self.frames[0].group,
            "devices": sorted({f.device for f in self.frames}),
            "count": len(self.frames),
            "reasons": [r for r, _ in reasons.most_common()],
            "decision": Counter(f.decision for f in self.frames).most_common(1)[0][0],
            "predicted": predicted.most_common(1)[0][0] if predicted else None,
            "first_ts": self.frames[0].ts,
            "last_ts": self.last_ts,
            "frame_ids": [f.id for f in self.frames],
            "preview": [f.to_dict() for f in self.frames[:preview]],
        }


def kind_of(f: Frame) -> tuple[str, ...]:
    """Frames the quality gate rejected are grouped by their reasons; frames the model saw by whether the OOD heads
    flagged them (something unfamiliar) or only the confidence (a familiar part, an unsure model)."""
    if f.decision == QUALITY_REJECT:
        return tuple(sorted(f.reasons))
    return ("ood",) if "ood" in f.reasons else ("unsure",)


def group_frames(
    frames: list[Frame], features: dict[str, bytes | None], gap_s: float = GAP_S, similarity: float = SIMILARITY
) -> list[Incident]:
    """Frames (any order) -> incidents, oldest first. `features`: frame id -> the stored vectors (npz) or None."""
    open_: list[Incident] = []
    for f in sorted(frames, key=lambda f: (f.ts, f.id)):
        blob = features.get(f.id)
        v = frame_vector(unpack_features(blob)) if blob else None
        kind = kind_of(f)
        best, score = None, -1.0
        for inc in open_:
            s = inc.fits(f, kind, v, gap_s, similarity)
            if s > score:
                best, score = inc, s
        if best is None:
            best = Incident(kind)
            open_.append(best)
        best.add(f, v)
    return sorted(open_, key=lambda i: (i.frames[0].ts, i.id))
