"""`bouncer bench detector`: the guard around a YOLO detector on the simulator's detection mode, one run.

A YOLOv8n is trained on the simulated line (`bouncer models example detector`, cached in the work folder). One
extraction of a pool of labelled frames is re-split many times (seeded) into calibration and test halves; each
split fits the gate's calibration and threshold (`fit_detector_from`) and is judged on its test half, plus frames
with an unknown object on the belt (a bolt or a giraffe, never labelled) and corrupted frames (blur, noise,
light, JPEG). Reported: the share of accepted frames with any error (a missed object, a false box, a wrong
class) against the target and the stated bound, frame coverage, unknown-object and corrupted frames accepted,
the same for the common practice (accept a frame when every box scores at least 0.5), the per-class
calibration error before and after, how many splits kept the guarantee, and the guard's cost per frame.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.fitting.corruptions import CORRUPTIONS
from bouncer.fitting.detector import (
    binary_ece,
    default_heads,
    every_box_over_half,
    fit_detector_from,
    judge_frames,
    match,
    read_truth,
)
from bouncer.fitting.fit import Extracted, FitSettings, extract
from bouncer.quantize.detector import make_detector
from bouncer.runtime import backends
from bouncer.runtime.backends.paired import PairedBackend
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.detector import DetectorTask
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.heads import input_key, input_sources
from bouncer.runtime.images import read_bgr
from bouncer.runtime.preprocess import input_to_frame, preprocess
from bouncer.sim.detection import write_detection_dataset

TARGET, DELTA = 0.95, 0.1
FRAMES = {"train": 300, "pool": 600, "unknown": 150, "corrupt": 150}


def _folders(work: Path, say: Callable[[str], None]) -> dict[str, Path]:
    out = {}
    for seed, name in enumerate(FRAMES, 1):
        out[name] = work / name
        if not (out[name] / "boxes.jsonl").is_file():
            say(f"writing {FRAMES[name]} {name} frames")
            unknown = ("bolt", "giraffe") if name == "unknown" else ()
            write_detection_dataset(out[name], FRAMES[name], seed=seed, unknown=unknown, unknown_rate=1.0)
    corrupt = work / "corrupted"
    if not corrupt.is_dir():
        (corrupt / "images").mkdir(parents=True)
        rng = np.random.default_rng(9)
        names = sorted(CORRUPTIONS)
        for i, p in enumerate(sorted((out["corrupt"] / "images").iterdir())):
            cv2.imwrite(str(corrupt / "images" / p.name), CORRUPTIONS[names[i % len(names)]](read_bgr(p), rng))
    out["corrupted"] = corrupt
    return out


def _images(folder: Path) -> list[Path]:
    return sorted((folder / "images").iterdir())


def bench_detector(
    sidecar_model: Path, work: Path, seeds: int = 20, epochs: int = 12, say: Callable[[str], None] = print
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    folders = _folders(work, say)
    model = work / "yolov8n-sim.onnx"
    if not model.is_file():
        make_detector(folders["train"], model, epochs=epochs, log=say)
    backend = PairedBackend(backends.load(model, threads=1), backends.load(sidecar_model, threads=1))
    card = backend.card
    assert card.detections is not None
    classes, pp = list(card.classes), card.preprocessing
    heads = default_heads(card, sidecar=True)
    sources = {s for h in heads for s in input_sources(input_key(h))}
    ex = {}
    for name in ("train", "pool", "unknown", "corrupted"):
        paths = _images(folders[name])
        say(f"extracting {len(paths)} {name} frames")
        ex[name] = extract(backend, pp, paths, [0] * len(paths), sources)
    truth = [read_truth(p, s, len(classes)) for p, s in zip(ex["pool"].paths, ex["pool"].sizes, strict=True)]

    side = {"name": backend.sidecar.card.name, "hash": backend.sidecar.card.model_hash}

    # the common practice: every frame accepted, with the boxes scoring at least 0.5
    practice_wrong = ~every_box_over_half(card.layout, len(classes), ex["pool"], card.detections, pp, truth)

    splits: list[dict[str, Any]] = []
    per_class: dict[str, Any] = {}
    n = len(ex["pool"].paths)
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(n)
        cal, test = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
        settings = FitSettings(target_accuracy=TARGET, delta=DELTA, seed=seed)
        bundle = fit_detector_from(card, ex["train"], ex["pool"].take(cal), [truth[i] for i in cal], settings,
                                   heads, side, log=lambda m: None)  # fmt: skip
        test_ex, test_truth = ex["pool"].take(test), [truth[i] for i in test]
        acc, correct = judge_frames(bundle, test_ex, card.detections, test_truth)
        unk, _ = judge_frames(bundle, ex["unknown"], card.detections, None)
        cor, _ = judge_frames(bundle, ex["corrupted"], card.detections, None)
        n_acc = int(acc.sum())
        err = float((~correct[acc]).mean()) if n_acc else 0.0
        fit = bundle.fit.detector
        assert fit is not None, "a detector gate's fit records its box calibration"
        splits.append({
            "seed": seed, "threshold": bundle.acceptance.threshold, "error_bound": bundle.acceptance.error_bound,
            "accepted": n_acc, "test_frames": len(test), "accepted_error": round(err, 4),
            "coverage": round(n_acc / len(test), 4), "unknown_accepted": int(unk.sum()),
            "corrupted_accepted": int(cor.sum()), "ece_before": fit.ece_before_calibration,
            "ece_after": fit.ece_after_calibration,
        })  # fmt: skip
        if seed == 0:
            per_class = _per_class_ece(bundle, test_ex, card.detections, test_truth)
        say(f"split {seed}: {splits[-1]}")

    # cost per frame: the detector alone, the sidecar, the guard's own work (decode, NMS, calibration, heads)
    guard = Guard(bundle, backend)
    t_det, t_side, t_guard = [], [], []
    for f in (read_bgr(p) for p in _images(folders["pool"])[:60]):
        inp = preprocess(f, pp)
        t0 = time.perf_counter()
        backend.model.run(inp)
        t_det.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        guard.score_frame(f)
        t_guard.append(time.perf_counter() - t0 - guard.last_backbone_s)
        t_side.append(max(guard.last_backbone_s - t_det[-1], 0.0))
    det_ms, side_ms, guard_ms = (float(np.median(t)) * 1e3 for t in (t_det, t_side, t_guard))
    held = sum(s["accepted_error"] <= 1 - TARGET for s in splits)
    return {
        "target_accuracy": TARGET, "delta": DELTA, "splits": splits, "splits_holding": held,
        "pool_frames": n, "unknown_frames": len(ex["unknown"].paths), "corrupted_frames": len(ex["corrupted"].paths),
        "practice": {"accepted_error": round(float(np.mean(practice_wrong)), 4), "coverage": 1.0,
                     "unknown_accepted": len(ex["unknown"].paths), "corrupted_accepted": len(ex["corrupted"].paths)},
        "per_class_ece": per_class,
        "cost_ms": {"detector": round(det_ms, 2), "sidecar": round(side_ms, 2), "guard": round(guard_ms, 3),
                    "guard_over_detector": round(guard_ms / det_ms, 4)},
    }  # fmt: skip


def _per_class_ece(bundle: GateBundle, ex: Extracted, key: str, truth: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per class: the box-score calibration error (a true box of this class at IoU 0.5) before and after, on
    frames that did not fit the calibration."""
    task, pp = bundle.task, bundle.preprocessing
    assert isinstance(task, DetectorTask)
    rows: dict[int, list] = {}
    for raw, (w, h), tr in zip(ex.outputs[key], ex.sizes, truth, strict=True):
        boxes, cls, best, _ = task.candidates(raw)
        hit, _ = match(input_to_frame(boxes, w, h, pp), cls, tr)
        for c, s, p, y in zip(cls, best, task.calibrate(cls, best), hit, strict=True):
            rows.setdefault(int(c), []).append((float(s), float(p), float(y)))
    out = {}
    for c, r in sorted(rows.items()):
        a = np.array(r)
        out[bundle.classes[c]] = {"candidates": len(a), "before": round(binary_ece(a[:, 0], a[:, 2]), 4),
                                  "after": round(binary_ece(a[:, 1], a[:, 2]), 4)}  # fmt: skip
    return out


def print_detector(r: dict[str, Any]) -> None:
    s = r["splits"]
    err = np.array([x["accepted_error"] for x in s])
    cov = np.array([x["coverage"] for x in s])
    unk = np.array([x["unknown_accepted"] for x in s])
    cor = np.array([x["corrupted_accepted"] for x in s])
    bound = [x["error_bound"] for x in s if x["error_bound"] is not None]
    print(f"detector gate, target accuracy {r['target_accuracy']} at delta {r['delta']}, {len(s)} seeded splits of "
          f"{r['pool_frames']} labelled frames into calibration and test halves")  # fmt: skip
    print("| rule | accepted frames with any error (median, max) | stated bound (median) | frame coverage (median) "
          f"| unknown-object frames accepted (of {r['unknown_frames']}) | corrupted frames accepted "
          f"(of {r['corrupted_frames']}) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| the guard | {np.median(err):.4f}, {err.max():.4f} | {np.median(bound) if bound else float('nan'):.4f} | "
          f"{np.median(cov):.3f} | {int(np.median(unk))} (range {unk.min()}-{unk.max()}) | {int(np.median(cor))} "
          f"(range {cor.min()}-{cor.max()}) |")  # fmt: skip
    p = r["practice"]
    print(f"| every box >= 0.5 | {p['accepted_error']:.4f} | none | {p['coverage']:.3f} | {p['unknown_accepted']} | "
          f"{p['corrupted_accepted']} |")  # fmt: skip
    print(f"guarantee held (accepted error <= {1 - r['target_accuracy']:.2f}) in {r['splits_holding']} of {len(s)} "
          f"splits (required: at least {1 - r['delta']:.0%})")  # fmt: skip
    print("| class | candidates | ECE before | ECE after |")
    print("| --- | --- | --- | --- |")
    for c, v in r["per_class_ece"].items():
        print(f"| {c} | {v['candidates']} | {v['before']:.4f} | {v['after']:.4f} |")
    c = r["cost_ms"]
    print(f"cost per frame: detector {c['detector']:.2f} ms, sidecar {c['sidecar']:.2f} ms, the guard's own work "
          f"{c['guard']:.3f} ms = {c['guard_over_detector']:.1%} of the detector call")  # fmt: skip
    print(json.dumps(r))
