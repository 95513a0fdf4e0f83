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


@dataclass(frozen=True)
class ModelCard:
    """Roles of a model's outputs. `features` is required: every head reads it."""

    name: str
    features: str = "features"
    logits: str | None = "logits"
    taps: tuple[str, ...] = ()  # pooled mid-level feature vectors, one per tap
    maps: tuple[str, ...] = ()  # spatial feature maps (N, C, H, W) for patch-level scores
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model_hash: str = ""  # identity of the weights; gate bundles are bound to it
    # logical output name -> the runtime's tensor name, where they differ (onnx2tf renames outputs)
    tensors: dict[str, str] = field(default_factory=dict)

    def tensor(self, logical: str) -> str:
        return self.tensors.get(logical, logical)

    def output_names(self) -> list[str]:
        names = [self.features, *self.taps, *self.maps]
        return names + ([self.logits] if self.logits else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "features": self.features,
            "logits": self.logits,
            "taps": list(self.taps),
            "maps": list(self.maps),
            "preprocessing": self.preprocessing.to_dict(),
            "model_hash": self.model_hash,
            "tensors": dict(self.tensors),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ModelCard:
        if not isinstance(d, dict):
            raise ModelError(f"{where}: model card must be a table/object")
        try:
            return cls(
                name=str(d.get("name", "model")),
                features=str(d["features"]),
                logits=(str(d["logits"]) if d.get("logits") else None),
                taps=tuple(str(t) for t in d.get("taps", ())),
                maps=tuple(str(t) for t in d.get("maps", ())),
                preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})),
                model_hash=str(d.get("model_hash", "")),
                tensors={str(k): str(v) for k, v in dict(d.get("tensors", {})).items()},
            )
        except KeyError as exc:
            raise ModelError(f"{where}: model card lacks the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: bad model card ({exc})") from None


def with_hash(card: ModelCard, path: Path) -> ModelCard:
    """A card without a declared hash is bound to the file's bytes."""
    return card if card.model_hash else replace(card, model_hash=file_hash(path))


def sidecar_paths(model_path: Path) -> list[Path]:
    return [model_path.with_name(model_path.name + ".card.json"), model_path.with_name(model_path.name + ".card.toml")]


def read_sidecar(model_path: Path) -> ModelCard | None:
    for p in sidecar_paths(model_path):
        if not p.exists():
            continue
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{p}: unreadable model card ({exc})") from None
        return ModelCard.from_dict(data, str(p))
    return None


def write_sidecar(model_path: Path, card: ModelCard) -> Path:
    p = sidecar_paths(model_path)[0]
    p.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return p


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
