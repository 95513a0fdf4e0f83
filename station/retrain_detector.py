"""Retraining a detector gate: the detector is frozen, so what the operators' box labels teach is its calibration.
The line's calibration frames (kept by `bouncer station init`) plus the labelled flagged frames refit the per-class
box probabilities and certify the threshold again; held-out labels compare the challenger with the champion."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bouncer.fitting.detector import DetectionFrames, halves, judge, recalibrate
from bouncer.fitting.fit import FitSettings
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.station.retrain import BaseData, RetrainResult, assign_splits
from bouncer.station.store import Store

# reasons a frame is flagged for that still leave it in distribution: it belongs to the frames the threshold
# is certified on (frames stopped by the quality gate or the OOD heads never reach the threshold)
IN_DISTRIBUTION = {"ambiguous_box"}
WHOLE_FRAME_UNKNOWN = [-1.0, -1e9, -1e9, 1e9, 1e9]  # garbage: no candidate is a true box, and nothing is right


def true_boxes(kind: str, label: str | None, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """An operator's label -> K x 5 true boxes (class index, corners; -1 for an object the detector does not know)
    and the names of such objects."""
    if kind == "garbage":
        return np.array([WHOLE_FRAME_UNKNOWN]), []
    rows, unknown = [], []
    for b in json.loads(label or "[]"):
        name = b["class"]
        if name in classes:
            rows.append([classes.index(name), *b["box"]])
        else:
            rows.append([-1.0, *b["box"]])
            unknown.append(name.removeprefix("new:"))
    return np.array(rows, np.float64).reshape(-1, 5), unknown


def retrain_detector(
    store: Store, base: BaseData, champion: GateBundle, serial: int, group: str, log: Callable[[str], None] = print
) -> RetrainResult:
    classes = list(champion.classes)
    parts: dict[str, DetectionFrames] = {k: DetectionFrames([], [], np.zeros(0, bool)) for k in
                                         ("train", "calib", "heldout")}  # fmt: skip
    skipped, unknown = 0, set()
    rows = []
    for frame_id, kind, label, reasons, _, cands in store.labelled_detections(champion.backbone_hash, group):
        if cands is None or kind not in ("boxes", "garbage"):
            skipped += 1  # rejected before the detector ran (quality gate), or labelled under another gate kind
            continue
        rows.append((frame_id, kind, label, reasons, cands))
    for split, (_, kind, label, reasons, cands) in zip(assign_splits([(r[0], r[1]) for r in rows]), rows, strict=True):
        truth, names = true_boxes(kind, label, classes)
        unknown.update(names)
        p = parts[split]
        p.cands.append(cands)
        p.truth.append(truth)
        p.passing = np.append(p.passing, set(reasons) <= IN_DISTRIBUTION)
    metrics: dict[str, Any] = {
        "labelled_used": sum(len(p) for p in parts.values()),
        "labelled_without_candidates": skipped,
        "new_classes": [],
        "split": {k: len(v) for k, v in parts.items()},
    }
    if unknown:  # the detector is frozen: their frames stay flagged, and now count as errors where accepted
        metrics["not_predicted_by_model"] = sorted(unknown)
    if not metrics["labelled_used"]:
        return RetrainResult(False, "no labelled detector frames with candidates yet", None, metrics)
    base_frames = base.detections()
    a, b = halves(len(base_frames), FitSettings.of(champion).seed)
    version = f"s{serial}-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"
    platt = DetectionFrames.concat([base_frames.take(a), parts["train"]])
    threshold = DetectionFrames.concat([base_frames.take(b), parts["calib"]])
    try:
        challenger = recalibrate(champion, platt, threshold, version, log)
    except BouncerError as exc:
        return RetrainResult(False, f"recalibration failed: {exc}", None, metrics)
    held = parts["heldout"]
    if len(held):
        champ = judge(champion.task, held).report(held.passing, champion.acceptance.threshold)  # type: ignore[arg-type]
        chall = judge(challenger.task, held).report(held.passing, challenger.acceptance.threshold)  # type: ignore[arg-type]
    else:
        champ = chall = {"frames": 0}
    metrics |= {"champion": {"version": champion.version, **champ}, "challenger": {"version": version, **chall}}
    challenger.fit_metrics["retrain"] = metrics
    a_ = champion.acceptance
    if challenger.acceptance.threshold is None:
        why = (f"no confidence threshold meets target accuracy {a_.target_accuracy} on the calibration frames and "
               "labels; nothing published (more labelled frames, or a lower target)")  # fmt: skip
        return RetrainResult(False, f"the challenger's acceptance guarantee does not hold: {why}", challenger, metrics)
    if len(held):
        allowed = max(champ["accepted_error"], 1 - a_.target_accuracy)
        if chall["accepted_error"] > allowed:
            return RetrainResult(False, f"challenger accepted error {chall['accepted_error']} > allowed {allowed:.4f}",
                                 challenger, metrics)  # fmt: skip
        if chall["accepted_correct"] < champ["accepted_correct"]:
            return RetrainResult(False, f"challenger accepts fewer held-out frames correctly "
                                 f"({chall['accepted_correct']} < {champ['accepted_correct']})", challenger,
                                 metrics)  # fmt: skip
    return RetrainResult(True, "recalibrated on the operators' box labels; not worse than the champion on held-out "
                         "labels; guarantee holds", challenger, metrics)  # fmt: skip
