"""What quantization cost: size, latency, top-1 agreement and feature cosine against the fp32 model."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bouncer.runtime import backends
from bouncer.runtime.timing import interleaved_latency_ms, percentiles


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def run_all(model: backends.Backend, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    outs = [model.run(x) for x in inputs]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], logits: str | None) -> dict[str, Any]:
    """Median/min cosine per output and top-1 agreement of `other` against `reference`."""
    rows: dict[str, Any] = {"cosine": {}}
    for name, ref in reference.items():
        c = cosine_rows(ref, other[name])
        rows["cosine"][name] = {"median": round(float(np.median(c)), 5), "min": round(float(c.min()), 5)}
    if logits:
        agree = reference[logits].argmax(1) == other[logits].argmax(1)
        rows["top1_agreement"] = round(float(agree.mean()), 4)
    return rows


def quantization_report(pairs: dict[str, tuple[Path, Path]], held_out: list[np.ndarray], threads: int = 1) -> dict:
    """pairs: runtime -> (fp32 model, int8 model). Every figure is measured in this one run."""
    report: dict[str, Any] = {"held_out_images": len(held_out), "threads": threads, "runtimes": {}}
    for runtime, (fp32_path, int8_path) in pairs.items():
        fp32 = backends.load(fp32_path, threads)
        int8 = backends.load(int8_path, threads)
        x = held_out[0]
        lat = interleaved_latency_ms({"fp32": partial(fp32.run, x), "int8": partial(int8.run, x)})
        entry: dict[str, Any] = {
            "fp32_mb": round(fp32_path.stat().st_size / 1e6, 2),
            "int8_mb": round(int8_path.stat().st_size / 1e6, 2),
            "fp32_ms": percentiles(lat["fp32"]),
            "int8_ms": percentiles(lat["int8"]),
        }
        entry["int8_speedup"] = round(entry["fp32_ms"]["p50"] / entry["int8_ms"]["p50"], 2)
        entry.update(compare(run_all(fp32, held_out), run_all(int8, held_out), fp32.card.logits))
        report["runtimes"][runtime] = entry
    return report


def format_report(report: dict) -> str:
    lines = [f"held-out images: {report['held_out_images']}, threads: {report['threads']}"]
    for runtime, e in report["runtimes"].items():
        lines.append(
            f"[{runtime}] size fp32 {e['fp32_mb']} MB -> int8 {e['int8_mb']} MB; "
            f"latency ms p50/p90/p99 fp32 {e['fp32_ms']['p50']}/{e['fp32_ms']['p90']}/{e['fp32_ms']['p99']} "
            f"int8 {e['int8_ms']['p50']}/{e['int8_ms']['p90']}/{e['int8_ms']['p99']} "
            f"(x{e['int8_speedup']})"
        )
        if "top1_agreement" in e:
            lines.append(f"[{runtime}] top-1 agreement int8 vs fp32: {e['top1_agreement']:.1%}")
        for name, c in e["cosine"].items():
            lines.append(f"[{runtime}] cosine {name:<10} median {c['median']:.4f}  min {c['min']:.4f}")
    return "\n".join(lines)
