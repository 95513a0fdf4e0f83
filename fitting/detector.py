"""Fitting a gate around a user's YOLO-family detector.

The detector is frozen. From the line's own folders (YOLO layout: `images/`, `labels/` with `class cx cy w h`
rows, normalised; `classes.json` optional) the gate learns:
- the quality gate and the frame-level OOD heads (Bouncer's backbone beside the detector, the sidecar) from the
  training frames;
- per-class calibration of the box scores (Platt on the logit of the score) from half of the calibration frames:
  a candidate's label is whether it is a true box of its class (IoU >= 0.5 with an unmatched true box, greedy by
  score), so a calibrated probability means "a true box of this class" and its error counts localisation;
- the frame-confidence threshold by Learn-then-Test on the other half: a frame is correct when its kept boxes
  (calibrated probability >= 0.5) match its true boxes one to one, class and place (no miss, no false box, no
  wrong class); accepted frames have at most 1 - target such frames, with probability 1 - delta.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.fitting.acceptance import select_threshold
from bouncer.fitting.calibration import expected_calibration_error
from bouncer.fitting.fit import Extracted, FitSettings, extract
from bouncer.fitting.stages import acceptance, assemble, fit_input_gate, fit_quality
from bouncer.runtime.backends import Backend
from bouncer.runtime.backends.paired import PREFIX, PairedBackend
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import Acceptance, GateBundle
from bouncer.runtime.gates.decision import rule
from bouncer.runtime.gates.detector import Detections, DetectorTask, OrphanHead, _logit, iou_matrix
from bouncer.runtime.gates.heads import fit_head, head_input, input_key, input_sources, parse_head
from bouncer.runtime.images import IMAGE_SUFFIXES, iter_image_paths
from bouncer.runtime.modelcard import ModelCard
from bouncer.runtime.preprocess import Preprocessing, input_to_frame

IOU_MATCH = 0.5
PLATT_MIN = 10  # true and false candidates a class needs for its own calibration; fewer: the pooled one
# frame-level OOD heads when --heads does not name them: on the sidecar backbone a mid-level tap, the channel
# maxima of a map and each of its cells against the training frames' cells (a small unfamiliar object lights a
# few cells, which pooling over the frame would average away; the per-cell head took the unknown-object frames
# accepted in `bouncer bench detector` from a median of 75 to 49 of 150); on the detector, its orphan candidates
SIDECAR_HEADS = ("knn:sidecar.pool_s16", "knn:sidecar.map_s16@max", "patch:sidecar.map_s16")


def default_heads(card: ModelCard, sidecar: bool) -> list[str]:
    return [*(SIDECAR_HEADS if sidecar else ()), f"orphan:{card.detections}"]


ORPHAN_FLOOR, ORPHAN_CANDIDATES = 0.001, 1000  # the orphan head looks lower than the task's 0.01


def detection_images(folder: Path, classes: Sequence[str]) -> list[Path]:
    """The images of a detection folder, after checking its layout (and its classes.json against the card)."""
    if not (folder / "images").is_dir():
        raise BouncerError(f"{folder}: a detector's training and calibration folders hold images/ and labels/ "
                           "(YOLO rows: class cx cy w h, normalised; `bouncer sim detection` writes one)")  # fmt: skip
    names = folder / "classes.json"
    if names.is_file():
        try:
            listed = json.loads(names.read_text())
        except ValueError as exc:
            raise BouncerError(f"{names}: not JSON ({exc})") from None
        if listed != list(classes):
            raise BouncerError(f"{names}: classes {listed} differ from the detector card's {list(classes)}")
    paths = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BouncerError(f"{folder / 'images'}: no images")
    return paths


def check_layout(card: ModelCard, shape: tuple[int, ...], model: Path) -> None:
    """The detector's raw output has the card's layout over its classes; an export with NMS inside is refused
    with how to export raw (the guard needs every candidate with its class scores, low ones included)."""
    n_classes = len(card.classes)
    want = 4 + n_classes + (card.layout == "yolox")
    got = shape[1] if card.layout == "ultralytics" else shape[-1]
    if len(shape) == 3 and got == want:
        return
    per_row = len(shape) == 3 and shape[-1] in (6, 7) and shape[1] != want
    why = (
        "; it looks like an export with NMS inside (one row per kept box: corners, score, class): export the raw "
        "predictions instead, e.g. `yolo export model=best.pt format=onnx nms=False` (YOLO26 models: also "
        "end2end=False)"
        if per_row
        else ""
    )
    layout = f"(4 + {n_classes}) x N" if card.layout == "ultralytics" else f"N x (5 + {n_classes})"
    raise BouncerError(f"{model}: output {card.detections} has shape {list(shape[1:])}, not the {layout} that "
                       f"layout {card.layout!r} with {n_classes} classes gives{why}")  # fmt: skip


def read_truth(image: Path, size: tuple[int, int], n_classes: int) -> np.ndarray:
    """An image's true boxes from its YOLO label file (none if it has no file): K x 5 rows class, x1 y1 x2 y2 in
    frame pixels."""
    label = image.parent.parent / "labels" / f"{image.stem}.txt"
    rows: list[list[float]] = []
    if label.is_file():
        for n, line in enumerate(label.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                c, cx, cy, w, h = (float(v) for v in line.split())
            except ValueError:
                raise BouncerError(f"{label}:{n}: expected 'class cx cy w h', got {line.strip()!r}") from None
            if not (c.is_integer() and 0 <= c < n_classes) or not all(0 <= v <= 1 for v in (cx, cy, w, h)):
                raise BouncerError(f"{label}:{n}: class outside 0..{n_classes - 1} or a coordinate outside 0..1")
            fw, fh = size
            rows.append([c, (cx - w / 2) * fw, (cy - h / 2) * fh, (cx + w / 2) * fw, (cy + h / 2) * fh])
    return np.array(rows, np.float64).reshape(-1, 5)


def match(boxes: np.ndarray, classes: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching in the boxes' order (best first): each box takes the unmatched true box of its class with
    the highest IoU >= IOU_MATCH. Returns (box matched, true box matched)."""
    hit, used = np.zeros(len(boxes), bool), np.zeros(len(truth), bool)
    if len(boxes) and len(truth):
        iou = iou_matrix(boxes, truth[:, 1:])
        same = classes[:, None] == truth[None, :, 0].astype(np.int64)
        for i in range(len(boxes)):
            cand = np.where(same[i] & ~used & (iou[i] >= IOU_MATCH), iou[i], -1.0)
            j = int(cand.argmax())
            if cand[j] >= 0:
                hit[i], used[j] = True, True
    return hit, used


def frame_correct(boxes: np.ndarray, classes: np.ndarray, truth: np.ndarray) -> bool:
    """Kept boxes and true boxes match one to one, class and place: no miss, no false box, no wrong class."""
    hit, used = match(boxes, classes, truth)
    return bool(hit.all() and used.all())


def fit_platt(z: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[float, float]:
    """p = sigmoid(a z + b) by Newton's method on the log loss (a little L2 keeps separable data finite)."""
    w = np.array([1.0, 0.0])
    x = np.column_stack([z, np.ones_like(z)])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def binary_ece(p: np.ndarray, y: np.ndarray) -> float:
    return expected_calibration_error(np.column_stack([1 - p, p]), np.asarray(y, np.int64))


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # boxes (frame pixels), classes, raw scores, bad


def _candidates(task: DetectorTask, ex: Extracted, key: str, pp: Preprocessing) -> list[Candidates]:
    out = []
    for raw, (w, h) in zip(ex.outputs[key], ex.sizes, strict=True):
        boxes, cls, best, bad = task.candidates(raw)
        out.append((input_to_frame(boxes, w, h, pp), cls, best, bad))
    return out


@dataclass
class DetectionFrames:
    """Labelled detector frames as the calibration sees them: per frame its candidates after NMS (M x 6: corners in
    frame pixels, class index, raw score), its true boxes (K x 5: class, corners; class -1 an object the detector
    does not know) and whether it passes the input gate (quality and frame-level OOD). The station keeps the
    line's calibration frames this way and adds the operators' box labels."""

    cands: list[np.ndarray]
    truth: list[np.ndarray]
    passing: np.ndarray

    @classmethod
    def of(cls, cands: Sequence[Candidates], truth: Sequence[np.ndarray]) -> DetectionFrames:
        bad = sum(c[3] for c in cands)
        if bad:
            raise BouncerError(f"calibration frames: the detector gave {bad} candidates with NaN or infinite outputs")
        rows = [np.column_stack([b, c, s]).astype(np.float32).reshape(-1, 6) for b, c, s, _ in cands]
        return cls(rows, [np.asarray(t, np.float64).reshape(-1, 5) for t in truth], np.ones(len(rows), bool))

    def __len__(self) -> int:
        return len(self.cands)

    def take(self, idx: Sequence[int] | np.ndarray) -> DetectionFrames:
        return DetectionFrames([self.cands[i] for i in idx], [self.truth[i] for i in idx], self.passing[list(idx)])

    @staticmethod
    def concat(sets: Sequence[DetectionFrames]) -> DetectionFrames:
        return DetectionFrames([c for s in sets for c in s.cands], [t for s in sets for t in s.truth],
                               np.concatenate([s.passing for s in sets]) if sets else np.zeros(0, bool))  # fmt: skip

    def save(self, path: Path) -> None:
        np.savez(path, cands=np.concatenate([*self.cands, np.zeros((0, 6), np.float32)]),
                 cand_n=np.array([len(c) for c in self.cands], np.int64),
                 truth=np.concatenate([*self.truth, np.zeros((0, 5))]),
                 truth_n=np.array([len(t) for t in self.truth], np.int64), passing=self.passing)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> DetectionFrames:
        with np.load(path, allow_pickle=False) as z:
            cands = np.split(z["cands"], np.cumsum(z["cand_n"])[:-1]) if len(z["cand_n"]) else []
            truth = np.split(z["truth"], np.cumsum(z["truth_n"])[:-1]) if len(z["truth_n"]) else []
            return cls(list(cands), list(truth), z["passing"].astype(bool))


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The calibration frames that fit the box probabilities and the ones that certify the threshold."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def _split(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return c[:, :4], c[:, 4].astype(np.int64), c[:, 5].astype(np.float64)


def fit_calibration(frames: DetectionFrames, layout: str, classes: Sequence[str]) -> tuple[DetectorTask, list[str]]:
    """Per-class Platt scaling of the raw scores, on candidates labelled by whether they match a true box; a class
    with fewer than PLATT_MIN true and false candidates shares the pooled fit. Returns the task and the classes
    with their own fit."""
    z, y, c = [], [], []
    for cand, truth in zip(frames.cands, frames.truth, strict=True):
        boxes, cls, best = _split(cand)
        z.append(_logit(best))
        y.append(match(boxes, cls, truth)[0])
        c.append(cls)
    z_a, y_a = np.concatenate([*z, np.zeros(0)]), np.concatenate([*y, np.zeros(0, bool)]).astype(np.float64)
    c_a = np.concatenate([*c, np.zeros(0, np.int64)])
    if y_a.sum() < 2 or (1 - y_a).sum() < 2:
        n_true, n_false = int(y_a.sum()), int((1 - y_a).sum())
        raise BouncerError("calibration frames: too few true or false candidate boxes to calibrate the scores "
                           f"({n_true} true, {n_false} false); more calibration frames")  # fmt: skip
    pooled = fit_platt(z_a, y_a)
    a, b, own = np.full(len(classes), pooled[0]), np.full(len(classes), pooled[1]), []
    for k in range(len(classes)):
        m = c_a == k
        if y_a[m].sum() >= PLATT_MIN and (1 - y_a[m]).sum() >= PLATT_MIN:
            a[k], b[k] = fit_platt(z_a[m], y_a[m])
            own.append(classes[k])
    return DetectorTask(layout, len(classes), a, b), own


@dataclass
class Judged:
    """A task's calibration applied to labelled frames: per frame its confidence and whether its kept boxes are all
    right; per candidate its raw score, calibrated probability and whether it is a true box."""

    conf: np.ndarray
    correct: np.ndarray
    raw: np.ndarray
    probs: np.ndarray
    hits: np.ndarray

    def accepted(self, passing: np.ndarray, threshold: float | None) -> np.ndarray:
        return rule(passing, self.conf, np.zeros(len(self.conf)), 0.0, threshold).accepted

    def ece(self) -> dict[str, float]:
        return {"ece_before_calibration": round(binary_ece(self.raw, self.hits), 4),
                "ece_after_calibration": round(binary_ece(self.probs, self.hits), 4)}  # fmt: skip

    def report(self, passing: np.ndarray, threshold: float | None) -> dict[str, Any]:
        """Frames, accepted ones and the share of them with any box error (the station's champion/challenger
        comparison on held-out labels)."""
        acc = self.accepted(passing, threshold)
        n = int(acc.sum())
        return {"frames": len(acc), "accepted": n, "accepted_correct": int((acc & self.correct).sum()),
                "accepted_error": round(float((~self.correct[acc]).mean()) if n else 0.0, 4),
                "coverage": round(n / max(len(acc), 1), 4)}  # fmt: skip


def judge(task: DetectorTask, frames: DetectionFrames) -> Judged:
    conf, correct = np.zeros(len(frames)), np.zeros(len(frames), bool)
    raw, probs, hits = [np.zeros(0)], [np.zeros(0)], [np.zeros(0, bool)]
    for i, (cand, truth) in enumerate(zip(frames.cands, frames.truth, strict=True)):
        boxes, cls, best = _split(cand)
        det = Detections(boxes, cls, task.calibrate(cls, best), 0)
        conf[i], keep = det.certainty(), det.kept()
        correct[i] = frame_correct(boxes[keep], cls[keep], truth)
        raw.append(best)
        probs.append(det.probs)
        hits.append(match(boxes, cls, truth)[0])
    return Judged(conf, correct, np.concatenate(raw), np.concatenate(probs), np.concatenate(hits))


def box_drift_reference(task: DetectorTask, frames: DetectionFrames, classes: Sequence[str]) -> dict[str, float]:
    """The spread, over the calibration frames the input gate passes, of each class's kept boxes per frame and of
    their calibrated probabilities: the floors of the drift monitor's per-class box signals."""
    counts = np.zeros((len(frames), len(classes)))
    probs: list[list[float]] = [[] for _ in classes]
    for i, cand in enumerate(frames.cands):
        _, cls, best = _split(cand)
        p = task.calibrate(cls, best)
        keep = p >= 0.5
        counts[i] = np.bincount(cls[keep], minlength=len(classes))[: len(classes)]
        for c, q in zip(cls[keep], p[keep], strict=True):
            probs[c].append(float(q))
    counts = counts[frames.passing] if frames.passing.any() else counts
    out = {f"count.{c}": round(float(counts[:, k].std()), 4) for k, c in enumerate(classes)}
    return out | {f"score.{c}": round(float(np.std(probs[k])), 4) for k, c in enumerate(classes) if probs[k]}


def certify(
    task: DetectorTask, frames: DetectionFrames, settings: FitSettings, say: Callable[[str], None]
) -> tuple[Any, Acceptance, Judged]:
    """Learn-then-Test on the frames that pass the input gate: the lowest certainty threshold whose accepted
    frames have at most 1 - target with any box error, with probability 1 - delta. Returns the selection, the
    acceptance and the frames as judged (for the fit's figures)."""
    j = judge(task, frames)
    p = frames.passing
    sel = select_threshold(j.conf[p], j.correct[p], 1 - settings.target_accuracy, settings.delta)
    if sel.threshold is None:
        say(f"warning: no frame-confidence threshold reaches accuracy {settings.target_accuracy} on the calibration "
            "frames; this gate auto-accepts nothing, every frame goes to review")  # fmt: skip
    return sel, acceptance(sel, settings.target_accuracy, settings.delta), j


def fit_detector_gate(
    backend: Backend,
    train_dir: Path,
    calib_dir: Path,
    settings: FitSettings,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
) -> GateBundle:
    say = log or (lambda m: print(m, file=sys.stderr))
    card: ModelCard = backend.card
    classes, pp = list(card.classes), card.preprocessing
    assert card.detections is not None  # the card checks it
    sidecar = backend.sidecar.card if isinstance(backend, PairedBackend) else None
    heads = list(settings.heads or default_heads(card, sidecar is not None))
    keys = list(dict.fromkeys(input_key(h) for h in heads))
    sources = {s for k in keys for s in input_sources(k)} | {card.detections}
    missing = sorted(s for s in sources if s not in backend.card.output_names())
    if missing:
        raise BouncerError(f"{backend.path}: OOD heads need output(s) {', '.join(missing)} the models do not give "
                           f"(they give: {', '.join(backend.card.output_names())})")  # fmt: skip
    train_paths, calib_paths = detection_images(train_dir, classes), detection_images(calib_dir, classes)
    say(f"extracting detections and features of {len(train_paths)} training and {len(calib_paths)} calibration images")
    train_ex = extract(backend, pp, train_paths, [0] * len(train_paths), sources, lambda m: say(f"train: {m}"))
    calib_ex = extract(backend, pp, calib_paths, [0] * len(calib_paths), sources, lambda m: say(f"calib: {m}"))
    check_layout(card, calib_ex.outputs[card.detections].shape, backend.path)
    truth = [read_truth(p, s, len(classes)) for p, s in zip(calib_ex.paths, calib_ex.sizes, strict=True)]
    side = None if sidecar is None else {"name": sidecar.name, "hash": sidecar.model_hash}
    bundle = fit_detector_from(card, train_ex, calib_ex, truth, settings, heads, side, version, say)
    bundle.fit_metrics["skipped_unreadable"] = len(train_ex.skipped) + len(calib_ex.skipped)
    return bundle


def fit_detector_from(
    card: ModelCard,
    train_ex: Extracted,
    calib_ex: Extracted,
    truth: list[np.ndarray],
    settings: FitSettings,
    heads: Sequence[str],
    sidecar: dict[str, str] | None = None,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
) -> GateBundle:
    """The fit proper, from extracted outputs and the calibration frames' true boxes (`bouncer fit`, and the
    benchmark's many seeded splits of one extraction)."""
    say = log or (lambda m: print(m, file=sys.stderr))
    classes, pp, heads = list(card.classes), card.preprocessing, list(heads)
    assert card.detections is not None  # the card checks it
    keys = list(dict.fromkeys(input_key(h) for h in heads))
    if len(train_ex.paths) < 10 or len(calib_ex.paths) < 20:
        raise BouncerError(f"a detector gate needs at least 10 readable training and 20 calibration images, have "
                           f"{len(train_ex.paths)} and {len(calib_ex.paths)}")  # fmt: skip

    # calibration: half the calibration frames fit the box probabilities, the other half the threshold
    frames = DetectionFrames.of(_candidates(DetectorTask(card.layout, len(classes)), calib_ex, card.detections, pp),
                                truth)  # fmt: skip
    half_a, half_b = halves(len(frames), settings.seed)
    task, own = fit_calibration(frames.take(half_a), card.layout, classes)

    # the input gate: quality and frame-level heads from the training frames, the detector's orphan candidates
    # with the calibration just fitted; thresholds on the calibration frames
    quality, q_ok = fit_quality(train_ex.stats, calib_ex.stats)
    zeros = np.zeros(len(train_ex.paths), np.int64)
    orphan = OrphanHead(card.detections, replace(task, min_score=ORPHAN_FLOOR, max_candidates=ORPHAN_CANDIDATES))
    ood_heads = [orphan if parse_head(h)[0] == "orphan" else fit_head(h, head_input(input_key(h), train_ex.outputs),
                                                                       zeros) for h in heads]  # fmt: skip
    raw = np.stack([h.score_vectors(head_input(h.input_key, calib_ex.outputs)) for h in ood_heads], 1)
    gate = fit_input_gate(quality, q_ok, np.ones(len(q_ok), bool), raw, heads, settings.fusion or "max", [],
                          settings.review_budget, None, settings.delta)  # no pseudo-unknowns here  # fmt: skip
    frames.passing = gate.passing()

    sel, accept, judged = certify(task, frames.take(half_b), settings, say)
    fit_metrics: dict[str, Any] = {
        "train_images": len(train_ex.paths),
        "calibration_images": len(calib_ex.paths),
        "calibration_boxes": int(sum(len(t) for t in truth)),
        "platt_frames": len(half_a),
        "threshold_frames": len(half_b),
        "platt_own_classes": own,
        "calibration_accuracy": round(float(judged.correct.mean()), 4),
        **judged.ece(),
        **gate.metrics(frames.passing, calib_ex.stats),
        "calibration_coverage": round(float(judged.accepted(frames.passing[half_b], sel.threshold).mean()), 4),
    }
    fit_metrics["drift_reference"] |= box_drift_reference(task, frames.take(half_b), classes)
    rule_name = "detector: frame-level heads and orphan candidates" if settings.heads is None else "named with --heads"
    reads = sorted({"sidecar" if k.startswith(PREFIX) else "model" for k in keys})
    return assemble(
        gate, backbone_hash=card.model_hash, backbone_name=card.name, classes=classes, preprocessing=pp, task=task,
        ood_heads=ood_heads, accept=accept, fit_metrics=fit_metrics,
        selection={"rule": rule_name, "chosen": {"heads": heads, "fusion": gate.fusion.method}, "reads": reads},
        fit_settings=settings.to_dict(), sidecar=sidecar, version=version,
    )  # fmt: skip


def input_pass(bundle: GateBundle, ex: Extracted) -> np.ndarray:
    """Per frame: does it pass the gate's quality checks and frame-level OOD heads?"""
    q_ok = np.array([not bundle.quality.check(s) for s in ex.stats], bool)
    raw = np.stack([h.score_vectors(head_input(h.input_key, ex.outputs)) for h in bundle.ood_heads], 1)
    return q_ok & ~rule(q_ok, np.ones(len(q_ok)), bundle.fusion.fuse(raw), bundle.ood_threshold, None).ood


def judge_frames(
    bundle: GateBundle, ex: Extracted, key: str, truth: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """A detector gate's rule on extracted frames (`key`: the detector's raw output), as the guard applies it:
    (accepted, correct) per frame; `correct` compares the kept boxes with the true ones (all False without truth)."""
    task = bundle.task
    assert isinstance(task, DetectorTask) and bundle.preprocessing is not None
    conf, correct = np.zeros(len(ex.paths)), np.zeros(len(ex.paths), bool)
    for i, (boxes, cls, best, bad) in enumerate(_candidates(task, ex, key, bundle.preprocessing)):
        det = Detections(boxes, cls, task.calibrate(cls, best), bad)  # what the guard decides on, in frame pixels
        conf[i] = det.certainty()
        if truth is not None:
            keep = det.kept()
            correct[i] = frame_correct(boxes[keep], cls[keep], truth[i])
    accepted = rule(input_pass(bundle, ex), conf, np.zeros(len(conf)), 0.0, bundle.acceptance.threshold).accepted
    return accepted, correct


def detection_frames(bundle: GateBundle, backend: Backend, folder: Path) -> DetectionFrames:
    """A labelled detection folder through a detector gate: candidates, true boxes, input gate (the station keeps
    the line's calibration frames this way, to recalibrate from with the operators' labels)."""
    card, pp, task = backend.card, bundle.preprocessing, bundle.task
    assert isinstance(task, DetectorTask) and card.detections is not None and pp is not None
    sources = {s for h in bundle.ood_heads for s in input_sources(h.input_key)} | {card.detections}
    paths = detection_images(folder, bundle.classes)
    ex = extract(backend, pp, paths, [0] * len(paths), sources)
    check_layout(card, ex.outputs[card.detections].shape, backend.path)
    truth = [read_truth(p, s, len(bundle.classes)) for p, s in zip(ex.paths, ex.sizes, strict=True)]
    frames = DetectionFrames.of(_candidates(task, ex, card.detections, pp), truth)
    frames.passing = input_pass(bundle, ex)
    return frames


def recalibrate(
    champion: GateBundle, platt: DetectionFrames, threshold: DetectionFrames, version: str,
    log: Callable[[str], None] | None = None,
) -> GateBundle:  # fmt: skip
    """The champion with its box calibration refitted on `platt` and its threshold certified again on `threshold`
    (the line's calibration frames plus the operators' box labels); its input gate is kept as it is."""
    say = log or (lambda m: print(m, file=sys.stderr))
    old = champion.task
    assert isinstance(old, DetectorTask)
    settings = FitSettings.of(champion)
    task, own = fit_calibration(platt, old.layout, champion.classes)
    task = replace(task, min_score=old.min_score, iou=old.iou, max_candidates=old.max_candidates)
    sel, accept, judged = certify(task, threshold, settings, say)
    metrics = {
        "train_images": champion.fit.train_images,
        "drift_reference": champion.fit.drift_reference,
        "calibration_images": len(platt) + len(threshold),
        "platt_frames": len(platt),
        "threshold_frames": len(threshold),
        "platt_own_classes": own,
        "calibration_accuracy": round(float(judged.correct.mean()), 4) if len(threshold) else 0.0,
        **judged.ece(),
        "calibration_coverage": round(float(judged.accepted(threshold.passing, sel.threshold).mean()), 4),
    }
    now = datetime.now(UTC)
    return replace(champion, version=version, created=now.isoformat(timespec="seconds"), task=task,
                   acceptance=accept, fit_metrics=metrics)  # fmt: skip


def every_box_over_half(
    layout: str, n_classes: int, ex: Extracted, key: str, pp: Preprocessing, truth: list[np.ndarray]
) -> np.ndarray:
    """The common practice, per frame: is it right when every box whose raw score is at least 0.5 is kept?"""
    plain = DetectorTask(layout, n_classes)
    cands = _candidates(plain, ex, key, pp)
    return np.array([frame_correct(b[s >= 0.5], c[s >= 0.5], t) for (b, c, s, _), t in zip(cands, truth, strict=True)])


def evaluate_detector(
    bundle: GateBundle, backend: Backend, known: Path, others: dict[str, list[Path]], detections: str
) -> dict[str, Any]:
    """`bouncer eval` for a detector gate: on a labelled detection folder, the share of accepted frames with any
    box error and the frame coverage, beside accepting every frame with its boxes over 0.5; on folders of
    frames that should not pass (unknown objects, foreign photos), how many the gate accepts."""
    classes, pp = bundle.classes, bundle.preprocessing
    sources = {s for h in bundle.ood_heads for s in input_sources(h.input_key)} | {detections}
    paths = detection_images(known, classes)
    ex = extract(backend, pp, paths, [0] * len(paths), sources)
    check_layout(backend.card, ex.outputs[detections].shape, backend.path)
    truth = [read_truth(p, s, len(classes)) for p, s in zip(ex.paths, ex.sizes, strict=True)]
    accepted, correct = judge_frames(bundle, ex, detections, truth)
    assert isinstance(bundle.task, DetectorTask)
    practice = every_box_over_half(bundle.task.layout, len(classes), ex, detections, pp, truth)
    n_acc = int(accepted.sum())
    report: dict[str, Any] = {
        "gate": bundle.version,
        "target_accuracy": bundle.acceptance.target_accuracy,
        "known_frames": len(ex.paths),
        "guard": {"accepted": n_acc, "coverage": round(n_acc / max(len(ex.paths), 1), 4),
                  "accepted_error": round(float((~correct[accepted]).mean()) if n_acc else 0.0, 4)},
        "every_box_over_half": {"accepted": len(ex.paths), "coverage": 1.0,
                                "accepted_error": round(1 - float(np.mean(practice)), 4) if len(practice) else 0.0},
        "should_not_pass": {},
    }  # fmt: skip
    for kind, folders in others.items():
        for folder in folders:
            imgs = list(iter_image_paths([folder]))
            other = extract(backend, pp, imgs, [0] * len(imgs), sources)
            acc, _ = judge_frames(bundle, other, detections, None)
            report["should_not_pass"][f"{kind}:{folder}"] = {"frames": len(other.paths), "accepted": int(acc.sum())}
    return report
