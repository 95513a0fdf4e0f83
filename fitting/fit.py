"""Fitting a gate bundle from labelled folders. Plain numpy: runs on the station or on a device."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.fitting.acceptance import Selection, select_threshold, window_exceedance
from bouncer.fitting.calibration import expected_calibration_error, fit_temperature
from bouncer.fitting.defects import synthesize
from bouncer.fitting.operating import DEFAULT_BUDGET, FoldScores, check_budget, describe
from bouncer.fitting.select import (
    HEAD_BUDGET,
    candidate_specs,
    conformal_quantile,
    fold_scores,
    make_folds,
    select_heads,
)
from bouncer.fitting.stages import acceptance, assemble, fit_input_gate, fit_quality
from bouncer.runtime.backends import Backend
from bouncer.runtime.backends.paired import PREFIX
from bouncer.runtime.errors import BouncerError, ImageError
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.decision import rule
from bouncer.runtime.gates.heads import (
    GaussianHead,
    KnnHead,
    LinearHead,
    candidate_inputs,
    fit_head,
    head_input,
    input_key,
    input_sources,
    l2n,
    softmax,
    tile_output,
)
from bouncer.runtime.gates.quality import quality_stats
from bouncer.runtime.gates.risk import clopper_pearson_upper, frames_needed
from bouncer.runtime.gates.tasks import TASK_OF_CARD, AnomalyScore, TaskHead, UserScores, check_scores
from bouncer.runtime.images import image_folder, read_bgr
from bouncer.runtime.modelcard import ModelCard
from bouncer.runtime.preprocess import Preprocessing, preprocess
from bouncer.runtime.tiles import Tiling, resolve_tiling

# The OOD heads and their fusion are chosen per line from its own known classes (fitting/select.py);
# `--heads` names them instead.
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
    sizes: list[tuple[int, int]] = field(default_factory=list)  # each kept image's width and height

    def take(self, idx: Sequence[int] | np.ndarray) -> Extracted:
        idx = [int(i) for i in idx]
        return Extracted([self.paths[i] for i in idx], self.labels[idx], {k: v[idx] for k, v in self.outputs.items()},
                         [self.stats[i] for i in idx], [], [self.sizes[i] for i in idx])  # fmt: skip


def extract(
    backend: Backend,
    pp: Preprocessing,
    paths: Sequence[Path],
    labels: Sequence[int],
    sources: set[str],
    warn: Callable[[str], None] | None = None,
    alter: Callable[[np.ndarray], np.ndarray] | None = None,
    tiling: Tiling | None = None,
    tile_sources: Iterable[str] = (),
) -> Extracted:
    """Run the backbone over images in batches, keeping only the outputs the heads need. `alter` changes each
    image first (synthetic defects). With a tiling, each image's tiles go through the backbone too, and
    `tiles:OUTPUT` (N x tiles x ...) holds the `tile_sources` outputs on them."""
    kept, kept_labels, stats, skipped, sizes = [], [], [], [], []
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in sources}
    tiled = sorted(tile_sources) if tiling is not None else []
    tile_chunks: dict[str, list[np.ndarray]] = {s: [] for s in tiled}
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
        sizes.append((img.shape[1], img.shape[0]))
        pending.append(preprocess(img, pp))
        if tiled:
            assert tiling is not None
            out = backend.run(np.concatenate([preprocess(c, pp) for c in tiling.crops(img)]))
            for s in tiled:
                tile_chunks[s].append(out[s][None])
        kept.append(Path(path))
        kept_labels.append(label)
        if len(pending) == BATCH:
            flush()
    flush()
    outputs = {s: np.concatenate(v) if v else np.zeros((0,)) for s, v in chunks.items()}
    outputs |= {tile_output(s): np.concatenate(v) if v else np.zeros((0, 1, 1)) for s, v in tile_chunks.items()}
    return Extracted(kept, np.asarray(kept_labels, np.int64), outputs, stats, skipped, sizes)


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

    def restrict(self, classes: Sequence[str], names: Sequence[str]) -> FeatureSet:
        """The frames of the classes in `names` (labels index `classes`), relabelled to index `names`."""
        part = self.take(np.flatnonzero(np.isin(self.labels, [list(classes).index(c) for c in names])))
        part.labels = np.array([list(names).index(classes[y]) for y in part.labels], np.int64)
        return part

    def only(self, keys: Iterable[str]) -> FeatureSet:
        """The same frames with only the head inputs in `keys` (what head selection may choose from)."""
        keep = set(keys)
        return FeatureSet(self.labels, self.features, {k: v for k, v in self.vectors.items() if k in keep}, self.stats)

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
            **arrays,  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
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
    review_budget: float = DEFAULT_BUDGET,
    heads: Sequence[str] | None = None,
    resize: str | None = None,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
    fusion: str | None = None,
    seed: int = 0,
    false_alarm: float = 0.01,
    target_catch: float | None = None,
    defects_dir: Path | None = None,
    head_budget: int = HEAD_BUDGET,
    tiles: str = "off",
) -> GateBundle:
    """Fit every part of a gate bundle. Calibration data only ever sets thresholds and the temperature.
    `heads=None` chooses the OOD heads from the line's own known classes (fitting/select.py). `backend` may be a
    user's model paired with Bouncer's backbone (runtime/backends/paired.py). `defects_dir`: labelled-bad frames
    (any sub-folders), a pseudo-unknown fold for head selection and the operating point's catch estimate."""
    from bouncer.runtime.backends.paired import PairedBackend

    say = log or (lambda m: print(m, file=sys.stderr))
    # checked here, before minutes of feature extraction
    settings = FitSettings(target_accuracy, delta, review_budget, None if heads is None else tuple(heads), fusion,
                           seed, false_alarm, target_catch, head_budget, tiles)  # fmt: skip
    defect_paths = defect_images(defects_dir) if defects_dir is not None else None
    card = backend.card
    if card.task == "detector":
        from bouncer.fitting.detector import fit_detector_gate

        return fit_detector_gate(backend, train_dir, calib_dir, settings, version, say)
    sidecar = backend.sidecar.card if isinstance(backend, PairedBackend) else None
    pp = card.preprocessing
    if resize:
        pp = Preprocessing.from_dict({**pp.to_dict(), "resize": resize})
    classes, train_paths, train_labels, calib_paths, calib_labels = task_splits(card, train_dir, calib_dir, say)
    sizes = frame_sizes(train_paths)
    tiling = resolve_tiling(tiles, sizes, pp.width, pp.height)
    keys = gate_inputs(card, heads, head_budget, tiling is not None)
    tile_sources = {s for k in keys if k.endswith("@tiles") for s in input_sources(k)}
    if tiling is not None:
        say(f"tiles {tiling}: tile heads are candidates, {tiling.count} tiles per frame, one backbone call each, "
            "should head selection choose them")  # fmt: skip
    elif tiles == "off" and (grid := resolve_tiling("auto", sizes, pp.width, pp.height)) is not None:
        say(f"the line's frames are at least twice the backbone input on both sides: defects a few pixels wide may "
            f"vanish when a frame is shrunk whole; --tiles auto makes tile heads ({grid}) candidates, at "
            f"{grid.count} more backbone calls per frame")  # fmt: skip
    elif tiles == "auto" and tiling is None:
        say("tiles: none (the line's frames are less than twice the backbone input on a side; --tiles ROWSxCOLS)")
    sources = {s for k in keys for s in input_sources(k)} | {card.task_input}
    missing = sorted(s for s in sources if s not in card.output_names())
    if missing:
        raise BouncerError(
            f"{backend.path}: OOD heads need output(s) {', '.join(missing)} the model does not have "
            f"(it gives: {', '.join(card.output_names())})"
        )

    say(f"extracting features of {len(train_paths)} training and {len(calib_paths)} calibration images")

    def run(paths: Sequence[Path], labels: Sequence[int], what: str) -> Extracted:
        return extract(backend, pp, paths, labels, sources, lambda m: say(f"{what}: {m}"), tiling=tiling,
                       tile_sources=tile_sources)  # fmt: skip

    train_ex = run(train_paths, train_labels, "train")
    calib_ex = run(calib_paths, calib_labels, "calib")
    train = to_features(train_ex, card.task_input, keys)
    calib = to_features(calib_ex, card.task_input, keys)
    counts = np.bincount(train.labels, minlength=len(classes))
    if ((counts < 2) & (counts > 0 if card.task == "classifier" else True)).any():
        thin = [c for c, n in zip(classes, counts, strict=True) if n < 2]
        raise BouncerError(f"{train_dir}: need at least 2 readable training images per class, short: {', '.join(thin)}")
    pseudo = synthetic_defects(backend, pp, calib_ex.paths, sources, card.task_input, keys, seed, tiling, tile_sources)
    say(f"made {len(pseudo)} synthetic defects from calibration images for head selection and the operating point")
    defects = None
    if defect_paths is not None:
        dex = run(defect_paths, [-1] * len(defect_paths), "defects")
        if len(dex.paths) == 0:
            raise BouncerError(f"{defects_dir}: none of {len(defect_paths)} defect images is readable")
        defects = to_features(dex, card.task_input, keys)
        say(f"{len(defects)} real defective frames from {defects_dir}")
    bundle = fit_from_features(
        train, calib, classes, settings, backbone_hash=card.model_hash, backbone_name=card.name, preprocessing=pp,
        version=version, log=say, where=str(calib_dir), pseudo=pseudo, role=ModelRole.of_card(card, sidecar),
        defects=defects, tiling=tiling,
    )  # fmt: skip
    bundle.fit_metrics["skipped_unreadable"] = len(train_ex.skipped) + len(calib_ex.skipped)
    return bundle


def defect_images(root: Path) -> list[Path]:
    """Every image under a folder of labelled-bad frames (its sub-folders may name defect types)."""
    from bouncer.runtime.images import iter_image_paths

    if not Path(root).is_dir():
        raise BouncerError(f"--defects {root}: not a folder")
    paths = sorted(iter_image_paths([str(root)]))
    if not paths:
        raise BouncerError(f"--defects {root}: no images in it")
    return paths


def gate_inputs(
    card: ModelCard, heads: Sequence[str] | None, head_budget: int = HEAD_BUDGET, tiled: bool = False
) -> list[str]:
    """Input keys a fit needs: every candidate's when the heads are chosen, else the named heads' (and the
    task features, which the baseline head reads). Patch grids (each map alone and all joined) join the
    candidates only where the head budget is raised above the default: they are large, and costly to score.
    With a tiling, the pooled inputs on each tile are candidates too (`OUTPUT@tiles`)."""
    if heads is None:
        keys = candidate_inputs(card)
        if tiled:
            keys += [f"{k}@tiles" for k in keys if "@" not in k]
        if head_budget > HEAD_BUDGET and card.maps:
            keys += [f"{m}@patch" for m in card.maps] + ([f"{'+'.join(card.maps)}@patch"] if len(card.maps) > 1 else [])
    else:
        keys = [input_key(h) for h in heads]
        if any(k.endswith("@tiles") for k in keys) and not tiled:
            raise BouncerError("tile heads (@tiles) need a tiling: --tiles ROWSxCOLS, or auto on frames at least "
                               "twice the backbone input")  # fmt: skip
    explain = [f"{m}@max" for m in card.maps]  # the heatmap's input (fit picks one)
    side = f"{PREFIX}features"  # the baseline head's input when the user's model has no features
    base = [card.features] if card.features else [side] if side in card.output_names() else []
    return list(dict.fromkeys([*base, *keys, *explain]))


def task_splits(
    card: ModelCard, train_dir: Path, calib_dir: Path, say: Callable[[str], None]
) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """Classes and labelled paths for the model's task. Bouncer's classifier: the training folders' classes. A
    user's classifier: its card's classes (the folders must use those names). An anomaly model: one training
    folder of good frames; calibration frames in any other folder are defective (label -1)."""
    if card.task == "classifier":
        classes, train_paths, train_labels = load_split(train_dir, list(card.classes))
        _, calib_paths, calib_labels = load_split(calib_dir, classes)
        return classes, train_paths, train_labels, calib_paths, calib_labels
    classes, train_paths, train_labels = load_split(train_dir)
    if card.task == "anomaly":
        if len(classes) != 1:
            raise BouncerError(f"{train_dir}: an anomaly model's training folder holds one class of good frames, "
                               f"found {', '.join(classes)}")  # fmt: skip
        calib_classes, calib_paths, labels = load_split(calib_dir)
        if classes[0] not in calib_classes:
            raise BouncerError(f"{calib_dir}: no {classes[0]}/ folder of good calibration frames")
        good = calib_classes.index(classes[0])
        defective = [c for c in calib_classes if c != classes[0]]
        say(f"anomaly model: good = {classes[0]}, defective calibration folders: {', '.join(defective) or 'none'}")
        return classes, train_paths, train_labels, calib_paths, [0 if y == good else -1 for y in labels]
    if len(classes) == 1:
        say(f"one class ({classes[0]}): a one-class gate, where only the input gate and OOD heads decide")
    _, calib_paths, calib_labels = load_split(calib_dir, classes)
    return classes, train_paths, train_labels, calib_paths, calib_labels


def synthetic_defects(
    backend: Backend,
    pp: Preprocessing,
    paths: Sequence[Path],
    sources: set[str],
    features: str,
    keys: Sequence[str],
    seed: int,
    tiling: Tiling | None = None,
    tile_sources: Iterable[str] = (),
) -> FeatureSet:
    """Backbone vectors of synthetic local defects on (up to SYNTHETIC_MAX of) the line's calibration images.
    With a tiling, every other defect is made at a tile's scale, inside one tile: the small defects a large frame
    hides when it is shrunk whole (without them, selection could not see what the tiles are for)."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(paths))[:SYNTHETIC_MAX].tolist())
    chosen = [paths[i] for i in pick]
    made = iter(range(len(chosen) * 2))

    def alter(img: np.ndarray) -> np.ndarray:
        if tiling is None or next(made) % 2 == 0:
            return synthesize(img, rng)
        x1, y1, x2, y2 = tiling.rects(img.shape[1], img.shape[0])[int(rng.integers(tiling.count))]
        out = img.copy()
        out[y1:y2, x1:x2] = synthesize(np.ascontiguousarray(img[y1:y2, x1:x2]), rng)
        return out

    ex = extract(backend, pp, chosen, [-1] * len(chosen), sources, alter=alter, tiling=tiling,
                 tile_sources=tile_sources)  # fmt: skip
    return to_features(ex, features, keys)


def frame_sizes(paths: Sequence[Path], n: int = 25) -> list[tuple[int, int]]:
    """Width and height of up to n of the images (spread over the list), for choosing a tiling."""
    step = max(1, len(paths) // n)
    sizes = []
    for p in list(paths)[::step][:n]:
        try:
            img = read_bgr(p)
        except ImageError:
            continue
        sizes.append((img.shape[1], img.shape[0]))
    return sizes


@dataclass(frozen=True)
class FitSettings:
    """What a fit is asked for. Stored in the bundle (`fit_settings`), so a gate says how it was made and a
    retraining asks for the same (with the heads chosen again)."""

    target_accuracy: float = 0.99
    delta: float = 0.1
    # share of good frames the OOD gate may send to review, certified at delta (fitting/operating.py)
    review_budget: float = DEFAULT_BUDGET
    heads: tuple[str, ...] | None = None  # None: chosen per line (fitting/select.py)
    fusion: str | None = None  # with named heads; default max
    seed: int = 0  # synthetic defects for head selection
    false_alarm: float = 0.01  # anomaly gates: good frames flagged at most this often (conformal)
    target_catch: float | None = None  # the lowest flag rate within the budget estimated to catch this share
    head_budget: int = HEAD_BUDGET  # elements one frame's chosen heads may stream (fitting/select.py)
    tiles: str = "off"  # off, auto or ROWSxCOLS: tile heads as candidates (runtime/tiles.py)

    def __post_init__(self) -> None:
        from bouncer.runtime.tiles import parse_tiles

        parse_tiles(self.tiles)
        check_targets(self.target_accuracy, self.delta)
        check_budget(self.review_budget, self.target_catch)
        if self.head_budget < 1:
            raise BouncerError(f"--head-budget must be a positive number of elements, got {self.head_budget}")
        if not 0 < self.false_alarm < 0.5:
            raise BouncerError(f"--false-alarm must be in (0, 0.5), got {self.false_alarm}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "heads": None if self.heads is None else list(self.heads)}

    @classmethod
    def of(cls, bundle: GateBundle, heads: Sequence[str] | None = None) -> FitSettings:
        """A retraining's settings: the bundle's own (older bundles: from their acceptance), heads chosen again."""
        keep = {"target_accuracy", "delta", "seed", "false_alarm", "review_budget", "target_catch", "head_budget"}
        s = {k: v for k, v in bundle.fit_settings.items() if k in keep}
        a = bundle.acceptance
        # gates made before the review budget flagged 1 - ood_quantile of good calibration frames
        budget = round(min(max(1 - bundle.ood_quantile, 1e-4), 0.5), 6)
        return cls(**{"target_accuracy": a.target_accuracy, "delta": a.delta, "review_budget": budget, **s},
                   heads=None if heads is None else tuple(heads))  # fmt: skip


@dataclass(frozen=True)
class ModelRole:
    """What the gate wraps: Bouncer's own classifier on the backbone ("linear"), the user's classifier
    ("scores") or the user's anomaly model ("anomaly"); which input the baseline head reads; the sidecar."""

    kind: str = "linear"
    score_kind: str = "logits"
    baseline_input: str = "features"
    sidecar: dict[str, str] | None = None

    @classmethod
    def of_card(cls, card: ModelCard, sidecar: ModelCard | None = None) -> ModelRole:
        base = card.features or (f"{PREFIX}{sidecar.features}" if sidecar is not None and sidecar.features else "")
        side = None if sidecar is None else {"name": sidecar.name, "hash": sidecar.model_hash}
        return cls(TASK_OF_CARD[card.task], card.score_kind, base, side)

    @classmethod
    def of_bundle(cls, bundle: GateBundle) -> ModelRole:
        meta = bundle.task.meta()
        base = bundle.baseline.source if bundle.baseline is not None else ""
        return cls(meta["kind"], meta.get("score_kind", "logits"), base, bundle.sidecar)


@dataclass
class TaskFit:
    """The fitted task head and what it says about each calibration frame."""

    task: TaskHead
    confidence: np.ndarray
    correct: np.ndarray
    metrics: dict[str, Any]


def fit_task(
    role: ModelRole, train: FeatureSet, calib: FeatureSet, classes: Sequence[str], q_ok: np.ndarray
) -> TaskFit:
    """Bouncer's classifier is trained on the training frames; a user's model is frozen, and only its confidence is
    calibrated (temperature, or the anomaly score's p-value against good calibration frames)."""
    if role.kind == "anomaly":
        good = calib.labels == 0
        ref = good & q_ok
        if ref.sum() < 10:
            raise BouncerError(f"an anomaly gate needs at least 10 good calibration frames passing the quality gate, "
                               f"have {int(ref.sum())}")  # fmt: skip
        s = calib.features.reshape(len(calib), -1)[:, 0].astype(np.float64)
        if not np.isfinite(s).all():
            raise BouncerError(f"calibration frames: {int((~np.isfinite(s)).sum())} of {len(s)} anomaly scores are "
                               "NaN or infinite")  # fmt: skip
        anomaly = AnomalyScore(s[ref])
        conf = anomaly.pvalues(s)
        order = np.argsort(s[ref], kind="stable")  # each reference frame against the others
        loo = np.empty(int(ref.sum()))
        loo[order] = anomaly.loo_pvalues()
        conf[np.flatnonzero(ref)] = loo
        return TaskFit(anomaly, conf, good, {"anomaly_reference_frames": int(ref.sum())})
    task: UserScores | LinearHead
    if role.kind == "scores":
        check_scores(calib.features, role.score_kind, len(classes), "calibration frames")
        check_scores(train.features, role.score_kind, len(classes), "training frames")
        task = UserScores(role.score_kind, len(classes))
    else:
        task = fit_logistic(train.features, train.labels, len(classes))
    logits = task.logits(calib.features)
    raw_probs = softmax(logits)
    task.temperature = fit_temperature(logits, calib.labels)
    train_acc = float((task.logits(train.features).argmax(1) == train.labels).mean())
    probs = softmax(logits / task.temperature)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == calib.labels
    return TaskFit(task, conf, correct, {
        "train_accuracy": round(train_acc, 4),
        "calibration_accuracy": round(float(correct.mean()), 4),
        "temperature": round(task.temperature, 4),
        "ece_before_scaling": round(expected_calibration_error(raw_probs, calib.labels), 4),
        "ece_after_scaling": round(expected_calibration_error(probs, calib.labels), 4),
    })  # fmt: skip


def anomaly_threshold(
    task: AnomalyScore,
    scores: np.ndarray,
    conf: np.ndarray,
    good: np.ndarray,
    passing: np.ndarray,
    settings: FitSettings,
) -> tuple[float | None, Selection, dict[str, Any]]:
    """The p-value a frame needs to be accepted as good.

    False alarms: the threshold flags at most k of the n good calibration frames passing the input gate, k the
    largest for which more than false_alarm * n of the next n good frames score above it with probability at most
    delta (fitting/acceptance.py `window_exceedance`, exact and distribution-free): the rate an operator observes
    over a window as long as the calibration set stays within `false_alarm`, not only the true rate. Where labelled
    defective frames exist, delta is split in two and Learn-then-Test finds the lowest threshold whose accepted
    frames miss at most 1 - target; when that is stricter than the false-alarm threshold, the miss rate wins (a
    defect passed as good costs more than a second look) and the card states the false-alarm rate that results."""
    alpha, target = settings.false_alarm, settings.target_accuracy
    defects = int((~good).sum())  # labelled; those the input gate flags are never accepted, and count as such
    d_fa = settings.delta / 2 if defects else settings.delta
    ok = np.sort(scores[good & passing])[::-1]
    n = len(ok)
    allowed = int(np.floor(alpha * n))  # false alarms allowed in a window of n good frames
    if n < 2 or window_exceedance(0, n, n, allowed) > d_fa:
        raise BouncerError(
            f"a false-alarm rate of {alpha} at delta {settings.delta} needs more good calibration frames passing "
            f"the input gate than {n} (about {2 * frames_needed(alpha, d_fa)})"
        )
    k = 0
    while k + 1 < n and window_exceedance(k + 1, n, n, allowed) <= d_fa:
        k += 1
    at_least = len(task.reference) - np.searchsorted(task.reference, ok[k], side="left")
    t_fa = float((at_least + 0.5) / (len(task.reference) + 1))  # p >= t_fa  <=>  score <= the (k+1)-th largest
    sel = select_threshold(conf[passing], good[passing], 1 - target, settings.delta / 2)
    if not defects:
        threshold: float | None = t_fa
    elif sel.threshold is None:
        threshold = None
    else:
        threshold = max(t_fa, float(sel.threshold))
    acc = passing & (conf >= threshold) if threshold is not None else np.zeros_like(passing)
    # the deployed p-value (each frame counted in the reference) flags exactly the k frames above the threshold
    flagged = int((good & passing & (task.pvalues(scores) < threshold)).sum()) if threshold is not None else n
    sel = replace(sel, threshold=threshold, n_accepted=int(acc.sum()), n_errors=int((acc & ~good).sum()),
                  error_bound=sel.error_bound if defects else None)  # fmt: skip
    bound = clopper_pearson_upper(flagged, n, d_fa)
    info = {
        "false_alarm_target": alpha,
        "false_alarm_bound": round(bound, 4),  # with probability 1 - false_alarm_delta
        "false_alarm_met": bool(bound <= alpha + 1e-9),
        "false_alarm_delta": d_fa,
        "good_calibration_frames": n,
        "good_calibration_flagged": flagged,
        "defective_calibration_frames": defects,
        "defective_flagged_by_input_gate": int((~good & ~passing).sum()),
        "miss_rate_certified": bool(defects) and threshold is not None,
        "observed_false_alarm": round(flagged / n, 4),
        "observed_miss_rate": round(float((~good[acc]).mean()), 4) if acc.any() else None,
        "basis": f"good frames flagged by the anomaly score: at most {alpha} of any {n} in a row with probability "
        f">= {1 - d_fa:.3g} (true rate <= {bound:.4g}; {n} good calibration frames, {flagged} flagged)"
        + (f"; misses among accepted <= {1 - target:.3g} with probability >= {1 - settings.delta / 2:.3g} "
           f"(Learn-then-Test, {defects} defective calibration frames)" if defects and threshold is not None
           else f"; no threshold keeps the misses among accepted <= {1 - target:.3g} on {defects} defective "
           "calibration frames: nothing is auto-accepted" if defects
           else "; no labelled defective calibration frames, so the misses among accepted frames are not certified"),
    }  # fmt: skip
    return threshold, sel, info


def fit_from_features(
    train: FeatureSet,
    calib: FeatureSet,
    classes: list[str],
    settings: FitSettings,
    *,
    backbone_hash: str,
    backbone_name: str,
    preprocessing: Preprocessing,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
    where: str = "calibration set",
    pseudo: FeatureSet | None = None,
    role: ModelRole | None = None,
    defects: FeatureSet | None = None,
    tiling: Tiling | None = None,
) -> GateBundle:
    """The fit proper, from feature sets: `bouncer fit` after the model, and the station's retraining. `features`
    of the sets is what the task head reads (role.kind: backbone features, the user's scores or anomaly score);
    an anomaly gate's calibration frames are labelled 0 (good) or -1 (defective). `pseudo` (synthetic defects) and
    `defects` (real defective frames) are pseudo-unknowns: they choose heads and estimate the catch curve."""
    role = role or ModelRole()
    target_accuracy, delta = settings.target_accuracy, settings.delta
    # heads are judged at the strict end, the budget or 1% of good frames flagged if that is less: judged at a 5%
    # budget's own rate the chosen mix lost to last-layer Mahalanobis on the multi-class tiles, judged at 1% it won
    # (0.081 against 0.090 accepted error at 50% coverage, same run); the threshold is then set at the budget
    select_q = 1 - min(settings.review_budget, 0.01)
    heads, fusion, pp = settings.heads, settings.fusion, preprocessing
    say = log or (lambda m: print(m, file=sys.stderr))
    calib_dir = where
    quality, q_ok = fit_quality(train.stats, calib.stats)
    known = calib.labels >= 0  # an anomaly gate's defective frames set no OOD threshold
    # OOD heads model the classes the line has frames of (a user's classifier may know more)
    present, ood_labels = np.unique(train.labels, return_inverse=True)
    ood_train = FeatureSet(ood_labels.astype(np.int64), train.features, train.vectors, train.stats)
    ood_classes = [classes[i] for i in present]
    calib_ok = calib.take(np.flatnonzero(q_ok & known))
    calib_ok.labels = np.searchsorted(present, calib_ok.labels)
    restricted = heads is None and role.kind == "scores" and role.sidecar is not None
    if heads is None:
        if restricted:
            # A classifier trained on every known class separates each of them: folds that hold one out cannot
            # judge its embedding (it has seen the "unknown"), and pick it over what generalises. With a
            # sidecar beside it, heads are chosen among the sidecar's inputs; --sidecar none keeps the model's.
            side = {k for k in ood_train.vectors if k.startswith(PREFIX)}
            ood_train, calib_ok = ood_train.only(side), calib_ok.only(side)
            pseudo = None if pseudo is None else pseudo.only(side)
            defects = None if defects is None else defects.only(side)
        heads, method, selection, folds = choose_heads(ood_train, calib_ok, ood_classes, pseudo, select_q, say,
                                                       defects, settings.head_budget)  # fmt: skip
        if restricted:
            selection.setdefault("notes", []).append(
                "the user's classifier has seen every known class, so held-out-class folds cannot judge its "
                "own features: heads chosen among the sidecar's inputs"
            )
    else:
        method = fusion or "max"
        selection = {"rule": "named with --heads", "chosen": {"heads": list(heads), "fusion": method}}
        folds = named_folds(ood_train, calib_ok, ood_classes, pseudo, defects, heads, method)
    missing = sorted({input_key(h) for h in heads} - set(train.vectors))
    if missing:
        raise BouncerError(f"OOD heads need input(s) {', '.join(missing)} the model does not give "
                           f"(has: {', '.join(sorted(train.vectors))})")  # fmt: skip
    if tiling is not None and any(input_key(h).endswith("@tiles") for h in heads):
        say(f"tile heads chosen: each frame costs {tiling.count} more backbone calls ({tiling} tiles)")
        selection["tiles"] = {**tiling.to_dict(), "backbone_calls_per_frame": 1 + tiling.count}
    selection["reads"] = sorted({"sidecar" if input_key(h).startswith(PREFIX) else "model" for h in heads})
    ood_heads = [fit_head(h, train.vectors[input_key(h)], ood_labels) for h in heads]
    # the explainer: kNN on the channel maxima of the map with the most channels
    maxima = sorted((v.shape[1], k) for k, v in train.vectors.items() if k.endswith("@max"))
    explainer = fit_head(f"knn:{maxima[-1][1]}", train.vectors[maxima[-1][1]], ood_labels) if maxima else None
    baseline = (
        fit_head(f"maha:{role.baseline_input}", train.vectors[role.baseline_input], ood_labels)
        if role.baseline_input in train.vectors else None
    )  # fmt: skip
    assert baseline is None or isinstance(baseline, GaussianHead)
    assert explainer is None or isinstance(explainer, KnnHead)
    names = list(heads)

    # Everything below is calibration: thresholds and temperature, never the training set.
    raw = np.stack([h.score_vectors(calib.vectors[h.input_key]) for h in ood_heads], 1)
    tf = fit_task(role, train, calib, classes, q_ok)  # before the operating point: a model at odds with its card
    gate = fit_input_gate(quality, q_ok, known, raw, names, method, folds, settings.review_budget,
                          settings.target_catch, delta)  # fmt: skip
    say(describe(gate.op.record))
    task, conf, correct = tf.task, tf.confidence, tf.correct
    passing = gate.passing(conf)  # the input gate; confidence comes next
    sel = select_threshold(conf[passing], correct[passing], 1 - target_accuracy, delta)
    anomaly: dict[str, Any] = {}
    if role.kind == "anomaly":
        assert isinstance(task, AnomalyScore)
        scores = calib.features.reshape(len(calib), -1)[:, 0].astype(np.float64)
        _, sel, anomaly = anomaly_threshold(task, scores, conf, correct, passing, settings)
    elif sel.threshold is None and int(passing.sum()) < sel.frames_needed:
        raise BouncerError(
            f"{calib_dir}: calibration set too small for accuracy {target_accuracy} at delta {delta}: "
            f"need at least {sel.frames_needed} calibration frames passing the input gate (more if some are "
            f"misclassified), have {int(passing.sum())} of {len(calib)} ({int((~q_ok).sum())} rejected by the quality "
            f"gate, {int((q_ok & ~passing).sum())} flagged at review budget {settings.review_budget})"
        )
    if sel.threshold is None:
        say(
            f"warning: no confidence threshold reaches accuracy {target_accuracy} on the calibration set "
            "(too many confident mistakes); this gate auto-accepts nothing, every frame goes to review"
        )
    covered = rule(q_ok, conf, gate.fused, gate.op.threshold, sel.threshold).accepted
    fit_metrics: dict[str, Any] = {
        "train_images": len(train),
        "calibration_images": len(calib),
        "class_counts": dict(zip(classes, map(int, np.bincount(train.labels, minlength=len(classes))), strict=True)),
        "calibration_class_counts": dict(
            zip(classes, map(int, np.bincount(calib.labels[calib.labels >= 0], minlength=len(classes))), strict=True)
        ),
        **tf.metrics,
        **gate.metrics(passing, calib.stats),
        "calibration_coverage": round(float(covered.mean()), 4),
    }
    if anomaly:
        fit_metrics["anomaly"] = anomaly
    baseline_threshold = None
    if baseline is not None:
        base_scores = baseline.score_vectors(calib.vectors[baseline.input_key])
        baseline_threshold = conformal_quantile(base_scores[gate.reference], 1 - gate.op.rate)
    return assemble(
        gate, backbone_hash=backbone_hash, backbone_name=backbone_name, classes=classes, preprocessing=pp, task=task,
        ood_heads=ood_heads, accept=acceptance(sel, target_accuracy, delta), fit_metrics=fit_metrics,
        selection=selection, fit_settings=settings.to_dict(), sidecar=role.sidecar, version=version,
        baseline=baseline, baseline_threshold=baseline_threshold, explainer=explainer,
        tiling=tiling if any(input_key(h).endswith("@tiles") for h in heads) else None,
    )  # fmt: skip


def choose_heads(
    train: FeatureSet,
    calib_ok: FeatureSet,
    classes: Sequence[str],
    pseudo: FeatureSet | None,
    quantile: float,
    say: Callable[[str], None],
    defects: FeatureSet | None = None,
    head_budget: int = HEAD_BUDGET,
) -> tuple[tuple[str, ...], str, dict[str, Any], list[FoldScores]]:
    """Heads and fusion chosen on held-out known classes (and synthetic and real defects), from the inputs every
    set has; with the chosen mix's fused fold scores."""
    keys = set(train.vectors) & set(calib_ok.vectors)
    for extra in (pseudo, defects):
        keys &= set(extra.vectors) if extra is not None else keys
    folds, notes = make_folds(
        train.labels,
        train.vectors,
        calib_ok.labels,
        calib_ok.vectors,
        classes,
        None if pseudo is None else pseudo.vectors,
        say,
        None if defects is None else defects.vectors,
    )
    heads, method, record, scores = select_heads(folds, candidate_specs(sorted(keys)), quantile, say, head_budget)
    record["notes"] = notes
    return heads, method, record, scores


def named_folds(
    train: FeatureSet,
    calib_ok: FeatureSet,
    classes: Sequence[str],
    pseudo: FeatureSet | None,
    defects: FeatureSet | None,
    heads: Sequence[str],
    method: str,
) -> list[FoldScores]:
    """The pseudo-unknown folds' fused scores of heads named with --heads (empty when no fold can be made)."""
    need = {input_key(h) for h in heads}
    if any(need - set(x.vectors) for x in (train, calib_ok, *(e for e in (pseudo, defects) if e is not None))):
        return []
    try:
        folds, _ = make_folds(train.labels, train.vectors, calib_ok.labels, calib_ok.vectors, classes,
                              None if pseudo is None else pseudo.vectors, lambda m: None,
                              None if defects is None else defects.vectors)  # fmt: skip
    except BouncerError:
        return []
    return fold_scores(folds, heads, method)
