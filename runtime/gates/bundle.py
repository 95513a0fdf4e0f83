"""The gate bundle: one zip file holding `gate.json` (metadata, thresholds) and `arrays.npz` (weights).

No pickle anywhere: arrays load with allow_pickle=False and the JSON is validated field by field,
so a corrupt or hostile bundle is an error naming what is wrong, never code execution or a crash.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.fit_report import FitReport
from bouncer.runtime.gates.heads import FUSION_METHODS, Fusion, GaussianHead, KnnHead, OodHead, load_head
from bouncer.runtime.gates.quality import QualityGate
from bouncer.runtime.gates.tasks import TaskHead, load_task
from bouncer.runtime.preprocess import Preprocessing
from bouncer.runtime.tiles import Tiling

FORMAT = "bouncer-gate"
FORMAT_VERSION = 3  # 3: task heads of other kinds (the user's classifier or anomaly model), the sidecar
READS = (2, 3)
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
MAX_INFLATED_BYTES = 256 * 1024 * 1024  # the members' declared sizes together (zipfile reads no more than those)


def _check_inflated(z: zipfile.ZipFile, what: str) -> None:
    """Refuse a zip bomb from its directory, before inflating anything."""
    total = sum(i.file_size for i in z.infolist())
    if total > MAX_INFLATED_BYTES:
        raise BundleError(f"{what}: its members would inflate to {total} bytes (at most {MAX_INFLATED_BYTES})")


class BundleError(BouncerError):
    """A gate bundle that is missing, corrupt, or made for another backbone."""


@dataclass
class Acceptance:
    threshold: float | None  # confidence needed to auto-accept; None: never auto-accept
    target_accuracy: float
    delta: float
    error_bound: float | None
    n_calibration: int
    n_accepted: int
    n_errors: int
    frames_needed: int


def conformal_pvalue(reference: np.ndarray, score: float) -> float:
    """(1 + #{reference scores >= score}) / (n + 1) against sorted good calibration scores; NaN is as unusual as it
    gets."""
    n = len(reference)
    if score != score:
        return 1 / (n + 1)
    return (1 + n - int(np.searchsorted(reference, score, side="left"))) / (n + 1)


@dataclass
class GateBundle:
    version: str
    created: str
    backbone_hash: str
    backbone_name: str
    classes: list[str]
    preprocessing: Preprocessing
    quality: QualityGate
    task: TaskHead  # what is certified: Bouncer's classifier, the user's, or the user's anomaly score
    ood_heads: list[OodHead]
    fusion: Fusion
    ood_threshold: float
    ood_quantile: float
    acceptance: Acceptance
    fit_metrics: dict[str, Any] = field(default_factory=dict)
    # Last-layer-only Mahalanobis and its threshold: never used to decide, kept so `bouncer eval`
    # can compare the gate against it on the same frames.
    baseline: GaussianHead | None = None
    baseline_threshold: float | None = None
    # how the OOD heads were chosen: candidates, their held-out-class figures, the choice (fitting/select.py)
    selection: dict[str, Any] = field(default_factory=dict)
    # kNN on a map's channel maxima, only for the heatmaps of flagged frames (whatever heads decide)
    explainer: KnnHead | None = None
    # what the fit was asked for (fitting/fit.py FitSettings): target, delta, OOD quantile, heads, fusion, seed
    fit_settings: dict[str, Any] = field(default_factory=dict)
    # Bouncer's backbone run beside a user's model for OOD heads (its outputs prefixed `sidecar.`): name, hash
    sidecar: dict[str, str] | None = None
    # the OOD operating point from the line's review budget: certified flag rate, catch curve (fitting/operating.py)
    operating: dict[str, Any] = field(default_factory=dict)
    # sorted fused scores of the good calibration frames: each frame's conformal p-value is read against them
    ood_reference: np.ndarray | None = None
    # the grid the tile heads (`knn:OUTPUT@tiles`) read, or None: runtime/tiles.py
    tiling: Tiling | None = None

    def __post_init__(self) -> None:
        if self.ood_reference is not None:
            ref = np.sort(np.asarray(self.ood_reference, np.float64).ravel())
            if not np.isfinite(ref).all():
                raise ValueError("ood reference scores must be finite")
            self.ood_reference = ref
        tiled = any(h.input_key.endswith("@tiles") for h in self.ood_heads)
        if tiled != (self.tiling is not None):
            raise ValueError("tile heads and the tiling must come together")

    def ood_pvalue(self, fused: float) -> float | None:
        """Where the frame sits on the operating curve (None for a bundle made before the reference was kept)."""
        ref = self.ood_reference
        return None if ref is None or not len(ref) else conformal_pvalue(ref, fused)

    # ---- writing -------------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = self.task.arrays("task")
        for i, h in enumerate(self.ood_heads):
            arrays |= h.arrays(f"ood{i}")
        if self.baseline is not None:
            arrays |= self.baseline.arrays("baseline")
        if self.explainer is not None:
            arrays |= self.explainer.arrays("explain")
        if self.ood_reference is not None:
            arrays["ood.reference"] = np.asarray(self.ood_reference, np.float32)
        f = self.fusion
        arrays |= {"fusion.knots_x": f.knots_x, "fusion.knots_y": f.knots_y}
        arrays |= {"fusion.slope_lo": f.slope_lo, "fusion.slope_hi": f.slope_hi}
        return arrays

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created": self.created,
            "backbone": {"hash": self.backbone_hash, "name": self.backbone_name},
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "tiling": None if self.tiling is None else self.tiling.to_dict(),
            "quality": self.quality.to_dict(),
            "task": self.task.meta(),
            "sidecar": self.sidecar,
            "ood": {
                "heads": [h.meta() for h in self.ood_heads],
                "fusion": {
                    "names": self.fusion.names,
                    "method": self.fusion.method,
                    "rule": FUSION_METHODS[self.fusion.method],
                },
                "threshold": self.ood_threshold,
                "quantile": self.ood_quantile,
                "selection": self.selection,
                "operating": self.operating,
            },
            "baseline": None
            if self.baseline is None
            else {"head": self.baseline.meta(), "threshold": self.baseline_threshold},
            "explain": None if self.explainer is None else self.explainer.meta(),
            "acceptance": self.acceptance.__dict__,
            "fit_metrics": self.fit_metrics,
            "fit_settings": self.fit_settings,
        }

    @property
    def fit(self) -> FitReport:
        """`fit_metrics`, typed (runtime/gates/fit_report.py): what code reads of them."""
        return FitReport.of(self.fit_metrics)

    def save(self, path: Path) -> Path:
        """Write atomically: a reader never sees half a bundle, a crash leaves the old one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
                    z.writestr("gate.json", json.dumps(self._meta(), indent=2))
                    z.writestr("arrays.npz", buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ---- reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> GateBundle:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: gate bundle not found")
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise BundleError(f"{path}: too large for a gate bundle ({path.stat().st_size} bytes)")
        try:
            with zipfile.ZipFile(path) as z:
                _check_inflated(z, str(path))
                meta = json.loads(z.read("gate.json"))
                inner = io.BytesIO(z.read("arrays.npz"))
            with zipfile.ZipFile(inner) as members:
                _check_inflated(members, f"{path} arrays.npz")
            with np.load(inner, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        # zlib.error: damaged deflate data; NotImplementedError: a flipped compression-method field
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, KeyError, ValueError, OSError, EOFError) as exc:
            raise BundleError(f"{path}: corrupt gate bundle ({type(exc).__name__}: {exc})") from None
        try:
            return cls._from(meta, arrays)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, BouncerError) as exc:
            raise BundleError(f"{path}: invalid gate bundle ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> GateBundle:
        if meta.get("format") != FORMAT:
            raise ValueError("not a Bouncer gate bundle")
        if meta.get("format_version") not in READS:
            raise ValueError(f"format version {meta.get('format_version')} (this Bouncer reads {READS})")
        classes = [str(c) for c in meta["classes"]]
        task = load_task(dict(meta["task"]), arrays, len(classes))
        side = meta.get("sidecar")
        if side is not None and not (isinstance(side, dict) and isinstance(side.get("hash"), str)):
            raise ValueError("sidecar: expected {name, hash}")
        heads = [load_head(h, arrays, f"ood{i}") for i, h in enumerate(meta["ood"]["heads"])]
        base = meta.get("baseline")
        baseline = load_head(base["head"], arrays, "baseline") if base else None
        fm = meta["ood"]["fusion"]
        fusion = Fusion(
            [str(n) for n in fm["names"]],
            str(fm["method"]),
            *(arrays[f"fusion.{k}"].astype(np.float64) for k in ("knots_x", "knots_y", "slope_lo", "slope_hi")),
        )
        if len(fusion.names) != len(heads):
            raise ValueError("fusion does not match the OOD heads")
        acc = meta["acceptance"]
        return cls(
            version=str(meta["version"]),
            created=str(meta["created"]),
            backbone_hash=str(meta["backbone"]["hash"]),
            backbone_name=str(meta["backbone"]["name"]),
            classes=classes,
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
            quality=QualityGate.from_dict(meta["quality"]),
            task=task,
            ood_heads=heads,
            fusion=fusion,
            ood_threshold=float(meta["ood"]["threshold"]),
            ood_quantile=float(meta["ood"]["quantile"]),
            acceptance=Acceptance(
                threshold=None if acc["threshold"] is None else float(acc["threshold"]),
                target_accuracy=float(acc["target_accuracy"]),
                delta=float(acc["delta"]),
                error_bound=None if acc["error_bound"] is None else float(acc["error_bound"]),
                n_calibration=int(acc["n_calibration"]),
                n_accepted=int(acc["n_accepted"]),
                n_errors=int(acc["n_errors"]),
                frames_needed=int(acc["frames_needed"]),
            ),
            fit_metrics=dict(meta.get("fit_metrics", {})),
            baseline=baseline if isinstance(baseline, GaussianHead) else None,
            baseline_threshold=float(base["threshold"]) if base else None,
            selection=dict(meta["ood"].get("selection") or {}),
            explainer=_explainer(meta.get("explain"), arrays),
            fit_settings=dict(meta.get("fit_settings") or {}),
            sidecar=None if side is None else {"name": str(side.get("name", "")), "hash": side["hash"]},
            operating=dict(meta["ood"].get("operating") or {}),
            ood_reference=arrays.get("ood.reference"),
            tiling=None if meta.get("tiling") is None else Tiling.from_dict(meta["tiling"]),
        )


def _explainer(meta: dict[str, Any] | None, arrays: dict[str, np.ndarray]) -> KnnHead | None:
    head = None if meta is None else load_head(meta, arrays, "explain")
    if head is not None and not (isinstance(head, KnnHead) and head.reduce == "max"):
        raise ValueError("explain head: expected kNN on a map's channel maxima")
    return head
