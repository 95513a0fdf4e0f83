"""LiteRT backend (ai-edge-litert, or tflite-runtime where that is what is installed).

onnx2tf renames outputs and reorders them; the sidecar card maps logical names to tensor names.
Int8 inputs/outputs are (de)quantized with each tensor's scale and zero point, and NHWC maps are
returned NCHW like ONNX Runtime returns them.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from bouncer.runtime.backends.base import Backend, check_outputs
from bouncer.runtime.errors import ModelError
from bouncer.runtime.modelcard import read_card_file, with_hash


def interpreter_class():
    """The LiteRT Interpreter class, or None when no LiteRT runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    return Interpreter


def runtime_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("ai-edge-litert", "tflite-runtime"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{dist} {version(dist)}"
    return None


class LiteRTBackend(Backend):
    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.path = path
        self._lock = threading.Lock()
        interp_cls = interpreter_class()
        if interp_cls is None:
            raise ModelError(f"{path}: LiteRT is not installed (pip install 'bouncer[litert]')")
        card = read_card_file(path)
        if card is None:
            raise ModelError(f"{path}: no model card ({path.name}.card.json or .card.toml beside it)")
        self.card = with_hash(card, path)
        try:
            self.interp = interp_cls(model_path=str(path), num_threads=max(1, threads))
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: not a loadable TFLite model ({first[:200]})") from None
        outs = {d["name"]: d for d in self.interp.get_output_details()}
        check_outputs(path, self.card, set(outs))
        self.outputs = {n: outs[self.card.tensor(n)] for n in self.card.output_names()}
        inputs = self.interp.get_input_details()
        if len(inputs) != 1 or len(inputs[0]["shape"]) != 4:
            raise ModelError(f"{path}: expected one 4-d image input")
        self.input = inputs[0]
        shape = tuple(int(s) for s in self.input["shape"])
        self.nhwc = shape[3] == 3
        pp = self.card.preprocessing
        hw = shape[1:3] if self.nhwc else shape[2:4]
        if hw != (pp.height, pp.width):
            raise ModelError(f"{path}: input is {hw}, card says {pp.height}x{pp.width}")

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _output(self, name: str) -> np.ndarray:
        d = self.outputs[name]
        y = self.interp.get_tensor(d["index"])
        if y.dtype != np.float32:
            scale, zero = d["quantization"]
            y = (y.astype(np.float32) - zero) * np.float32(scale) if scale else y.astype(np.float32)
        if self.nhwc and y.ndim == 4:
            y = y.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(y)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        pp = self.card.preprocessing
        x = self.check_batch(batch, pp.height, pp.width)
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        results: dict[str, list[np.ndarray]] = {n: [] for n in self.outputs}
        for item in x:  # converted models have a static batch of one
            # an interpreter is not thread-safe; a gate update warms its new gate beside the frame loop
            with self._lock:
                self.interp.set_tensor(self.input["index"], np.ascontiguousarray(self._quantize_input(item[None])))
                self.interp.invoke()
                for n in self.outputs:
                    results[n].append(self._output(n))
        return {n: np.concatenate(v) for n, v in results.items()}
