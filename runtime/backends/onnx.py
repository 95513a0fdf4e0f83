"""ONNX Runtime backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bouncer.runtime.backends.base import Backend, check_outputs
from bouncer.runtime.errors import ModelError
from bouncer.runtime.modelcard import CARD_KEY, ModelCard, read_card_file, with_hash

ort.set_default_logger_severity(3)


class OnnxBackend(Backend):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1, providers: list[str] | None = None) -> None:
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads would spin and steal the core the frame loop and MQTT link need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        except Exception as exc:  # ORT raises several private exception types for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: not a loadable ONNX model ({first[:200]})") from None
        self.providers = self.session.get_providers()
        self.card = self._card()
        check_outputs(path, self.card, {o.name for o in self.session.get_outputs()})
        self.tensor_names = [self.card.tensor(n) for n in self.card.output_names()]
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise ModelError(f"{path}: expected one image input, model has {len(inp)}")
        self.input_name = inp[0].name
        shape = inp[0].shape
        pp = self.card.preprocessing
        if len(shape) != 4:
            raise ModelError(f"{path}: input {self.input_name} has rank {len(shape)}, expected 4 (NCHW)")
        self.nhwc = shape[-1] == 3 and shape[1] != 3
        spatial = shape[1:3] if self.nhwc else shape[2:4]
        if all(isinstance(s, int) for s in spatial) and tuple(spatial) != (pp.height, pp.width):
            raise ModelError(f"{path}: input is {spatial}, card says {pp.height}x{pp.width}")
        self.output_names = self.card.output_names()
        self.static_batch = shape[0] if isinstance(shape[0], int) else None

    def _card(self) -> ModelCard:
        meta = self.session.get_modelmeta().custom_metadata_map
        if CARD_KEY in meta:
            try:
                card = ModelCard.from_dict(json.loads(meta[CARD_KEY]), f"{self.path} (metadata)")
            except ValueError as exc:
                raise ModelError(f"{self.path}: corrupt model card in metadata ({exc})") from None
        else:
            card_file = read_card_file(self.path)
            if card_file is None:
                raise ModelError(
                    f"{self.path}: no model card (metadata key {CARD_KEY!r} or {self.path.name}.card.json/.toml)"
                )
            card = card_file
        return with_hash(card, self.path)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        pp = self.card.preprocessing
        x = self.check_batch(batch, pp.height, pp.width)
        if self.nhwc:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if self.static_batch == 1 and len(x) > 1:
            runs = [self.session.run(self.tensor_names, {self.input_name: item[None]}) for item in x]
            outs = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        else:
            outs = self.session.run(self.tensor_names, {self.input_name: x})
        return dict(zip(self.output_names, outs, strict=True))
