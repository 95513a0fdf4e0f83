"""Retraining: the champion's training and calibration features plus the operators' labels -> a challenger
gate, compared with the champion on held-out labels, published only if it is not worse and its
acceptance guarantee holds. New defect types the operators named become classes."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.fit import FeatureSet, fit_from_features, input_key
from bouncer.runtime.gates.replay import score_against
from bouncer.station.store import Store, unpack_features

HELDOUT_EVERY = 5  # one labelled frame in five is held out to judge champion vs challenger
CALIB_EVERY = 3  # of the rest, one in three calibrates, two train


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

    def pseudo(self) -> FeatureSet | None:
        path = self.root / "pseudo.npz"
        return FeatureSet.load(path) if path.exists() else None


@dataclass
class RetrainResult:
    publish: bool
    reason: str
    challenger: GateBundle | None
    metrics: dict[str, Any] = field(default_factory=dict)


def split_of(frame_id: str) -> str:
    h = int(hashlib.sha256(frame_id.encode()).hexdigest()[:8], 16)
    if h % HELDOUT_EVERY == 0:
        return "heldout"
    return "calib" if (h // HELDOUT_EVERY) % CALIB_EVERY == 0 else "train"


def _featureset(rows: list[tuple[int, dict[str, np.ndarray], dict[str, float]]], features: str) -> FeatureSet:
    labels = np.array([r[0] for r in rows], np.int64)
    feats = np.stack([r[1][features] for r in rows]).astype(np.float32)
    keys = set.intersection(*(set(r[1]) for r in rows))
    vectors = {k: np.stack([r[1][k] for r in rows]).astype(np.float32) for k in keys}
    return FeatureSet(labels, feats, vectors, [r[2] for r in rows])


def retrain(
    store: Store, base: BaseData, champion: GateBundle, serial: int, group: str = "default", log=print
) -> RetrainResult:
    meta = base.meta
    features = meta["features"]
    needed = {features, *(input_key(h) for h in champion.fusion.names)}
    classes = list(champion.classes)
    parts: dict[str, list] = {"train": [], "calib": [], "heldout": []}
    truth: list[str | None] = []
    skipped = 0
    for frame_id, kind, label, quality, blob in store.labelled(champion.backbone_hash, group):
        feats = unpack_features(blob) if blob else {}
        if not needed <= set(feats):
            skipped += 1  # rejected before the backbone (quality gate): nothing to learn the heads from
            continue
        split = split_of(frame_id)
        if kind == "garbage":
            if split == "heldout":
                parts["heldout"].append((-1, feats, quality))
                truth.append(None)
            continue
        if label not in classes:
            classes.append(str(label))
        row = (classes.index(str(label)), feats, quality)
        parts[split].append(row)
        if split == "heldout":
            truth.append(str(label))
    new_classes = classes[len(champion.classes) :]
    base_train, base_calib = base.load()
    train = FeatureSet.concat([base_train, *([_featureset(parts["train"], features)] if parts["train"] else [])])
    calib = FeatureSet.concat([base_calib, *([_featureset(parts["calib"], features)] if parts["calib"] else [])])
    counts = np.bincount(train.labels, minlength=len(classes))
    thin = [c for c, n in zip(classes, counts, strict=True) if n < 2]
    metrics: dict[str, Any] = {
        "labelled_used": sum(len(v) for v in parts.values()),
        "labelled_without_features": skipped,
        "new_classes": new_classes,
        "split": {k: len(v) for k, v in parts.items()},
    }
    if not metrics["labelled_used"]:
        return RetrainResult(False, "no labelled frames with features yet", None, metrics)
    if thin:
        return RetrainResult(False, f"classes with fewer than 2 training frames: {', '.join(thin)}", None, metrics)
    version = f"s{serial}-{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"
    a = champion.acceptance
    try:
        challenger = fit_from_features(
            train, calib, classes, champion.backbone_hash, champion.backbone_name, champion.preprocessing,
            a.target_accuracy, a.delta, champion.ood_quantile, None, version, log, where="calibration features",
            pseudo=base.pseudo(),
        )  # fmt: skip
    except BouncerError as exc:
        return RetrainResult(False, f"fit failed: {exc}", None, metrics)
    if parts["heldout"]:
        held = _featureset(parts["heldout"], features)
        champ, chall = score_against(champion, held, truth), score_against(challenger, held, truth)
    else:
        champ = chall = {"frames": 0}
    metrics |= {"champion": {"version": champion.version, **champ}, "challenger": {"version": version, **chall}}
    # the guarantee is pooled over all classes; a new class with few labelled calibration frames rides on the
    # others: say how many more labels would let each stand on its own (1 in 5 labels is held out, 1 in 3 of
    # the rest calibrates: 3.75 labels per calibration frame)
    counts = challenger.fit_metrics.get("calibration_class_counts") or {}
    need = challenger.acceptance.frames_needed
    metrics["labels_needed"] = {
        c: math.ceil(max(need - counts.get(c, 0), 0) * HELDOUT_EVERY / (HELDOUT_EVERY - 1) * CALIB_EVERY)
        for c in new_classes
    }
    challenger.fit_metrics["retrain"] = metrics
    if challenger.acceptance.threshold is None:
        return RetrainResult(False, "the challenger's acceptance guarantee does not hold", challenger, metrics)
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
