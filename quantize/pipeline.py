"""The model pipeline behind `bouncer models build` and `bouncer quantize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bouncer.quantize.calibration import load_calibration
from bouncer.quantize.export import export_lite0
from bouncer.quantize.ort_int8 import quantize_onnx, resolve_activations
from bouncer.quantize.report import compare, quantization_report, run_all
from bouncer.runtime import backends, home
from bouncer.runtime.backends.base import check_model_file
from bouncer.runtime.errors import BouncerError
from bouncer.sim import simulator


def sibling(model: Path, tag: str, suffix: str) -> Path:
    """model.fp32.onnx or model.int8.onnx -> model.<tag><suffix>; other.onnx -> other.<tag><suffix>."""
    stem = model.stem.removesuffix(".fp32").removesuffix(".int8")
    return model.with_name(f"{stem}.{tag}{suffix}")


def quantize_model(
    model: Path,
    calib_dir: Path,
    out: Path | None = None,
    tflite: bool = False,
    activations: str = "auto",
    threads: int = 1,
    limit: int = 300,
) -> dict[str, Any]:
    """Make the int8 ONNX (and optionally fp32/int8 TFLite) models of `model`; return the report."""
    check_model_file(model)
    if model.suffix.lower() != ".onnx":
        raise BouncerError(f"{model}: quantize takes an fp32 .onnx model")
    fp32 = backends.load(model, threads)
    calib, held_out = load_calibration(calib_dir, fp32.card.preprocessing, limit=limit)
    int8_out = out or sibling(model, "int8", ".onnx")
    quantize_onnx(model, int8_out, fp32.card, calib, activations)
    pairs = {"onnxruntime": (model, int8_out)}
    if tflite:
        from bouncer.quantize.tflite import convert_tflite

        fp32_tfl, int8_tfl, int8io_tfl = (sibling(int8_out, tag, ".tflite") for tag in ("fp32", "int8", "int8io"))
        sample = held_out[0]
        convert_tflite(model, fp32.card, calib, fp32.run(sample), sample, fp32_tfl, int8_tfl, int8io_tfl)
        pairs["litert"] = (fp32_tfl, int8_tfl)
    report = quantization_report(pairs, held_out, threads)
    report["calibration_images"] = len(calib)
    report["activations"] = resolve_activations(activations)
    report["models"] = {rt: {"fp32": str(a), "int8": str(b)} for rt, (a, b) in pairs.items()}
    if tflite:
        # Same image, same named outputs, two runtimes: how far apart are they?
        cross = {}
        for precision, idx in (("fp32", 0), ("int8", 1)):
            ort_out = run_all(backends.load(pairs["onnxruntime"][idx], threads), held_out)
            tfl_out = run_all(backends.load(pairs["litert"][idx], threads), held_out)
            cross[precision] = compare(ort_out, tfl_out, fp32.card.logits)
        report["cross_runtime"] = cross
    report_path = int8_out.with_name(int8_out.name + ".report.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    report["report_path"] = str(report_path)
    return report


def default_calibration(per_class: int = 40) -> Path:
    """Simulator frames: the domain the demo camera sees. Real lines pass their own --calib folder."""
    folder = home.home() / "calib" / "simulator"
    marker = folder / ".complete"
    if not marker.exists():
        simulator.write_dataset(folder, per_class=per_class, seed=12345)
        marker.write_text("ok\n")
    return folder


def build_default_models(
    calib_dir: Path | None = None, tflite: bool = False, force: bool = False, activations: str = "auto"
) -> dict[str, Any]:
    """Export EfficientNet-Lite0 and quantize it into the cache; reuse what is already there."""
    models = home.models_dir()
    fp32 = models / home.FP32_ONNX
    int8 = models / home.INT8_ONNX
    wanted = [fp32, int8] + (
        [models / n for n in (home.FP32_TFLITE, home.INT8_TFLITE, home.INT8_IO_TFLITE)] if tflite else []
    )
    if all(p.exists() for p in wanted) and not force:
        return {"models": {"onnxruntime": {"fp32": str(fp32), "int8": str(int8)}}, "cached": True}
    if force or not fp32.exists():
        export_lite0(fp32)
    return quantize_model(fp32, calib_dir or default_calibration(), out=int8, tflite=tflite, activations=activations)
