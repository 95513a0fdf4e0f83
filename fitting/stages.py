"""The stages every gate fit goes through, written once; what varies by task is how its heads are fitted and how
its confidence is certified (fitting/fit.py: Bouncer's and the user's classifiers and anomaly models;
fitting/detector.py: detectors).

1. the input gate: quality bounds from the training frames, then on the calibration frames the OOD heads' fusion
   and the operating point at the line's review budget (`fit_input_gate`);
2. the task head and its confidence (the task's own);
3. the acceptance its certificate gives (`acceptance`);
4. the bundle (`assemble`), with the figures every gate reports (`InputGate.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bouncer.fitting.acceptance import Selection
from bouncer.fitting.operating import FoldScores, OperatingPoint, choose
from bouncer.runtime.gates.bundle import Acceptance, GateBundle
from bouncer.runtime.gates.decision import rule
from bouncer.runtime.gates.heads import Fusion, OodHead
from bouncer.runtime.gates.quality import QualityGate
from bouncer.runtime.gates.risk import frames_needed
from bouncer.runtime.gates.tasks import TaskHead
from bouncer.runtime.preprocess import Preprocessing


def fit_quality(train_stats: Sequence[dict[str, float]], calib_stats: Sequence[dict[str, float]]
                ) -> tuple[QualityGate, np.ndarray]:  # fmt: skip
    """The quality bounds of the training frames, and which calibration frames are within them."""
    quality = QualityGate.fit(list(train_stats))
    return quality, np.array([not quality.check(s) for s in calib_stats], bool)


@dataclass
class InputGate:
    """What keeps garbage and the unfamiliar from the task head, fitted on the calibration frames."""

    quality: QualityGate
    q_ok: np.ndarray  # calibration frames within the quality bounds
    reference: np.ndarray  # those of them that are known and good: they set the OOD threshold
    fusion: Fusion
    fused: np.ndarray  # each calibration frame's fused OOD score
    op: OperatingPoint

    def passing(self, confidence: np.ndarray | None = None) -> np.ndarray:
        """Calibration frames the input gate lets through to the task head's confidence."""
        conf = np.ones(len(self.q_ok)) if confidence is None else confidence
        return self.q_ok & ~rule(self.q_ok, conf, self.fused, self.op.threshold, None).ood

    def metrics(self, passing: np.ndarray, calib_stats: Sequence[dict[str, float]]) -> dict[str, Any]:
        """The figures every gate's fit reports of its input gate (gate.json `fit_metrics`)."""
        return {
            "calibration_quality_rejects": int((~self.q_ok).sum()),
            "calibration_ood_flagged": int((self.q_ok & ~passing).sum()),
            "drift_reference": drift_reference(calib_stats, self.fused[self.reference]),
        }


def fit_input_gate(
    quality: QualityGate,
    q_ok: np.ndarray,
    known: np.ndarray,
    raw: np.ndarray,
    names: Sequence[str],
    method: str,
    folds: Sequence[FoldScores],
    budget: float,
    target_catch: float | None,
    delta: float,
) -> InputGate:
    """`raw`: N x H head scores of the calibration frames. The fusion is fitted on the frames that set the
    threshold (on every known frame while fewer than 10 of them pass the quality gate); the operating point
    flags at most the review budget of them, certified at `delta`, and catches what `folds` estimate."""
    ref = q_ok & known
    fusion = Fusion.fit(list(names), raw[ref] if ref.sum() >= 10 else raw[known], method)
    fused = fusion.fuse(raw)
    op = choose(fused[ref], folds, budget, target_catch, delta)
    return InputGate(quality, q_ok, ref, fusion, fused, op)


def drift_reference(stats: Sequence[dict[str, float]], fused_ok: np.ndarray) -> dict[str, float]:
    """Spreads the drift monitor scales its noise floors by (docs/mqtt.md, runtime/drift.py): of the calibration
    frames' brightness and log sharpness, and of the fused OOD scores of those passing the quality gate."""
    return {
        "brightness": round(float(np.std([st["mean"] for st in stats])), 4),
        "sharpness": round(float(np.std(np.log([max(st["sharpness"], 1e-6) for st in stats]))), 4),
        "ood_score": round(float(np.std(fused_ok)) if len(fused_ok) else 1.0, 4),
    }


def acceptance(sel: Selection, target_accuracy: float, delta: float) -> Acceptance:
    """The acceptance a Learn-then-Test selection certifies (threshold None: nothing is auto-accepted)."""
    return Acceptance(
        threshold=sel.threshold,
        target_accuracy=target_accuracy,
        delta=delta,
        error_bound=sel.error_bound,
        n_calibration=sel.n_calibration,
        n_accepted=sel.n_accepted,
        n_errors=sel.n_errors,
        frames_needed=frames_needed(1 - target_accuracy, delta),
    )


def assemble(
    gate: InputGate,
    *,
    backbone_hash: str,
    backbone_name: str,
    classes: list[str],
    preprocessing: Preprocessing,
    task: TaskHead,
    ood_heads: list[OodHead],
    accept: Acceptance,
    fit_metrics: dict[str, Any],
    selection: dict[str, Any],
    fit_settings: dict[str, Any],
    sidecar: dict[str, str] | None,
    version: str | None,
    **extra: Any,
) -> GateBundle:
    """The bundle of a fit: its input gate, task head and acceptance; `extra` what only some tasks carry
    (the classifier's baseline and explainer, the tiling)."""
    now = datetime.now(UTC)
    return GateBundle(
        version=version or now.strftime("%Y%m%d%H%M%S"),
        created=now.isoformat(timespec="seconds"),
        backbone_hash=backbone_hash,
        backbone_name=backbone_name,
        classes=classes,
        preprocessing=preprocessing,
        quality=gate.quality,
        task=task,
        ood_heads=ood_heads,
        fusion=gate.fusion,
        ood_threshold=gate.op.threshold,
        ood_quantile=1 - gate.op.rate,
        acceptance=accept,
        fit_metrics=fit_metrics,
        selection=selection,
        fit_settings=fit_settings,
        sidecar=sidecar,
        operating=gate.op.record,
        ood_reference=gate.fused[gate.reference],
        **extra,
    )
