"""What a fit measured, typed: the one way code reads a bundle's `fit_metrics` (`GateBundle.fit`).

The bundle keeps the metrics as the flat JSON object it always had (gate.json `fit_metrics`: bundles stay
compatible both ways, and the station's records show them as they are); this module reads them into typed fields,
with the task's own figures in one section: a classifier's (Bouncer's, or the user's scores), an anomaly model's,
or a detector's. Fields a bundle lacks (an older one, or one fitted by another task) read as their defaults.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from bouncer.runtime.errors import BouncerError


class ClassifierFit(msgspec.Struct, frozen=True):
    train_accuracy: float
    calibration_accuracy: float
    temperature: float
    ece_before_scaling: float
    ece_after_scaling: float


class AnomalyFit(msgspec.Struct, frozen=True):
    basis: str
    observed_false_alarm: float | None = None
    observed_miss_rate: float | None = None
    false_alarm_bound: float | None = None  # the true false-alarm rate's bound, with probability 1 - delta
    false_alarm_met: bool | None = None


class DetectorFit(msgspec.Struct, frozen=True):
    calibration_boxes: int
    platt_frames: int
    threshold_frames: int
    platt_own_classes: list[str]
    calibration_accuracy: float
    ece_before_calibration: float
    ece_after_calibration: float


class FitReport(msgspec.Struct, frozen=True):
    train_images: int | None = None
    calibration_images: int | None = None
    calibration_coverage: float | None = None  # calibration frames the gate accepts
    calibration_quality_rejects: int = 0
    calibration_ood_flagged: int = 0
    skipped_unreadable: int = 0
    class_counts: dict[str, int] = {}
    calibration_class_counts: dict[str, int] = {}
    drift_reference: dict[str, Any] = {}  # the drift monitor's baseline (runtime/drift.py)
    retrain: dict[str, Any] = {}  # what a station retrain used and still needs (station/retrain.py)
    classifier: ClassifierFit | None = None
    anomaly: AnomalyFit | None = None
    detector: DetectorFit | None = None

    @property
    def kind(self) -> Literal["classifier", "anomaly", "detector", "unknown"]:
        return ("detector" if self.detector else "anomaly" if self.anomaly else "classifier" if self.classifier
                else "unknown")  # fmt: skip

    @property
    def calibration_accuracy(self) -> float | None:
        """A classifier's calibration frames classified right, a detector's with every box right."""
        part = self.classifier or self.detector
        return None if part is None else part.calibration_accuracy

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> FitReport:
        sections: dict[str, Any] = {}
        for name, kind in (("classifier", ClassifierFit), ("detector", DetectorFit)):
            fields = kind.__struct_fields__
            if all(f in metrics for f in fields):
                sections[name] = {f: metrics[f] for f in fields}
        if isinstance(metrics.get("anomaly"), dict):
            sections["anomaly"] = {k: v for k, v in metrics["anomaly"].items() if k in AnomalyFit.__struct_fields__}
        common = {k: v for k, v in metrics.items() if k in cls.__struct_fields__ and k not in ("classifier", "anomaly",
                                                                                            "detector")}  # fmt: skip
        try:
            return msgspec.convert({**common, **sections}, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise BouncerError(f"gate.json fit_metrics: {exc}") from None
