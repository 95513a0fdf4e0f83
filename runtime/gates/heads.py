"""Heads on backbone outputs. Fitting is numpy; scoring goes through `bouncer.runtime.kernels` (the C++ hot
path, or its numpy reference).

- LinearHead: the task classifier with temperature (logits / T -> softmax).
- GaussianHead: Mahalanobis distance to the nearest of C means under one shared shrunk covariance,
  stored as a low-rank whitening basis plus one isotropic precision for the rest of the space
  (exact for Ledoit-Wolf shrinkage beyond the sample rank, and small: d x r instead of d x d).
  On spatial maps it scores every patch and keeps the maximum, as PaDiM and PatchCore do.
- KnnHead: cosine distance to the k-th nearest training feature in an fp16 bank.
- Fusion: each head's score mapped to a common scale (its conformal -log p, or standardised), combined.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bouncer.runtime import kernels
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.specs import HeadSpec, InputKey
from bouncer.runtime.modelcard import ModelCard

EPS = 1e-6


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32)


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def patches(fmap: np.ndarray) -> np.ndarray:
    """N x C x H x W map -> N x (H*W) x C patch vectors."""
    n, c, h, w = fmap.shape
    return np.ascontiguousarray(fmap.reshape(n, c, h * w).transpose(0, 2, 1))


def parse_head(spec: str) -> tuple[str, str, str | None]:
    """A head spec -> (kind, source, reduce): runtime/gates/specs.py parses it."""
    h = HeadSpec.parse(spec)
    return h.kind, h.source, h.reduce


def input_key(spec: str) -> str:
    """The per-frame vector a head reads (runtime/gates/specs.py)."""
    return str(HeadSpec.parse(spec).input)


def input_sources(key: str) -> list[str]:
    """The model outputs an input key is made from."""
    return list(InputKey.parse(key).sources)


def head_input(key: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The vector behind an input key, from a backbone's outputs (float32, one row per frame; a patch head's
    input is the joined, 3x3-averaged map grid, N x C x H x W; a tile head's, N x tiles x D)."""
    k = InputKey.parse(key)
    source, reduce = k.source, k.reduce
    if reduce == "tiles":
        tiled = outputs.get(tile_output(source))
        if tiled is None:
            raise BouncerError(f"OOD input {key!r}: the frame was not tiled (no {tile_output(source)} output)")
        return np.asarray(tiled, np.float32).reshape(len(tiled), tiled.shape[1], -1)
    if reduce == "patch":
        from bouncer.runtime.gates.patch import patch_grid

        return patch_grid(outputs, tuple(source.split("+")))
    out = outputs[source]
    if reduce:
        if out.ndim != 4:
            raise BouncerError(f"OOD input {key!r}: {source} is not a feature map")
        return kernels.spatial_max(np.ascontiguousarray(out, np.float32))
    return np.asarray(out, np.float32)


def tile_output(source: str) -> str:
    """The outputs key of a backbone output on a frame's tiles (N x tiles x ...)."""
    return f"tiles:{source}"


def candidate_inputs(card: ModelCard) -> list[str]:
    """Every input head selection may choose from: the task features, each pooled tap, each map's maxima."""
    return [k for k in (card.features, *card.taps, *(f"{m}@max" for m in card.maps)) if k]


def frame_vectors(card: ModelCard, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The task input and every candidate OOD input of the first frame of `outputs`: what a flagged frame carries
    to the station, so that retraining can recalibrate and choose its heads again without the model."""
    # a detector's raw output is not a vector to retrain from (and large): its kept boxes travel instead
    task = [] if card.task == "detector" else [card.task_input]
    keys = dict.fromkeys([*task, *candidate_inputs(card)])
    return {k: np.atleast_1d(head_input(k, outputs)[0]) for k in keys if InputKey.parse(k).source in outputs}


class OodHead:
    """What every OOD head is: it reads one input (`input_key`: a backbone output, or a map's channel maxima),
    turns a backbone's outputs into that input's vectors, scores vectors (what feature sets and the wire hold)
    and saves itself into a bundle as arrays plus JSON metadata (`kind` names the class that loads it)."""

    kind: ClassVar[str]
    source: str

    @property
    def input_key(self) -> str:
        return self.source

    def vectors(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return head_input(self.input_key, outputs)

    def score(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """One score per frame of a backbone's outputs (higher = more unfamiliar)."""
        return self.score_vectors(self.vectors(outputs))

    def score_vectors(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scorer(self) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """`score` with its lookups bound once: the guard calls it every frame."""
        return self.score

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> OodHead:
        raise NotImplementedError


@dataclass
class LinearHead:
    """Bouncer's own classifier on the backbone's features: a task head (runtime/gates/tasks.py)."""

    kind: ClassVar[str] = "linear"
    weight: np.ndarray  # C x d, applied to l2-normalised features
    bias: np.ndarray  # C
    temperature: float = 1.0

    def __post_init__(self) -> None:  # kernels read C-contiguous float32 in place
        self.weight, self.bias = _f32(self.weight), _f32(self.bias)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return l2n(features) @ self.weight.T + self.bias

    def probs(self, features: np.ndarray) -> np.ndarray:
        return kernels.linear_probs(_f32(features), self.weight, self.bias, self.temperature)

    def uncalibrated(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.logits(features)).astype(np.float32)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "temperature": self.temperature}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": self.weight, f"{prefix}.bias": self.bias}

    @classmethod
    def load(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, n_classes: int) -> LinearHead:
        temperature = float(meta.get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError("task temperature must be positive")
        head = cls(arrays[f"{prefix}.weight"].astype(np.float32), arrays[f"{prefix}.bias"].astype(np.float32),
                   temperature)  # fmt: skip
        if head.weight.ndim != 2 or head.weight.shape[0] != n_classes or head.bias.shape != (n_classes,):
            raise ValueError(f"task head shape {head.weight.shape} does not match {n_classes} classes")
        return head


def ledoit_wolf(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigen-decomposition (basis, eigenvalues, rest) of the Ledoit-Wolf shrunk covariance of centred rows.

    Returns the leading eigenvectors (d x r), their shrunk eigenvalues, and the shrunk eigenvalue of
    the remaining directions (all equal there, because the sample covariance is zero or tiny beyond r).
    """
    n, d = xc.shape
    xc = xc.astype(np.float64)
    if n > d:
        s = xc.T @ xc / n
        evals, evecs = np.linalg.eigh(s)
        evals, evecs = evals[::-1].clip(min=0), evecs[:, ::-1]
    else:
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)
        evals, evecs = sv**2 / n, vt.T
    mu = float(evals.sum() / d)
    frob2 = float((evals**2).sum())  # ||S||_F^2
    delta2 = (frob2 - 2 * mu * evals.sum() + d * mu * mu) / d  # ||S - mu I||^2 / d
    beta2 = (float(((xc**2).sum(1) ** 2).sum()) - n * frob2) / (n * n * d)
    shrink = 1.0 if delta2 <= 0 else min(max(beta2 / delta2, 0.0), 1.0)
    shrunk = (1 - shrink) * evals + shrink * mu
    rest = shrink * mu if len(evals) < d else float(shrunk[-1])
    return evecs, shrunk, max(rest, EPS * max(mu, EPS))


@dataclass
class GaussianHead(OodHead):
    """Mahalanobis distance to the nearest mean. `source`: the backbone output it reads."""

    kind: ClassVar[str] = "mahalanobis"
    source: str
    means: np.ndarray  # C x d
    basis: np.ndarray  # d x r, float16: the per-frame cost is streaming it
    inv_evals: np.ndarray  # r
    inv_rest: float
    spatial: bool = False  # True: source is a feature map; score = max over patches

    @classmethod
    def fit(cls, source: str, x: np.ndarray, labels: np.ndarray | None, spatial: bool, rank: int = 256) -> GaussianHead:
        """x: N x d pooled vectors (class means from labels) or N x P x d patches (one mean)."""
        if spatial:
            flat = l2n(x.reshape(-1, x.shape[-1]))
            means = flat.mean(0, keepdims=True)
            xc = flat - means
        else:
            assert labels is not None, "pooled Gaussian heads need class labels"
            xn = l2n(x)
            classes = np.unique(labels)
            means = np.stack([xn[labels == c].mean(0) for c in classes])
            xc = xn - means[np.searchsorted(classes, labels)]
        evecs, evals, rest = ledoit_wolf(xc)
        r = min(rank, evecs.shape[1])
        return cls(
            source=source,
            means=means,
            basis=evecs[:, :r],
            inv_evals=1.0 / evals[:r],
            inv_rest=float(1.0 / rest),
            spatial=spatial,
        )

    def __post_init__(self) -> None:
        self.means, self.inv_evals = _f32(self.means), _f32(self.inv_evals)
        self.basis = np.ascontiguousarray(self.basis, np.float16)
        m, b, e = self.means, self.basis, self.inv_evals
        if m.ndim != 2 or b.ndim != 2 or b.shape[0] != m.shape[1] or e.shape != (b.shape[1],):
            raise ValueError(f"{self.source} head: inconsistent shapes means {m.shape}, basis {b.shape}, {e.shape}")
        self.means_proj = _f32(self.means @ self.basis.astype(np.float32))

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of x (M x d, normalised in the kernel) to each mean: M x C."""
        return kernels.mahalanobis(_f32(x), self.means, self.basis, self.inv_evals, self.inv_rest, self.means_proj)

    def scorer(self) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        source, score = self.source, self.score_vectors
        return lambda outputs: score(outputs[source])

    def score_vectors(self, out: np.ndarray) -> np.ndarray:
        """Nearest-mean distance per frame; for maps, the most unusual patch."""
        if self.spatial:
            p = patches(out)
            n, m, d = p.shape
            return self.distances(p.reshape(-1, d)).min(1).reshape(n, m).max(1)
        return self.distances(out.reshape(len(out), -1)).min(1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.means": self.means, f"{prefix}.basis": self.basis, f"{prefix}.inv_evals": self.inv_evals}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "spatial": self.spatial, "inv_rest": self.inv_rest}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> GaussianHead:
        return cls(
            source=str(meta["source"]),
            means=arrays[f"{prefix}.means"].astype(np.float32),
            basis=arrays[f"{prefix}.basis"],
            inv_evals=arrays[f"{prefix}.inv_evals"].astype(np.float32),
            inv_rest=float(meta["inv_rest"]),
            spatial=bool(meta["spatial"]),
        )


@dataclass
class KnnHead(OodHead):
    """Cosine distance to the k-th nearest training vector. `reduce="max"` first takes each channel's
    maximum over the feature map: a small local defect barely moves an average but sets a maximum, so
    patch-level evidence survives in one vector (the magnetic-tile measurements in docs/bundle.md).
    `reduce="tiles"` scores each tile of the frame against a coreset of the training frames' tiles and keeps the
    most unusual tile (runtime/tiles.py)."""

    kind: ClassVar[str] = "knn"
    source: str
    bank: np.ndarray  # N x d, l2-normalised, float16
    k: int = 1
    reduce: str | None = None

    def __post_init__(self) -> None:
        self.bank = np.ascontiguousarray(self.bank)

    @property
    def input_key(self) -> str:
        return f"{self.source}@{self.reduce}" if self.reduce else self.source

    @functools.cached_property
    def bank_f32(self) -> np.ndarray:
        """The bank as float32, converted once (the explanation of every flagged frame reads it)."""
        return self.bank.astype(np.float32)

    @classmethod
    def fit(cls, source: str, out: np.ndarray, k: int = 1, reduce: str | None = None) -> KnnHead:
        """From one backbone output (N x ... ; a map when reduce="max")."""
        key = f"{source}@{reduce}" if reduce else source
        return cls.from_vectors(source, head_input(key, {source: out}), k, reduce)

    @classmethod
    def from_vectors(cls, source: str, vectors: np.ndarray, k: int = 1, reduce: str | None = None) -> KnnHead:
        """A bank from vectors already reduced (what devices send the station with a flagged frame)."""
        if reduce == "tiles":
            from bouncer.runtime.gates.patch import CORESET, greedy_coreset

            if vectors.ndim < 3:
                raise BouncerError(f"OOD head knn:{source}@tiles: expected frames x tiles x features")
            rows = _f32(vectors.reshape(-1, int(np.prod(vectors.shape[2:]))))
            bank = l2n(rows[greedy_coreset(rows, CORESET)]).astype(np.float16)
            return cls(source=source, bank=bank, k=1, reduce=reduce)
        flat = _f32(vectors.reshape(len(vectors), -1))
        return cls(source=source, bank=l2n(flat).astype(np.float16), k=min(k, len(vectors)), reduce=reduce)

    def scorer(self) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        # after the backbone call every attribute and object the interpreter touches is a cache miss: bind
        # everything once (docs/hotpath.md, "Measured choices")
        source, bank, k, knn, smax = self.source, self.bank, self.k, kernels.knn_score, kernels.spatial_max
        if self.reduce == "tiles":
            return lambda outputs: self.tile_scores(outputs[tile_output(source)]).max(1)
        if self.reduce == "max":
            return lambda outputs: knn(smax(_f32(outputs[source])), bank, k)
        return lambda outputs: knn(_f32(outputs[source].reshape(len(outputs[source]), -1)), bank, k)

    def score_vectors(self, vectors: np.ndarray) -> np.ndarray:
        if self.reduce == "tiles":
            return self.tile_scores(vectors).max(1)
        return kernels.knn_score(_f32(vectors.reshape(len(vectors), -1)), self.bank, self.k)

    def tile_scores(self, vectors: np.ndarray) -> np.ndarray:
        """N x tiles: each tile's distance (a tile head's; its maximum is the frame's score)."""
        n, t = vectors.shape[:2]
        return kernels.knn_score(_f32(vectors.reshape(n * t, -1)), self.bank, self.k).reshape(n, t)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.bank": self.bank}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "k": self.k, "reduce": self.reduce}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> KnnHead:
        reduce = meta.get("reduce")
        if reduce not in (None, "max", "tiles"):
            raise ValueError(f"{prefix} head: unknown reduce {reduce!r}")
        bank = arrays[f"{prefix}.bank"]
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"{prefix} head: empty or malformed bank")
        k = int(meta["k"])
        if not 1 <= k <= len(bank):
            raise ValueError(f"{prefix} head: k={k} outside 1..{len(bank)}")
        return cls(source=str(meta["source"]), bank=bank, k=k, reduce=reduce)


HEAD_KINDS: dict[str, type[OodHead]] = {h.kind: h for h in (GaussianHead, KnnHead)}


def load_head(meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> OodHead:
    """A head saved by `arrays`/`meta`, by its kind."""
    kind = meta["kind"]
    if kind == "patchknn":
        from bouncer.runtime.gates.patch import PatchKnnHead

        return PatchKnnHead.from_saved(meta, arrays, prefix)
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown OOD head kind {kind!r}")
    return HEAD_KINDS[kind].from_saved(meta, arrays, prefix)


FUSION_METHODS = {
    "max": "max over heads of -log p (p: the head's conformal p-value on calibration frames; min-p)",
    "sum": "sum over heads of -log p (Fisher's combination)",
    "mean": "mean over heads of (score - median) / (q90 - q50)",
}
MAX_KNOTS = 64


def _pvalue_curve(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Knots of -log p(s) for one head, p(s) = (1 + #{calibration scores >= s}) / (n + 1), denser in the upper
    tail; beyond the largest score it goes on as an exponential tail (slope 1 / mean excess over q90)."""
    s = np.sort(np.asarray(scores, np.float64))
    n = len(s)
    xs, first = np.unique(s, return_index=True)
    u = -np.log((n - first + 1) / (n + 1))  # at each distinct score: -log p
    if len(xs) > MAX_KNOTS:  # keep the lowest knot and the upper tail densely
        keep = np.unique(np.round(len(xs) - np.geomspace(1, len(xs), MAX_KNOTS)).astype(int))
        xs, u = xs[keep], u[keep]
    if len(xs) < 2:
        xs, u = np.array([xs[0], xs[0] + EPS]), np.array([u[0], u[0]])
    q90 = np.quantile(s, 0.9)
    tail = s[s > q90] - q90
    excess = float(tail.mean()) if len(tail) else 0.0
    return xs, u, 0.0, 1.0 / max(excess, EPS * max(float(np.abs(s).max()), 1.0))


@dataclass
class Fusion:
    """Per-head curves from calibration scores to a common scale, combined over heads (FUSION_METHODS).

    Averaging standardised scores (`mean`) lets a weak head hide a strong one's alarm; `max` of -log p flags
    a frame that any head finds rare, `sum` (Fisher) one that several find unusual. The choice is measured
    per line (fitting/select.py)."""

    names: list[str]
    method: str
    knots_x: np.ndarray  # H x K, strictly increasing per row
    knots_y: np.ndarray  # H x K
    slope_lo: np.ndarray  # H
    slope_hi: np.ndarray  # H

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method {self.method!r}: expected one of {', '.join(FUSION_METHODS)}")
        self.knots_x, self.knots_y = (np.ascontiguousarray(a, np.float64) for a in (self.knots_x, self.knots_y))
        self.slope_lo, self.slope_hi = (np.ascontiguousarray(a, np.float64) for a in (self.slope_lo, self.slope_hi))
        h = len(self.names)
        if self.knots_x.ndim != 2 or self.knots_x.shape[0] != h or self.knots_x.shape[1] < 2:
            raise ValueError(f"fusion knots: expected {h} rows of at least 2, got shape {self.knots_x.shape}")
        if self.knots_y.shape != self.knots_x.shape or self.slope_lo.shape != (h,) or self.slope_hi.shape != (h,):
            raise ValueError("fusion: knots and slopes do not match the heads")
        if not (np.diff(self.knots_x, axis=1) > 0).all():
            raise ValueError("fusion knots must increase strictly")
        self._combine = kernels.FUSE_METHODS.index(self.method)

    @classmethod
    def fit(cls, names: list[str], scores: np.ndarray, method: str = "max") -> Fusion:
        """scores: N x H raw head scores of clean calibration frames."""
        if method == "mean":
            q50, q90 = np.quantile(scores, [0.5, 0.9], axis=0)
            scale = np.maximum(q90 - q50, EPS)
            return cls(list(names), method, np.stack([q50, q50 + scale], 1), np.tile([0.0, 1.0], (len(names), 1)),
                       1 / scale, 1 / scale)  # fmt: skip
        curves = [_pvalue_curve(scores[:, j]) for j in range(scores.shape[1])]
        k = min(len(c[0]) for c in curves)
        # one knot count for all heads (a rectangular array for the kernel): thin the longer curves
        picks = [np.unique(np.round(np.linspace(0, len(c[0]) - 1, k)).astype(int)) for c in curves]
        return cls(
            list(names),
            method,
            np.stack([c[0][p] for c, p in zip(curves, picks, strict=True)]),
            np.stack([c[1][p] for c, p in zip(curves, picks, strict=True)]),
            np.array([c[2] for c in curves]),
            np.array([c[3] for c in curves]),
        )

    def fuse(self, scores: np.ndarray) -> np.ndarray:
        """scores: N x H raw head scores -> N fused scores (higher = more unfamiliar)."""
        return kernels.fuse(_f32(scores), self.knots_x, self.knots_y, self.slope_lo, self.slope_hi, self._combine)


def fit_head(spec: str, x: np.ndarray, labels: np.ndarray) -> OodHead:
    """A head from its spec and its input's vectors (see input_key) on training frames."""
    kind, source, reduce = parse_head(spec)
    if kind == "orphan":
        raise BouncerError(f"OOD head {spec!r}: orphan heads read a detector's calibrated candidates; a detector "
                           "gate's fit makes them")  # fmt: skip
    if kind == "knn":
        return KnnHead.from_vectors(source, x, reduce=reduce)
    if kind == "patchknn":
        from bouncer.runtime.gates.patch import PatchKnnHead

        if x.ndim != 4:
            raise BouncerError(f"OOD head {spec!r}: {source} is not made of feature maps")
        return PatchKnnHead.fit(source, x)
    if kind == "patch":
        if x.ndim != 4:
            raise BouncerError(f"OOD head {spec!r}: {source} is not a feature map")
        n, c, h, w = x.shape
        return GaussianHead.fit(source, x.reshape(n, c, h * w).transpose(0, 2, 1), None, spatial=True)
    return GaussianHead.fit(source, x.reshape(len(x), -1), labels, spatial=False)
