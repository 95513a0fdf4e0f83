"""The backend interface and the loader that picks ONNX Runtime or LiteRT by file type."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from bouncer.runtime.errors import ModelError
from bouncer.runtime.modelcard import ModelCard


class Backend(ABC):
    """A loaded model. `run` takes a float32 NCHW batch and returns every card output by name.

    Spatial maps come back NCHW whatever the runtime's native layout, so heads never care which
    runtime produced them.
    """

    runtime: str
    card: ModelCard
    path: Path

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def check_batch(self, batch: np.ndarray, height: int, width: int) -> np.ndarray:
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != (3, height, width):
            got = getattr(batch, "shape", type(batch).__name__)
            raise ValueError(f"{self.path.name}: expected a float32 batch (N, 3, {height}, {width}), got {got}")
        return np.ascontiguousarray(batch, dtype=np.float32)


def check_model_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty model file (0 bytes)")


def check_outputs(path: Path, card: ModelCard, available: set[str]) -> None:
    missing = [card.tensor(n) for n in card.output_names() if card.tensor(n) not in available]
    if missing:
        raise ModelError(
            f"{path}: model lacks required output(s) {', '.join(missing)} (has: {', '.join(sorted(available))})"
        )


def load(path: str | Path, threads: int = 1, providers: list[str] | None = None) -> Backend:
    """Load an .onnx model with ONNX Runtime or a .tflite model with LiteRT."""
    path = Path(path)
    check_model_file(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from bouncer.runtime.backends.onnx import OnnxBackend

        return OnnxBackend(path, threads, providers)
    if suffix == ".tflite":
        from bouncer.runtime.backends.litert import LiteRTBackend

        return LiteRTBackend(path, threads)
    raise ModelError(f"{path}: unknown model type {suffix or '(no suffix)'} (expected .onnx or .tflite)")
