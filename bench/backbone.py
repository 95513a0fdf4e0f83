"""Backbone benchmark: fp32 vs int8 on ONNX Runtime and LiteRT, 1 and 2 threads, one interleaved run."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime import backends
from bouncer.runtime.preprocess import preprocess
from bouncer.runtime.timing import interleaved_latency_ms
from bouncer.sim import simulator


def held_out_frames(n: int = 24, seed: int = 987) -> list[np.ndarray]:
    """Fresh simulator frames (a seed the calibration never used): same domain, unseen images."""
    rng = np.random.default_rng(seed)
    parts = simulator.KNOWN_CLASSES
    return [simulator.render(parts[i % len(parts)], rng) for i in range(n)]


def bench_backbone(models: dict[str, dict[str, Path]], rounds: int = 5, per_round: int = 20) -> dict[str, Any]:
    """models: runtime -> {"fp32": path, "int8": path}. Returns every figure, measured in this run."""
    frames = held_out_frames()
    results: dict[str, Any] = {"latency_ms": {}, "cosine_median": {}}
    for threads in (1, 2):
        loaded = {f"{rt}_{prec}": backends.load(p, threads) for rt, d in models.items() for prec, p in d.items()}
        x = preprocess(frames[0], next(iter(loaded.values())).card.preprocessing)
        lat = interleaved_latency_ms({k: partial(m.run, x) for k, m in loaded.items()}, rounds, per_round)
        for k, v in lat.items():
            results["latency_ms"][f"{k}_t{threads}"] = round(float(np.median(v)), 3)
        if threads == 1:
            for rt in models:
                fp32, int8 = loaded[f"{rt}_fp32"], loaded[f"{rt}_int8"]
                cos = {}
                for name in fp32.card.output_names():
                    if name == fp32.card.logits:
                        continue
                    c = []
                    for f in frames:
                        xi = preprocess(f, fp32.card.preprocessing)
                        a, b = fp32.run(xi)[name].ravel(), int8.run(xi)[name].ravel()
                        c.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
                    cos[name] = round(float(np.median(c)), 4)
                results["cosine_median"][rt] = cos
    lat = results["latency_ms"]
    summary = {
        "ort_fp32_ms": lat.get("onnxruntime_fp32_t1"),
        "ort_int8_ms": lat.get("onnxruntime_int8_t1"),
        "litert_fp32_ms": lat.get("litert_fp32_t1"),
        "litert_int8_ms": lat.get("litert_int8_t1"),
        "ort_fp32_ms_2t": lat.get("onnxruntime_fp32_t2"),
        "ort_int8_ms_2t": lat.get("onnxruntime_int8_t2"),
        "litert_fp32_ms_2t": lat.get("litert_fp32_t2"),
        "litert_int8_ms_2t": lat.get("litert_int8_t2"),
    }
    summary["int8_speedup"] = round(summary["ort_fp32_ms"] / summary["ort_int8_ms"], 3)
    if summary["litert_int8_ms"]:
        summary["litert_int8_speedup"] = round(summary["litert_fp32_ms"] / summary["litert_int8_ms"], 3)
    summary["int8_mb"] = round(Path(models["onnxruntime"]["int8"]).stat().st_size / 1e6, 3)
    summary["min_feature_cosine_median"] = min(min(v.values()) for v in results["cosine_median"].values())
    results["summary"] = summary
    return results
