"""Retraining: the champion's training and calibration features plus the operators' labels -> a challenger
gate, compared with the champion on held-out labels, published only if it is not worse and its
acceptance guarantee holds. New defect types the operators named become classes."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.fitting.detector import DetectionFrames
from bouncer.fitting.fit import FeatureSet, FitSettings, ModelRole, fit_from_features, input_key
from bouncer.fitting.replay import score_against
from bouncer.fitting.support import settle_new_classes
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.detector import DetectorTask
from bouncer.station.store import Store, unpack_features

HELDOUT_EVERY = 5  # one labelled frame in five is held out to judge champion vs challenger
CALIB_EVERY = 3  # of the rest, one in three calibrates, two train
LABELS_PER_CALIBRATION_FRAME = HELDOUT_EVERY / (HELDOUT_EVERY - 1) * CALIB_EVERY  # 3.75


@dataclass
class BaseData:
    """The features the first gate was fitted on, extracted once by `bouncer station init`."""

    root: Path

    @property
    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise BouncerError(f"{self.root}: no base features (run `bouncer station init`): {exc}") from None

    def save(
        self, train: FeatureSet, calib: FeatureSet, meta: dict[str, Any], pseudo: FeatureSet | None = None
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        train.save(self.root / "train.npz")
        calib.save(self.root / "calib.npz")
        if pseudo is not None:  # synthetic defects: the held-out fold of head selection on a one-class line
            pseudo.save(self.root / "pseudo.npz")
        (self.root / "meta.json").write_text(json.dumps(meta, indent=2))

    def load(self) -> tuple[FeatureSet, FeatureSet]:
        return FeatureSet.load(self.root / "train.npz"), FeatureSet.load(self.root / "calib.npz")

    def save_detections(self, calib: DetectionFrames, meta: dict[str, Any]) -> None:
        """A detector group's base: its calibration frames' candidates, true boxes and input-gate outcome."""
        self.root.mkdir(parents=True, exist_ok=True)
        calib.save(self.root / "detections.npz")
        (self.root / "meta.json").write_text(json.dumps(meta, indent=2))

    def detections(self) -> DetectionFrames:
        try:
            return DetectionFrames.load(self.root / "detections.npz")
        except (OSError, ValueError, KeyError) as exc:
            raise BouncerError(f"{self.root}: no base detections (run `bouncer station init`): {exc}") from None

    def pseudo(self) -> FeatureSet | None:
        path = self.root / "pseudo.npz"
        return FeatureSet.load(path) if path.exists() else None


@dataclass
class RetrainResult:
    publish: bool
    reason: str
    challenger: GateBundle | None
    metrics: dict[str, Any] = field(default_factory=dict)


def _hash(frame_id: str) -> int:
    return int(hashlib.sha256(frame_id.encode()).hexdigest()[:8], 16)


def is_heldout(frame_id: str) -> bool:
    """By the id alone, so a frame held out once is held out at every retrain (never fitted by a champion)."""
    return _hash(frame_id) % HELDOUT_EVERY == 0


def assign_splits(frames: Sequence[tuple[str, str]]) -> list[str]:
    """The split of each (frame id, class) pair: held out by the id, the rest per class in the order of their
    hashes, every third calibrating. A class's calibration count is then its share of the labels, not a coin
    toss per frame: of 40 random ids the toss calibrated 5 to 18 (1st to 99th percentile of 10,000 draws), the
    ranks 8 to 12, and a new class with fewer than 8 is left out, so the same labels published a gate or not
    by luck. The first two of a class train."""
    splits = ["heldout" if is_heldout(i) else "" for i, _ in frames]
    by_class: dict[str, list[int]] = {}
    for n, (_, cls) in enumerate(frames):
        if not splits[n]:
            by_class.setdefault(cls, []).append(n)
    for members in by_class.values():
        members.sort(key=lambda n: (_hash(frames[n][0]), frames[n][0]))
        for rank, n in enumerate(members):
            splits[n] = "calib" if rank % CALIB_EVERY == CALIB_EVERY - 1 else "train"
    return splits


def _featureset(rows: list[tuple[int, dict[str, np.ndarray], dict[str, float]]], features: str) -> FeatureSet:
    labels = np.array([r[0] for r in rows], np.int64)
    feats = np.stack([r[1][features] for r in rows]).astype(np.float32)
    keys = set.intersection(*(set(r[1]) for r in rows))
    vectors = {k: np.stack([r[1][k] for r in rows]).astype(np.float32) for k in keys}
    return FeatureSet(labels, feats, vectors, [r[2] for r in rows])


def retrain(
    store: Store, base: BaseData, champion: GateBundle, serial: int, group: str = "default", log=print
) -> RetrainResult:
    if isinstance(champion.task, DetectorTask):
        from bouncer.station.retrain_detector import retrain_detector

        return retrain_detector(store, base, champion, serial, group, log)
    meta = base.meta
    features = meta["features"]
    needed = {features, *(input_key(h) for h in champion.fusion.names)}
    classes = list(champion.classes)
    parts: dict[str, list] = {"train": [], "calib": [], "heldout": []}
    truth: list[str | None] = []
    skipped = 0
    rows = []
    for frame_id, kind, label, quality, blob in store.labelled(champion.backbone_hash, group):
        feats = unpack_features(blob) if blob else {}
        if not needed <= set(feats):
            skipped += 1  # rejected before the backbone (quality gate): nothing to learn the heads from
            continue
        rows.append((frame_id, kind, str(label), quality, feats))
    for split, (_, kind, label, quality, feats) in zip(
        assign_splits([(r[0], r[1] if r[1] == "garbage" else r[2]) for r in rows]), rows, strict=True
    ):
        if kind == "garbage":
            if split == "heldout":
                parts["heldout"].append((-1, feats, quality))
                truth.append(None)
            continue
        if label not in classes:
            classes.append(label)
        row = (classes.index(label), feats, quality)
        parts[split].append(row)
        if split == "heldout":
            truth.append(label)
    role = ModelRole.of_bundle(champion)
    new_classes = classes[len(champion.classes) :]
    frozen_out: list[str] = []
    if new_classes and role.kind != "linear":  # the user's model is frozen: it cannot learn a class
        left_out = set(new_classes)
        frozen_out = sorted(left_out) if role.kind == "scores" else []
        if role.kind == "anomaly":  # any label but the good class is a defect: calibration frames for the misses
            defects = [(-1, f, q) for name in ("train", "calib") for y, f, q in parts[name] if classes[y] in left_out]
            parts["calib"] = [p for p in parts["calib"] if classes[p[0]] not in left_out] + defects
        for name in ("train", "calib"):
            parts[name] = [p for p in parts[name] if p[0] < 0 or classes[p[0]] not in left_out]
        truth = [None if t in left_out and role.kind == "scores" else t for t in truth]
        classes, new_classes = classes[: len(champion.classes)], []
    base_train, base_calib = base.load()
    metrics: dict[str, Any] = {
        "labelled_used": sum(len(v) for v in parts.values()),
        "labelled_without_features": skipped,
        "new_classes": new_classes,
        "split": {k: len(v) for k, v in parts.items()},
    }
    if frozen_out:
        metrics["not_predicted_by_model"] = frozen_out
    if not metrics["labelled_used"] or (frozen_out and not parts["train"] and not parts["calib"]):
        why = "no labelled frames with features yet"
        if frozen_out:
            why = (f"labels name class(es) {', '.join(frozen_out)} your model does not predict: Bouncer calibrates "
                   "it but cannot teach it a class (retrain the model, then fit a new gate); their frames stay "
                   "flagged")  # fmt: skip
        return RetrainResult(False, why, None, metrics)
    version = f"s{serial}-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"
    a = champion.acceptance

    everything = {
        name: FeatureSet.concat([base_set, *([_featureset(parts[name], features)] if parts[name] else [])])
        for name, base_set in (("train", base_train), ("calib", base_calib))
    }

    def fit(keep: list[str]) -> tuple[GateBundle, FeatureSet]:
        """A challenger on the base features plus the labels of the classes in `keep` (re-indexed)."""
        if role.kind == "anomaly":  # one good class; defective calibration frames stay labelled -1
            train, calib = everything["train"], everything["calib"]
        else:
            train, calib = (everything[name].restrict(classes, keep) for name in ("train", "calib"))
        counts = np.bincount(train.labels, minlength=len(keep))
        thin = [c for c, n in zip(keep, counts, strict=True) if n < 2]
        if thin:
            raise BouncerError(f"classes with fewer than 2 training frames: {', '.join(thin)}")
        try:
            return fit_from_features(
                train, calib, keep, FitSettings.of(champion), backbone_hash=champion.backbone_hash,
                backbone_name=champion.backbone_name, preprocessing=champion.preprocessing, version=version, log=log,
                where="calibration features", pseudo=base.pseudo(), role=role,
            ), calib  # fmt: skip
        except BouncerError as exc:
            raise BouncerError(f"fit failed: {exc}") from None

    try:
        challenger, support = settle_new_classes(fit, classes, new_classes)
    except BouncerError as exc:
        return RetrainResult(False, str(exc), None, metrics)
    pending = {c: s.as_dict(LABELS_PER_CALIBRATION_FRAME) for c, s in support.items() if not s.kept}
    if support:
        metrics["new_class_support"] = {c: s.as_dict(LABELS_PER_CALIBRATION_FRAME) for c, s in support.items()}
    if pending:
        metrics["pending_classes"] = pending
        say = "; ".join(f"{c}: {p['why']}, about {p['labels_needed']} more labels" for c, p in pending.items())
        log(f"labels not yet enough to accept {say}: left out of this gate, still flagged for review")
        new_classes = [c for c in new_classes if c not in pending]
        metrics["new_classes"] = new_classes
        if not any(classes[y] not in pending for split in ("train", "calib") for y, _, _ in parts[split]):
            return RetrainResult(
                False, f"labels not yet enough for new class(es): {say}; nothing published", None, metrics
            )
    if parts["heldout"]:
        held = _featureset(parts["heldout"], features)
        champ, chall = score_against(champion, held, truth), score_against(challenger, held, truth)
    else:
        champ = chall = {"frames": 0}
    metrics |= {"champion": {"version": champion.version, **champ}, "challenger": {"version": version, **chall}}
    # the guarantee is pooled over all classes; a new class with few labelled calibration frames rides on the
    # others: say how many more labels would let each stand on its own guarantee
    counts = challenger.fit.calibration_class_counts
    need = challenger.acceptance.frames_needed
    metrics["labels_needed"] = {
        c: math.ceil(max(need - counts.get(c, 0), 0) * LABELS_PER_CALIBRATION_FRAME) for c in new_classes
    }
    challenger.fit_metrics["retrain"] = metrics
    if challenger.acceptance.threshold is None:
        why = f"no confidence threshold meets target accuracy {a.target_accuracy} on the calibration labels"
        if new_classes:
            why += f" with or without the new class(es) {', '.join(new_classes)}"
        why += "; nothing published (more labels of the confused classes, or a lower target)"
        return RetrainResult(False, f"the challenger's acceptance guarantee does not hold: {why}", challenger, metrics)
    if parts["heldout"]:
        allowed = max(champ["accepted_error"], 1 - a.target_accuracy)
        if chall["accepted_error"] > allowed:
            return RetrainResult(
                False,
                f"challenger accepted error {chall['accepted_error']} > allowed {allowed:.4f}",
                challenger,
                metrics,
            )
        if chall["accepted_correct"] < champ["accepted_correct"]:
            return RetrainResult(
                False,
                f"challenger accepts fewer held-out frames correctly ({chall['accepted_correct']} < "
                f"{champ['accepted_correct']})",
                challenger,
                metrics,
            )
    return RetrainResult(True, "not worse than the champion on held-out labels; guarantee holds", challenger, metrics)
