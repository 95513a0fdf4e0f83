"""Choosing the OOD heads and their fusion from the line's own known classes, never from an unknown.

Each known class is held out in turn as a pseudo-unknown: every candidate head is fitted on the other
classes' training frames, its threshold set on their calibration frames at the gate's own operating
quantile, and it is scored by the share of the held-out class it flags there (the catch rate at the flag
rate the gate will run at). Synthetic defects made from the line's own calibration frames
(`fitting/defects.py`) are one more fold, and the only one on a line with a single class. The mix with the
best mean plus worst-fold catch rate wins; within `TIE` of it, fewer heads, then the higher mean AUROC.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bouncer.fitting.operating import REAL, SYNTHETIC, FoldScores, conformal_quantile
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import Fusion, fit_head, input_key
from bouncer.runtime.gates.specs import InputKey

MIN_FOLD_CALIB = 20  # clean calibration frames of the other classes a fold's threshold needs
MIN_HELD_OUT = 5  # frames of the held-out class (or synthetic defects) a fold needs
MAX_MIX = 3  # heads in one mix
TOP_SINGLES = 6  # the best single heads that are combined into pairs and triples
TIE = 0.005  # objective differences below this are ties
# Elements one frame's heads stream (kNN: bank rows x dim; Mahalanobis: dim x rank). `bench hotpath` streams a
# 10,000 x 192 fp16 bank (1.9 M) in 100 us beside a 4 ms backbone call on a VNNI CPU, in 380 us beside 36 ms on
# an AVX2-only one: a few percent of the call, so any mix keeps the guard within its 10% budget.
HEAD_BUDGET = 2_000_000
MAHA_RANK = 256  # GaussianHead.fit's default rank
RULE = (
    "hold each known class out in turn (plus one fold of synthetic defects made from the line's own "
    "calibration frames, and one of the real defective frames given at fit time); fit candidates on the rest, "
    "threshold at the review budget's flag rate (at most 1%) on the rest's calibration frames; objective = "
    "(mean + worst) fold catch rate / 2; ties within 0.005 go to fewer heads, then mean AUROC"
)


@dataclass
class Fold:
    """One held-out split: heads fit on `train`, threshold on `calib`, catch rate on `unknown`."""

    name: str
    train_labels: np.ndarray
    train: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]
    unknown: dict[str, np.ndarray]


@dataclass
class Scored:
    mix: tuple[str, ...]
    method: str
    tpr: list[float]
    auroc: list[float]
    cost: int

    @property
    def objective(self) -> float:
        return (float(np.mean(self.tpr)) + min(self.tpr)) / 2

    def to_dict(self, folds: Sequence[Fold]) -> dict[str, Any]:
        return {
            "heads": list(self.mix),
            "fusion": self.method,
            "objective": round(self.objective, 4),
            "mean_catch": round(float(np.mean(self.tpr)), 4),
            "worst_catch": round(min(self.tpr), 4),
            "mean_auroc": round(float(np.mean(self.auroc)), 4),
            "catch_by_fold": {f.name: round(t, 4) for f, t in zip(folds, self.tpr, strict=True)},
            "cost": self.cost,
        }


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(positive score > negative score), ties counted half (Mann-Whitney), vectorised."""
    neg = np.sort(np.asarray(neg, np.float64))
    pos = np.asarray(pos, np.float64)
    below = np.searchsorted(neg, pos, "left")
    ties = np.searchsorted(neg, pos, "right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def _rows(d: dict[str, np.ndarray]) -> int:
    return len(next(iter(d.values()))) if d else 0


def candidate_specs(keys: Sequence[str]) -> list[str]:
    """Heads on each input: Mahalanobis and kNN on pooled vectors, kNN on a map's channel maxima, the patch head
    on a patch grid (`MAP@patch`, there only when the head budget is raised: fitting/fit.py `gate_inputs`)."""
    out = []
    for k in keys:
        key = InputKey.parse(k)
        source, reduce = key.source, key.reduce
        out += [f"patchknn:{source}"] if reduce == "patch" else [f"knn:{k}"] if reduce else [f"maha:{k}", f"knn:{k}"]
    return out


def head_cost(spec: str, n_train: int, shape: Sequence[int]) -> int:
    """Elements one frame streams through the head: kNN bank rows x dim, Mahalanobis dim x rank, a patch head
    patches x coreset x channels, a tile head coreset x dim per tile. `shape`: one training vector's (a patch
    grid's C x H x W, a tile input's tiles x D)."""
    if spec.startswith("patchknn:"):
        from bouncer.runtime.gates.patch import CORESET

        c, cells = int(shape[0]), int(np.prod(shape[1:]))
        return cells * min(CORESET, n_train * cells) * c
    if spec.endswith("@tiles"):
        # per tile, beside that tile's own backbone call: the share of the work the budget bounds
        from bouncer.runtime.gates.patch import CORESET

        return min(CORESET, n_train * int(shape[0])) * int(np.prod(shape[1:]))
    dim = int(np.prod(shape))
    return n_train * dim if spec.startswith("knn:") else dim * min(MAHA_RANK, dim)


def make_folds(
    train_labels: np.ndarray,
    train: dict[str, np.ndarray],
    calib_labels: np.ndarray,
    calib: dict[str, np.ndarray],
    classes: Sequence[str],
    pseudo: dict[str, np.ndarray] | None,
    say: Callable[[str], None],
    real: dict[str, np.ndarray] | None = None,
) -> tuple[list[Fold], list[str]]:
    """Held-out-class folds, the synthetic-defect fold and the real-defect fold (labelled-bad frames given at
    fit time); the notes say which could not be a fold."""
    folds, notes = [], []

    def sub(d: dict[str, np.ndarray], m: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[m] for k, v in d.items()}

    if len(classes) >= 2:
        for c, name in enumerate(classes):
            rest_t, rest_c = train_labels != c, calib_labels != c
            held = int((~rest_t).sum() + (~rest_c).sum())
            if rest_c.sum() < MIN_FOLD_CALIB or held < MIN_HELD_OUT:
                notes.append(
                    f"class {name} not held out: {held} frames of it (need {MIN_HELD_OUT}), "
                    f"{int(rest_c.sum())} calibration frames of the others (need {MIN_FOLD_CALIB})"
                )
                continue
            unknown = {k: np.concatenate([train[k][~rest_t], calib[k][~rest_c]]) for k in train}
            folds.append(
                Fold(f"held out: {name}", train_labels[rest_t], sub(train, rest_t), sub(calib, rest_c), unknown)
            )
    # pseudo-unknowns scored against every known class: synthetic defects, then real defective frames
    for name, frames, what in ((SYNTHETIC, pseudo, "defects"), (REAL, real, "readable defective frames")):
        if frames is None:
            continue
        n = _rows(frames)
        if n >= MIN_HELD_OUT and len(calib_labels) >= MIN_FOLD_CALIB:
            folds.append(Fold(name, train_labels, train, calib, frames))
        else:
            notes.append(f"{name.replace(' defects', '-defect')} fold left out: {n} {what} (need {MIN_HELD_OUT})")
    for note in notes:
        say(f"head selection: {note}")
    if not folds:
        raise BouncerError(
            "head selection needs at least one held-out fold: two known classes with "
            f"{MIN_HELD_OUT}+ frames each and {MIN_FOLD_CALIB}+ calibration frames of the others, or a one-class "
            f"line with {MIN_FOLD_CALIB}+ readable calibration images to make synthetic defects from; "
            "or name the heads with --heads"
        )
    return folds, notes


def select_heads(
    folds: Sequence[Fold],
    candidates: Sequence[str],
    quantile: float,
    say: Callable[[str], None],
    budget: int = HEAD_BUDGET,
) -> tuple[tuple[str, ...], str, dict[str, Any], list[FoldScores]]:
    """(heads, fusion method, the record for the bundle and gate card, the chosen mix's fused fold scores: the
    operating point's catch curve, fitting/operating.py)."""
    # raw scores of each candidate on each fold's calibration and held-out frames
    calib_s: dict[str, list[np.ndarray]] = {}
    unk_s: dict[str, list[np.ndarray]] = {}
    cost: dict[str, int] = {}
    for spec in candidates:
        x0 = folds[0].train[input_key(spec)]
        cost[spec] = head_cost(spec, len(x0), x0.shape[1:])
        if cost[spec] <= budget:
            calib_s[spec], unk_s[spec] = _raw_scores(folds, spec)

    def fused(mix: tuple[str, ...], method: str) -> list[FoldScores]:
        return _fuse_folds(folds, mix, method, calib_s, unk_s)

    def score(mix: tuple[str, ...], method: str) -> Scored:
        fs = fused(mix, method)
        tprs = [float((f.unknown > conformal_quantile(f.calib, quantile)).mean()) for f in fs]
        return Scored(mix, method, tprs, [auroc(f.unknown, f.calib) for f in fs], sum(cost[s] for s in mix))

    singles = sorted((score((s,), "max") for s in calib_s), key=lambda r: (-r.objective, r.mix))
    if not singles:
        raise BouncerError(f"head selection: every candidate head exceeds the per-frame budget ({budget:,})")
    top = [r.mix[0] for r in singles[:TOP_SINGLES]]
    results = list(singles)
    for size in range(2, MAX_MIX + 1):
        for mix in itertools.combinations(top, size):
            if sum(cost[s] for s in mix) <= budget:
                results += [score(mix, m) for m in ("max", "sum", "mean")]
    best = max(r.objective for r in results)
    contenders = [r for r in results if r.objective >= best - TIE]
    chosen = min(contenders, key=lambda r: (len(r.mix), -float(np.mean(r.auroc)), r.method, r.mix))
    ranked = sorted(results, key=lambda r: (-r.objective, len(r.mix), r.mix, r.method))
    c = chosen.to_dict(folds)
    record: dict[str, Any] = {
        "rule": RULE,
        "quantile": quantile,
        "folds": [{"name": f.name, "calibration": _rows(f.calib), "held_out": _rows(f.unknown)} for f in folds],
        "candidates": [r.to_dict(folds) for r in ranked[:12]],
        "chosen": c,
        "over_budget": sorted(s for s in candidates if s not in calib_s),
        "head_budget": budget,
    }
    say(
        f"heads chosen: {', '.join(chosen.mix)} (fusion {chosen.method}): catches {c['mean_catch']:.1%} of held-out "
        f"frames on average, {c['worst_catch']:.1%} in the worst of {len(folds)} folds (AUROC {c['mean_auroc']:.3f})"
    )
    return chosen.mix, chosen.method, record, fused(chosen.mix, chosen.method)


def _raw_scores(folds: Sequence[Fold], spec: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One head fitted on each fold's training frames: its raw scores on the fold's calibration and held-out frames."""
    key, calib, unknown = input_key(spec), [], []
    for f in folds:
        head = fit_head(spec, f.train[key], f.train_labels)
        calib.append(head.score_vectors(f.calib[key]))
        unknown.append(head.score_vectors(f.unknown[key]))
    return calib, unknown


def _fuse_folds(
    folds: Sequence[Fold],
    mix: Sequence[str],
    method: str,
    calib_s: dict[str, list[np.ndarray]],
    unk_s: dict[str, list[np.ndarray]],
) -> list[FoldScores]:
    """Per fold, the mix's fusion fitted on its calibration scores, applied to both sides."""
    out = []
    for i, f in enumerate(folds):
        c = np.stack([calib_s[s][i] for s in mix], 1)
        u = np.stack([unk_s[s][i] for s in mix], 1)
        fusion = Fusion.fit(list(mix), c, method)
        out.append(FoldScores(f.name, fusion.fuse(c), fusion.fuse(u)))
    return out


def fold_scores(folds: Sequence[Fold], mix: Sequence[str], method: str) -> list[FoldScores]:
    """Fused fold scores of a mix named by the user (--heads): its catch curve, as for a chosen one."""
    raw = {s: _raw_scores(folds, s) for s in dict.fromkeys(mix)}
    return _fuse_folds(folds, mix, method, {s: r[0] for s, r in raw.items()}, {s: r[1] for s, r in raw.items()})
