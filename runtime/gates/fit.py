"""Fitting a gate bundle from labelled folders. Plain numpy: runs on the station or on a device."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime.backends import Backend
from bouncer.runtime.errors import BouncerError, ImageError
from bouncer.runtime.gates.bundle import Acceptance, GateBundle
from bouncer.runtime.gates.calibration import expected_calibration_error, fit_temperature
from bouncer.runtime.gates.heads import (
    Fusion,
    LinearHead,
    candidate_inputs,
    fit_head,
    head_input,
    head_scores,
    input_key,
    l2n,
    softmax,
)
from bouncer.runtime.gates.quality import QualityGate, quality_stats
from bouncer.runtime.gates.risk import frames_needed, select_threshold
from bouncer.runtime.gates.select import candidate_specs, conformal_quantile, make_folds, select_heads
from bouncer.runtime.images import image_folder, read_bgr
from bouncer.runtime.modelcard import ModelCard
from bouncer.runtime.preprocess import Preprocessing, preprocess
from bouncer.runtime.sources.defects import synthesize

# The OOD heads and their fusion are chosen per line from its own known classes (gates/select.py);
# `--heads` names them instead.
BASELINE_HEAD = "maha:features"  # last-layer-only Mahalanobis, kept for `bouncer eval` to compare against
BATCH = 16
SYNTHETIC_MAX = 200  # synthetic defects made from calibration frames for head selection


@dataclass
class Extracted:
    """Backbone outputs and quality statistics of a set of images (unreadable ones left out)."""

    paths: list[Path]
    labels: np.ndarray
    outputs: dict[str, np.ndarray]
    stats: list[dict[str, float]]
    skipped: list[str]


def extract(
    backend: Backend,
    pp: Preprocessing,
    paths: Sequence[Path],
    labels: Sequence[int],
    sources: set[str],
    warn: Callable[[str], None] | None = None,
    alter: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Extracted:
    """Run the backbone over images in batches, keeping only the outputs the heads need. `alter` changes each
    image first (synthetic defects)."""
    kept, kept_labels, stats, skipped = [], [], [], []
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in sources}
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            out = backend.run(np.concatenate(pending))
            for s in sources:
                chunks[s].append(out[s])
            pending.clear()

    for path, label in zip(paths, labels, strict=True):
        try:
            img = read_bgr(path)
        except ImageError as exc:
            skipped.append(str(exc))
            if warn:
                warn(f"skipped {exc}")
            continue
        if alter is not None:
            img = alter(img)
        stats.append(quality_stats(img)[0])
        pending.append(preprocess(img, pp))
        kept.append(Path(path))
        kept_labels.append(label)
        if len(pending) == BATCH:
            flush()
    flush()
    outputs = {s: np.concatenate(v) if v else np.zeros((0,)) for s, v in chunks.items()}
    return Extracted(kept, np.asarray(kept_labels, np.int64), outputs, stats, skipped)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-2, iters: int = 400) -> LinearHead:
    """Multinomial logistic regression on standardised, l2-normalised features (Nesterov gradient descent).

    The standardisation is folded into the weights, so the device applies one matrix to l2n(features).
    """
    xn = l2n(x).astype(np.float64)
    mu, sd = xn.mean(0), xn.std(0) + 1e-6
    z = (xn - mu) / sd
    n, d = z.shape
    onehot = np.eye(n_classes)[y]
    lipschitz = 0.5 * np.linalg.norm(z, 2) ** 2 / n + l2
    step = 1.0 / lipschitz
    w = np.zeros((d, n_classes))
    b = np.zeros(n_classes)
    w_prev, b_prev = w.copy(), b.copy()
    for t in range(1, iters + 1):
        m = (t - 1) / (t + 2)
        wv, bv = w + m * (w - w_prev), b + m * (b - b_prev)
        g = softmax(z @ wv + bv) - onehot
        gw = z.T @ g / n + l2 * wv
        gb = g.mean(0)
        w_prev, b_prev = w, b
        w, b = wv - step * gw, bv - step * gb
    weight = (w / sd[:, None]).T
    bias = b - mu @ (w / sd[:, None])
    return LinearHead(weight=weight.astype(np.float32), bias=bias.astype(np.float32))


@dataclass
class FeatureSet:
    """What the gates are fitted from: per frame, the task features, each head's input vector (keyed by the
    head spec) and the quality statistics. The station keeps these (fp16 from the devices) and refits
    without running the backbone."""

    labels: np.ndarray  # N class indices
    features: np.ndarray  # N x D
    vectors: dict[str, np.ndarray]  # head spec -> N x ... (kNN: reduced vectors; Gaussian: the tap output)
    stats: list[dict[str, float]]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray | Sequence[int]) -> FeatureSet:
        i = np.asarray(idx, np.int64)
        return FeatureSet(
            self.labels[i], self.features[i], {k: v[i] for k, v in self.vectors.items()}, [self.stats[j] for j in i]
        )

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        parts = [p for p in parts if len(p)]
        keys = set.intersection(*(set(p.vectors) for p in parts))
        return FeatureSet(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.features for p in parts]).astype(np.float32),
            {k: np.concatenate([p.vectors[k] for p in parts]).astype(np.float32) for k in sorted(keys)},
            [s for p in parts for s in p.stats],
        )

    def save(self, path: Path) -> None:
        keys = sorted({k for s in self.stats for k in s})
        stats = np.array([[s.get(k, np.nan) for k in keys] for s in self.stats], np.float32).reshape(len(self), -1)
        arrays = {f"vec.{k}": v.astype(np.float16) for k, v in self.vectors.items()}
        np.savez(
            path,
            labels=self.labels,
            features=self.features.astype(np.float16),
            stats=stats,
            stat_keys=np.array(keys),
            **arrays,
        )

    @classmethod
    def load(cls, path: Path) -> FeatureSet:
        with np.load(path, allow_pickle=False) as z:
            keys = [str(k) for k in z["stat_keys"]]
            stats = [dict(zip(keys, map(float, row), strict=True)) for row in z["stats"]]
            vectors = {k[4:]: z[k].astype(np.float32) for k in z.files if k.startswith("vec.")}
            return cls(z["labels"].astype(np.int64), z["features"].astype(np.float32), vectors, stats)


def to_features(ex: Extracted, features: str, keys: Sequence[str]) -> FeatureSet:
    return FeatureSet(ex.labels, ex.outputs[features], {k: head_input(k, ex.outputs) for k in keys}, ex.stats)


def load_split(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    folders = image_folder(root)
    if classes is None:
        classes = sorted(folders)
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise BouncerError(f"{root}: classes {', '.join(unknown)} are not in the training set ({', '.join(classes)})")
    paths, labels = [], []
    for c in classes:
        for p in folders.get(c, []):
            paths.append(p)
            labels.append(classes.index(c))
    return classes, paths, labels


def check_targets(target_accuracy: float, delta: float) -> None:
    if not 0.5 <= target_accuracy < 1:
        raise BouncerError(f"--target-accuracy must be in [0.5, 1), got {target_accuracy}")
    if not 0 < delta < 1:
        raise BouncerError(f"--delta must be in (0, 1), got {delta}")


def fit_gate(
    backend: Backend,
    train_dir: Path,
    calib_dir: Path,
    target_accuracy: float = 0.99,
    delta: float = 0.1,
    ood_quantile: float = 0.99,
    heads: Sequence[str] | None = None,
    resize: str | None = None,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
    fusion: str | None = None,
    seed: int = 0,
) -> GateBundle:
    """Fit every part of a gate bundle. Calibration data only ever sets thresholds and the temperature.
    `heads=None` chooses the OOD heads from the line's own known classes (gates/select.py)."""
    say = log or (lambda m: print(m, file=sys.stderr))
    check_targets(target_accuracy, delta)
    card = backend.card
    pp = card.preprocessing
    if resize:
        pp = Preprocessing.from_dict({**pp.to_dict(), "resize": resize})
    classes, train_paths, train_labels = load_split(train_dir)
    if len(classes) == 1:
        say(f"one class ({classes[0]}): a one-class gate, where only the input gate and OOD heads decide")
    _, calib_paths, calib_labels = load_split(calib_dir, classes)
    keys = gate_inputs(card, heads)
    sources = {k.partition("@")[0] for k in keys}
    missing = sorted(s for s in sources if s not in card.output_names())
    if missing:
        raise BouncerError(f"{backend.path}: OOD heads need output(s) {', '.join(missing)} the model does not have")

    say(f"extracting features of {len(train_paths)} training and {len(calib_paths)} calibration images")
    train_ex = extract(backend, pp, train_paths, train_labels, sources, lambda m: say(f"train: {m}"))
    calib_ex = extract(backend, pp, calib_paths, calib_labels, sources, lambda m: say(f"calib: {m}"))
    train = to_features(train_ex, card.features, keys)
    calib = to_features(calib_ex, card.features, keys)
    counts = np.bincount(train.labels, minlength=len(classes))
    if (counts < 2).any():
        thin = [c for c, n in zip(classes, counts, strict=True) if n < 2]
        raise BouncerError(f"{train_dir}: need at least 2 readable training images per class, short: {', '.join(thin)}")
    pseudo = None
    if heads is None:
        pseudo = synthetic_defects(backend, pp, calib_ex.paths, sources, card.features, keys, seed)
        say(f"made {len(pseudo)} synthetic defects from calibration images for head selection")
    bundle = fit_from_features(
        train,
        calib,
        classes,
        card.model_hash,
        card.name,
        pp,
        target_accuracy,
        delta,
        ood_quantile,
        heads,
        version,
        say,
        where=str(calib_dir),
        fusion=fusion,
        pseudo=pseudo,
    )
    bundle.fit_metrics["skipped_unreadable"] = len(train_ex.skipped) + len(calib_ex.skipped)
    return bundle


def gate_inputs(card: ModelCard, heads: Sequence[str] | None) -> list[str]:
    """Input keys a fit needs: every candidate's when the heads are chosen, else the named heads' (and the
    task features, which the baseline head reads)."""
    keys = candidate_inputs(card) if heads is None else [input_key(h) for h in heads]
    explain = [f"{m}@max" for m in card.maps]  # the heatmap's input (fit picks one)
    return list(dict.fromkeys([card.features, *keys, *explain]))


def synthetic_defects(
    backend: Backend,
    pp: Preprocessing,
    paths: Sequence[Path],
    sources: set[str],
    features: str,
    keys: Sequence[str],
    seed: int,
) -> FeatureSet:
    """Backbone vectors of synthetic local defects on (up to SYNTHETIC_MAX of) the line's calibration images."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(paths))[:SYNTHETIC_MAX].tolist())
    chosen = [paths[i] for i in pick]
    ex = extract(backend, pp, chosen, [-1] * len(chosen), sources, alter=lambda img: synthesize(img, rng))
    return to_features(ex, features, keys)


def fit_from_features(
    train: FeatureSet,
    calib: FeatureSet,
    classes: list[str],
    backbone_hash: str,
    backbone_name: str,
    pp: Preprocessing,
    target_accuracy: float = 0.99,
    delta: float = 0.1,
    ood_quantile: float = 0.99,
    heads: Sequence[str] | None = None,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
    where: str = "calibration set",
    *,
    fusion: str | None = None,
    pseudo: FeatureSet | None = None,
) -> GateBundle:
    """The fit proper, from feature sets: `bouncer fit` after the backbone, and the station's retraining."""
    check_targets(target_accuracy, delta)
    say = log or (lambda m: print(m, file=sys.stderr))
    calib_dir = where
    quality = QualityGate.fit(train.stats)
    task = fit_logistic(train.features, train.labels, len(classes))
    q_ok = np.array([not quality.check(s) for s in calib.stats], bool)
    if heads is None:
        heads, method, selection = choose_heads(
            train, calib.take(np.flatnonzero(q_ok)), classes, pseudo, ood_quantile, say
        )
    else:
        method = fusion or "max"
        selection = {"rule": "named with --heads", "chosen": {"heads": list(heads), "fusion": method}}
    ood_heads = [fit_head(h, train.vectors[input_key(h)], train.labels) for h in heads]
    # the explainer: kNN on the channel maxima of the map with the most channels
    maxima = sorted((v.shape[1], k) for k, v in train.vectors.items() if k.endswith("@max"))
    explainer = fit_head(f"knn:{maxima[-1][1]}", train.vectors[maxima[-1][1]], train.labels) if maxima else None
    baseline = fit_head(BASELINE_HEAD, train.vectors[input_key(BASELINE_HEAD)], train.labels)
    names = list(heads)

    # Everything below is calibration: thresholds and temperature, never the training set.
    raw = np.stack([head_scores(h, calib.vectors[input_key(n)]) for h, n in zip(ood_heads, heads, strict=True)], 1)
    fusion_ = Fusion.fit(names, raw[q_ok] if q_ok.sum() >= 10 else raw, method)
    fused = fusion_.fuse(raw)
    ood_threshold = conformal_quantile(fused[q_ok], ood_quantile) if q_ok.any() else float("inf")
    logits = task.logits(calib.features)
    task.temperature = fit_temperature(logits, calib.labels)
    probs = softmax(logits / task.temperature)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == calib.labels
    passing = q_ok & (fused <= ood_threshold)
    sel = select_threshold(conf[passing], correct[passing], 1 - target_accuracy, delta)
    if sel.threshold is None and int(passing.sum()) < sel.frames_needed:
        raise BouncerError(
            f"{calib_dir}: calibration set too small for accuracy {target_accuracy} at delta {delta}: "
            f"need at least {sel.frames_needed} calibration frames passing the input gate (more if some are "
            f"misclassified), have {int(passing.sum())} of {len(calib)}"
        )
    if sel.threshold is None:
        say(
            f"warning: no confidence threshold reaches accuracy {target_accuracy} on the calibration set "
            "(too many confident mistakes); this gate auto-accepts nothing, every frame goes to review"
        )
    acceptance = Acceptance(
        threshold=sel.threshold,
        target_accuracy=target_accuracy,
        delta=delta,
        error_bound=sel.error_bound,
        n_calibration=sel.n_calibration,
        n_accepted=sel.n_accepted,
        n_errors=sel.n_errors,
        frames_needed=frames_needed(1 - target_accuracy, delta),
    )
    train_acc = float((task.logits(train.features).argmax(1) == train.labels).mean())
    fit_metrics: dict[str, Any] = {
        "train_images": len(train),
        "calibration_images": len(calib),
        "class_counts": dict(zip(classes, map(int, np.bincount(train.labels, minlength=len(classes))), strict=True)),
        "calibration_class_counts": dict(
            zip(classes, map(int, np.bincount(calib.labels[calib.labels >= 0], minlength=len(classes))), strict=True)
        ),
        "train_accuracy": round(train_acc, 4),
        "calibration_accuracy": round(float(correct.mean()), 4),
        "temperature": round(task.temperature, 4),
        "ece_before_scaling": round(expected_calibration_error(softmax(logits), calib.labels), 4),
        "ece_after_scaling": round(expected_calibration_error(probs, calib.labels), 4),
        "calibration_quality_rejects": int((~q_ok).sum()),
        "calibration_ood_flagged": int((q_ok & (fused > ood_threshold)).sum()),
        "calibration_coverage": round(
            float((passing & (conf >= sel.threshold)).mean()) if sel.threshold is not None else 0.0, 4
        ),
    }
    # spreads the drift monitor scales its noise floors by (docs/mqtt.md, runtime/drift.py)
    fit_metrics["drift_reference"] = {
        "brightness": round(float(np.std([st["mean"] for st in calib.stats])), 4),
        "sharpness": round(float(np.std(np.log([max(st["sharpness"], 1e-6) for st in calib.stats]))), 4),
        "ood_score": round(float(np.std(fused[q_ok])) if q_ok.any() else 1.0, 4),
    }
    base_scores = baseline.score(calib.vectors[input_key(BASELINE_HEAD)])
    baseline_threshold = conformal_quantile(base_scores[q_ok] if q_ok.any() else base_scores, ood_quantile)
    now = datetime.now(UTC)
    return GateBundle(
        version=version or now.strftime("%Y%m%d%H%M%S"),
        created=now.isoformat(timespec="seconds"),
        backbone_hash=backbone_hash,
        backbone_name=backbone_name,
        classes=classes,
        preprocessing=pp,
        quality=quality,
        task=task,
        ood_heads=ood_heads,
        fusion=fusion_,
        ood_threshold=ood_threshold,
        ood_quantile=ood_quantile,
        acceptance=acceptance,
        fit_metrics=fit_metrics,
        baseline=baseline,
        baseline_threshold=baseline_threshold,
        selection=selection,
        explainer=explainer,
    )


def choose_heads(
    train: FeatureSet,
    calib_ok: FeatureSet,
    classes: Sequence[str],
    pseudo: FeatureSet | None,
    quantile: float,
    say: Callable[[str], None],
) -> tuple[tuple[str, ...], str, dict[str, Any]]:
    """Heads and fusion chosen on held-out known classes (and synthetic defects), from the inputs every set has."""
    keys = (
        set(train.vectors) & set(calib_ok.vectors) & (set(pseudo.vectors) if pseudo is not None else set(train.vectors))
    )
    folds, notes = make_folds(
        train.labels,
        train.vectors,
        calib_ok.labels,
        calib_ok.vectors,
        classes,
        None if pseudo is None else pseudo.vectors,
        say,
    )
    heads, method, record = select_heads(folds, candidate_specs(sorted(keys)), quantile, say)
    record["notes"] = notes
    return heads, method, record
