"""ONNX -> TFLite (fp32 and int8) through onnx2tf, offline, with outputs mapped back to their names.

onnx2tf downloads a sample file unless it finds one in the working directory, so the conversion
runs in a scratch folder seeded with our own calibration frames. It also renames and reorders
outputs; each converted output is matched to its ONNX twin by shape and value, then recorded in
the model card beside the .tflite file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from bouncer.runtime.backends.litert import interpreter_class
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.modelcard import ModelCard, write_card_file

SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _to_unit_nhwc(batches: list[np.ndarray], card: ModelCard) -> np.ndarray:
    """Undo the card's normalisation: onnx2tf wants [0, 1] images plus mean/std."""
    pp = card.preprocessing
    mean = np.asarray(pp.mean, np.float32) / 255.0
    std = np.asarray(pp.std, np.float32) / 255.0
    x = np.concatenate(batches).transpose(0, 2, 3, 1)
    return (x * std + mean).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def map_outputs(tflite: Path, reference: dict[str, np.ndarray], sample: np.ndarray) -> dict[str, str]:
    """Logical output name -> TFLite tensor name, by shape and then by best cosine with the ONNX output."""
    interp = interpreter_class()(model_path=str(tflite), num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = sample.transpose(0, 2, 3, 1)
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
    interp.set_tensor(inp["index"], np.ascontiguousarray(x))
    interp.invoke()
    got = {}
    for d in interp.get_output_details():
        y = interp.get_tensor(d["index"]).astype(np.float32)
        if d["dtype"] != np.float32 and d["quantization"][0]:
            y = (y - d["quantization"][1]) * d["quantization"][0]
        got[d["name"]] = y.transpose(0, 3, 1, 2) if y.ndim == 4 else y
    mapping: dict[str, str] = {}
    for name, ref in reference.items():
        candidates = [(t, _cos(ref, y)) for t, y in got.items() if y.shape == ref.shape and t not in mapping.values()]
        if not candidates:
            raise BouncerError(f"{tflite}: no converted output has the shape of {name} {ref.shape}")
        tensor, score = max(candidates, key=lambda c: c[1])
        if score < 0.9:
            raise BouncerError(f"{tflite}: output {name} does not match any converted output (best cosine {score:.3f})")
        mapping[name] = tensor
    return mapping


def convert_tflite(
    fp32_onnx: Path,
    card: ModelCard,
    calib: list[np.ndarray],
    reference: dict[str, np.ndarray],
    sample: np.ndarray,
    fp32_out: Path,
    int8_out: Path | None,
    int8_io_out: Path | None = None,
) -> list[ModelCard]:
    """Write fp32 and int8 (float I/O, int8 inside) TFLite models with their cards; return the cards.

    `int8_io_out` also keeps the fully integer model (int8 input and outputs), for accelerators that
    need it; the backend quantizes its input and dequantizes its outputs with each tensor's scale.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import onnx2tf
    except ImportError as exc:
        raise BouncerError(f"--tflite needs the [tflite-export] extra (tensorflow-cpu, onnx2tf): {exc}") from None
    if interpreter_class() is None:
        raise BouncerError("--tflite needs a LiteRT runtime to verify the result (the [litert] extra)")
    import onnx

    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    unit = _to_unit_nhwc(calib, card)
    pp = card.preprocessing
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = np.stack([cv2.resize(im, (128, 128)) for im in unit[:20]])
        small = np.concatenate([small] * (20 // len(small) + 1))[:20]
        np.save(work / SAMPLE_NAME, small)
        np.save(work / "calib.npy", unit)
        cwd = Path.cwd()
        try:
            os.chdir(work)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                onnx2tf.convert(
                    input_onnx_file_path=str(fp32_onnx),
                    output_folder_path=str(work / "out"),
                    output_integer_quantized_tflite=int8_out is not None or int8_io_out is not None,
                    batch_size=1,
                    non_verbose=True,
                    custom_input_op_name_np_data_path=[
                        [input_name, str(work / "calib.npy"), [m / 255 for m in pp.mean], [s / 255 for s in pp.std]]
                    ],
                )
        except Exception as exc:
            tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
            raise BouncerError(f"{fp32_onnx}: onnx2tf conversion failed ({exc}); last output:\n{tail}") from None
        finally:
            os.chdir(cwd)
        stem = fp32_onnx.stem
        made = {
            "fp32": (work / "out" / f"{stem}_float32.tflite", fp32_out),
            "int8": (work / "out" / f"{stem}_integer_quant.tflite", int8_out),
            "int8io": (work / "out" / f"{stem}_full_integer_quant.tflite", int8_io_out),
        }
        cards = []
        for kind, (src, dst) in made.items():
            if dst is None:
                continue
            if not src.exists():
                raise BouncerError(f"onnx2tf did not produce {src.name}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            c = replace(
                card, name=f"{card.name}-tflite-{kind}", model_hash="", tensors=map_outputs(dst, reference, sample)
            )
            write_card_file(dst, c)
            cards.append(c)
    return cards
