"""What a model is: its named outputs, preprocessing and identity.

Bouncer's own models carry this as ONNX metadata (key `bouncer.card`); any other ONNX or TFLite
classifier gets a small card file beside it (`MODEL.card.json` or `MODEL.card.toml`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bouncer.runtime.errors import ModelError
from bouncer.runtime.preprocess import Preprocessing

CARD_KEY = "bouncer.card"


TASKS = ("features", "classifier", "anomaly", "detector")
LAYOUTS = ("ultralytics", "yolox")  # detector outputs: (4 + C) x N raw, or N x (5 + C) with objectness
SCORE_KINDS = ("logits", "softmax", "sigmoid")


@dataclass(frozen=True)
class ModelCard:
    """What a model is and which outputs play which role.

    - task "features" (Bouncer's backbone, or any feature extractor): Bouncer fits the task head on `features`.
    - task "classifier": the prediction is the model's own, from `scores` (`score_kind` says whether they are
      logits or probabilities) over `classes`; `features`, if named, is the model's own embedding.
    - task "anomaly": `pred_score` is the model's raw image score (higher = more anomalous; never thresholded
      inside the export), `anomaly_map` an optional N x 1 x H x W map, as anomalib exports them.
    - task "detector": `detections` holds the raw candidate boxes of a YOLO-family model in `layout` over
      `classes`, exported without NMS (the guard needs every candidate's class scores).
    """

    name: str
    features: str | None = "features"
    logits: str | None = "logits"
    taps: tuple[str, ...] = ()  # pooled mid-level feature vectors, one per tap
    maps: tuple[str, ...] = ()  # spatial feature maps (N, C, H, W) for patch-level scores
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model_hash: str = ""  # identity of the weights; gate bundles are bound to it
    # logical output name -> the runtime's tensor name, where they differ (onnx2tf renames outputs)
    tensors: dict[str, str] = field(default_factory=dict)
    task: str = "features"
    scores: str | None = None  # classifier: N x C class scores
    score_kind: str = "logits"
    classes: tuple[str, ...] = ()  # classifier: the names of the score columns, in order
    pred_score: str | None = None  # anomaly: N or N x 1 image scores
    anomaly_map: str | None = None  # anomaly: N x 1 x H x W (optional)
    detections: str | None = None  # detector: the raw candidates, before any NMS
    layout: str = "ultralytics"  # detector: how `detections` is laid out (LAYOUTS)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Card errors name the key and the fix."""
        if self.task not in TASKS:
            raise ModelError(f"model card: task = {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.task == "features" and not self.features:
            raise ModelError('model card: task "features" needs `features` (the output the heads read)')
        if self.task == "classifier":
            if not self.scores:
                raise ModelError('model card: task "classifier" needs `scores` (the output with one score per class)')
            if self.score_kind not in SCORE_KINDS:
                raise ModelError(
                    f"model card: score_kind = {self.score_kind!r}; expected one of {', '.join(SCORE_KINDS)}"
                )
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ModelError("model card: task \"classifier\" needs `classes`, the distinct names of its score "
                                 "columns in order (at least two)")  # fmt: skip
        if self.task == "detector":
            if not self.detections:
                raise ModelError('model card: task "detector" needs `detections` (the raw output, exported without '
                                 'NMS: ultralytics `output0`)')  # fmt: skip
            if self.layout not in LAYOUTS:
                raise ModelError(f"model card: layout = {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ModelError('model card: task "detector" needs `classes`, the distinct names of its classes in '
                                 "the order of its score columns")  # fmt: skip
        if self.task == "anomaly" and not self.pred_score:
            raise ModelError('model card: task "anomaly" needs `pred_score` (the raw image score output)')

    @property
    def task_input(self) -> str:
        """The output the task head reads: features (Bouncer fits the head), scores, or the anomaly score."""
        name = {"features": self.features, "classifier": self.scores, "anomaly": self.pred_score,
                "detector": self.detections}[self.task]  # fmt: skip
        assert name is not None  # check() made sure
        return name

    def tensor(self, logical: str) -> str:
        return self.tensors.get(logical, logical)

    def output_names(self) -> list[str]:
        names = [self.features, self.scores, self.pred_score, self.anomaly_map, self.detections, *self.taps, *self.maps,
                 self.logits]  # fmt: skip
        return list(dict.fromkeys(n for n in names if n))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "features": self.features,
            "logits": self.logits,
            "taps": list(self.taps),
            "maps": list(self.maps),
            "preprocessing": self.preprocessing.to_dict(),
            "model_hash": self.model_hash,
            "tensors": dict(self.tensors),
        }
        if self.task == "classifier":
            d |= {"scores": self.scores, "score_kind": self.score_kind, "classes": list(self.classes)}
        if self.task == "anomaly":
            d |= {"pred_score": self.pred_score, "anomaly_map": self.anomaly_map}
        if self.task == "detector":
            d |= {"detections": self.detections, "layout": self.layout, "classes": list(self.classes)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ModelCard:
        if not isinstance(d, dict):
            raise ModelError(f"{where}: model card must be a table/object")
        unknown = sorted(set(d) - KEYS)
        if unknown:
            raise ModelError(
                f"{where}: model card has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})"
            )
        task = str(d.get("task", "features"))

        def opt(key: str, default: str | None = None) -> str | None:
            return str(d[key]) if d.get(key) else default

        try:
            return cls(
                name=str(d.get("name", "model")),
                task=task,
                features=opt("features"),
                logits=opt("logits"),
                taps=tuple(str(t) for t in d.get("taps", ())),
                maps=tuple(str(t) for t in d.get("maps", ())),
                preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})),
                model_hash=str(d.get("model_hash", "")),
                tensors={str(k): str(v) for k, v in dict(d.get("tensors", {})).items()},
                scores=opt("scores"),
                score_kind=str(d.get("score_kind", "logits")),
                classes=tuple(str(c) for c in d.get("classes", ())),
                pred_score=opt("pred_score"),
                anomaly_map=opt("anomaly_map"),
                detections=opt("detections"),
                layout=str(d.get("layout", "ultralytics")),
            )
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: bad model card ({exc})") from None


KEYS = {f for f in ModelCard.__dataclass_fields__}


def with_hash(card: ModelCard, path: Path) -> ModelCard:
    """A card without a declared hash is bound to the file's bytes."""
    return card if card.model_hash else replace(card, model_hash=file_hash(path))


def card_file_paths(model_path: Path) -> list[Path]:
    return [model_path.with_name(model_path.name + ".card.json"), model_path.with_name(model_path.name + ".card.toml")]


def read_card_file(model_path: Path) -> ModelCard | None:
    for p in card_file_paths(model_path):
        if not p.exists():
            continue
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{p}: unreadable model card ({exc})") from None
        return ModelCard.from_dict(data, str(p))
    return None


def write_card_file(model_path: Path, card: ModelCard) -> Path:
    p = card_file_paths(model_path)[0]
    p.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return p


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
