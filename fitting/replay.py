"""Decisions replayed from stored features: how the station compares a challenger gate with the champion
on labelled frames without the images or the backbone (the devices sent the features)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bouncer.fitting.fit import FeatureSet
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import rule


@dataclass
class Replayed:
    accepted: np.ndarray  # bool, N
    predicted: list[str | None]  # class names (None: rejected by the quality gate)
    ood: np.ndarray  # fused OOD score, N
    quality_ok: np.ndarray  # bool, N


def replay(bundle: GateBundle, fs: FeatureSet) -> Replayed:
    """The decision rule (runtime/gates/decision.py) applied to feature sets, in batch."""
    n = len(fs)
    if n == 0:
        return Replayed(np.zeros(0, bool), [], np.zeros(0, np.float32), np.zeros(0, bool))
    keys = [h.input_key for h in bundle.ood_heads]
    missing = [k for k in keys if k not in fs.vectors]
    if missing:
        raise ValueError(f"features lack the vectors of input(s) {', '.join(missing)}")
    q_ok = np.array([not bundle.quality.check(s) for s in fs.stats], bool)
    probs = bundle.task.probs(fs.features)
    raw = np.stack([h.score_vectors(fs.vectors[h.input_key]) for h in bundle.ood_heads], axis=1)
    fused = bundle.fusion.fuse(raw)
    conf, pred = probs.max(1), probs.argmax(1)
    accepted = rule(q_ok, conf, fused, bundle.ood_threshold, bundle.acceptance.threshold).accepted
    predicted = [bundle.classes[int(p)] if ok else None for p, ok in zip(pred, q_ok, strict=True)]
    return Replayed(accepted, predicted, fused, q_ok)


def score_against(bundle: GateBundle, fs: FeatureSet, truth: list[str | None]) -> dict[str, Any]:
    """Accepted error and coverage against operator truth (None = garbage: must never be accepted)."""
    r = replay(bundle, fs)
    right = np.array([t is not None and p == t for p, t in zip(r.predicted, truth, strict=True)], bool)
    parts = np.array([t is not None for t in truth], bool)
    n_acc = int(r.accepted.sum())
    errors = int((r.accepted & ~right).sum())
    return {
        "frames": len(truth),
        "accepted": n_acc,
        "accepted_correct": int((r.accepted & right).sum()),
        "accepted_errors": errors,
        "accepted_error": round(errors / n_acc, 4) if n_acc else 0.0,
        "coverage": round(float(r.accepted[parts].mean()), 4) if parts.any() else 0.0,
    }
