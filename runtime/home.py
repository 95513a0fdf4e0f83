"""Where built models live: `$BOUNCER_HOME` (default `~/.cache/bouncer`), never the repository."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("BOUNCER_HOME") or Path.home() / ".cache" / "bouncer").expanduser()


def models_dir() -> Path:
    return home() / "models"


# Names of the models `bouncer models build` and `bouncer quantize` put in the cache.
FP32_ONNX = "efficientnet_lite0.fp32.onnx"
INT8_ONNX = "efficientnet_lite0.int8.onnx"
FP32_TFLITE = "efficientnet_lite0.fp32.tflite"
INT8_TFLITE = "efficientnet_lite0.int8.tflite"
INT8_IO_TFLITE = "efficientnet_lite0.int8io.tflite"  # int8 input/outputs too


def cached_model(runtime: str = "onnxruntime", precision: str = "int8") -> Path:
    """The default backbone in the cache. Devices never build models: they are built where torch lives
    (`bouncer models build`) and copied or cached."""
    from bouncer.runtime.errors import ModelError

    names = {
        ("onnxruntime", "int8"): INT8_ONNX,
        ("onnxruntime", "fp32"): FP32_ONNX,
        ("litert", "int8"): INT8_TFLITE,
        ("litert", "fp32"): FP32_TFLITE,
    }
    path = models_dir() / names[(runtime, precision)]
    if not path.exists():
        raise ModelError(
            f"{path}: no cached {precision} {runtime} backbone; run `bouncer models build` or pass --model"
        )
    return path
