"""`bouncer bench hotpath`: every kernel, numpy reference vs C++, at real sizes; and the guard's per-frame
overhead (everything but the backbone call) as a fraction of the int8 backbone call, all in one run."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.fitting.fit import fit_gate
from bouncer.runtime import backends, kernels
from bouncer.runtime.gates.decision import Verdict
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.heads import Fusion
from bouncer.runtime.kernels import reference
from bouncer.runtime.preprocess import preprocess
from bouncer.runtime.timing import interleaved_latency_ms
from bouncer.sim import simulator

KERNEL_NAMES = (
    "halve",
    "halve_with_grey",
    "resize_normalize",
    "quality_stats",
    "linear_probs",
    "mahalanobis",
    "knn_score",
    "spatial_max",
    "fuse",
)


def _median_us(fns: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, float]:
    lat = interleaved_latency_ms(fns, rounds=rounds, per_round=per_round, warmup=20)
    return {k: float(np.median(v)) * 1e3 for k, v in lat.items()}


def kernel_cases(classes: int = 16, bank_rows: int = 10_000) -> dict[str, tuple[str, tuple]]:
    """name -> (kernel, arguments) at the sizes a camera sees."""
    rng = np.random.default_rng(0)

    def unit(n: int, d: int) -> np.ndarray:
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    half = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    chw = np.empty((3, 224, 224), np.float32)  # the guard writes into a preallocated input buffer
    grey, prev = (rng.integers(0, 256, (120, 160), dtype=np.uint8) for _ in range(2))
    feats, tap = unit(1, 1280), unit(1, 192)
    w, b = rng.normal(size=(classes, 1280)).astype(np.float32), rng.normal(size=classes).astype(np.float32)

    def gauss(d: int, r: int) -> tuple:
        means = unit(classes, d)
        basis = np.ascontiguousarray(np.linalg.qr(rng.normal(size=(d, r)))[0], np.float16)  # as heads store it
        inv = rng.uniform(1, 100, r).astype(np.float32)
        return means, basis, inv, 50.0, np.ascontiguousarray(means @ basis.astype(np.float32))

    bank32 = unit(bank_rows, 192)
    bank8, scale8 = reference.quantize_bank(bank32)
    fmap = rng.random((1, 112, 14, 14), dtype=np.float32)
    # the patch head (runtime/gates/patch.py): a frame's patches against a coreset bank, the user's costlier choice
    patches8, patches16 = unit(784, 152), unit(196, 112)
    coreset8, coreset16 = unit(1000, 152).astype(np.float16), unit(1000, 112).astype(np.float16)
    # a tile head (runtime/tiles.py): 12 tiles' pooled vectors against a coreset of training tiles (beside the
    # 12 backbone calls the tiles cost, which dominate: `bouncer fit` prints those)
    tiles320, tilebank = unit(12, 320), unit(1000, 320).astype(np.float16)
    scores = rng.normal(size=(1, 3)).astype(np.float32)
    # three heads' conformal -log p curves of 48 knots each (what `bouncer fit` stores)
    fusion = Fusion.fit(["a", "b", "c"], rng.gamma(2.0, 1.0, (300, 3)), "max")
    # a YOLO export's raw output at 640 px with 80 classes (8400 candidates; a few hundred over the 0.01 floor),
    # and the candidates NMS then sees
    cls_scores = rng.uniform(0, 0.004, (80, 8400))
    cls_scores[rng.integers(0, 80, 400), rng.choice(8400, 400, replace=False)] = rng.uniform(0.005, 0.95, 400)
    raw = np.ascontiguousarray(np.concatenate([rng.uniform(0, 640, (4, 8400)), cls_scores]), np.float32)
    cand_boxes, cand_scores, _ = reference.decode_boxes(raw, 0, 80, 0.01, 300)
    return {
        "halve (640x480 BGR -> 320x240)": ("halve", (frame,)),
        "halve_with_grey (640x480 BGR -> 320x240 + 160x120 grey)": ("halve_with_grey", (frame,)),
        "resize_normalize (320x240 BGR -> 224x224 CHW)": (
            "resize_normalize",
            (half, (127.0,) * 3, (128.0,) * 3, True, chw),
        ),
        "quality_stats (160x120 grey + previous)": ("quality_stats", (grey, prev, 4, 8, 247)),
        f"linear_probs (1280-d, {classes} classes)": ("linear_probs", (feats, w, b, 1.3)),
        f"mahalanobis features (1280-d, rank 256, {classes} means)": ("mahalanobis", (feats, *gauss(1280, 256))),
        f"mahalanobis pool_s32 (192-d, full rank, {classes} means)": ("mahalanobis", (tap, *gauss(192, 192))),
        f"knn_score fp16 bank ({bank_rows} x 192)": ("knn_score", (tap, bank32.astype(np.float16), 1)),
        f"knn_score int8 bank ({bank_rows} x 192)": ("knn_score", (tap, bank8, 1, scale8)),
        "spatial_max (112 x 14 x 14)": ("spatial_max", (fmap,)),
        "patchknn:map_s8+map_s16 (784 patches x 152 against a 1000-patch fp16 coreset)": (
            "knn_score",
            (patches8, coreset8, 1),
        ),
        "patchknn:map_s16 (196 patches x 112 against a 1000-patch fp16 coreset)": (
            "knn_score",
            (patches16, coreset16, 1),
        ),
        "knn:pool_s32b@tiles (12 tiles x 320 against a 1000-tile fp16 coreset)": (
            "knn_score",
            (tiles320, tilebank, 1),
        ),
        "decode_boxes (YOLO 84 x 8400, 0.01 floor, at most 300)": ("decode_boxes", (raw, 0, 80, 0.01, 300)),
        f"nms ({len(cand_boxes)} candidates, 80 classes, IoU 0.7)": ("nms", (cand_boxes, cand_scores, 0.7)),
        f"fuse (3 heads, {fusion.knots_x.shape[1]} knots, max of -log p)": (
            "fuse",
            (scores, fusion.knots_x, fusion.knots_y, fusion.slope_lo, fusion.slope_hi, 1),
        ),
    }


def bench_kernels(cpp, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, (fn, args) in kernel_cases().items():
        t = _median_us(
            {"numpy": partial(getattr(reference, fn), *args), "cpp": partial(getattr(cpp, fn), *args)},
            rounds,
            per_round,
        )
        out[name] = {
            "numpy_us": round(t["numpy"], 2),
            "cpp_us": round(t["cpp"], 2),
            "speedup": round(t["numpy"] / t["cpp"], 2),
        }
    return out


@contextmanager
def numpy_kernels():
    """Route the runtime through the numpy reference for a moment (to measure the guard both ways)."""
    saved = {n: getattr(kernels, n) for n in KERNEL_NAMES}
    try:
        for n in KERNEL_NAMES:
            setattr(kernels, n, getattr(reference, n))
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)


def camera_frame(part: str, rng: np.random.Generator) -> np.ndarray:
    """A simulated frame at the 640x480 a camera delivers."""
    return cv2.resize(simulator.render(part, rng), (640, 480), interpolation=cv2.INTER_LINEAR)


def small_gate(backend: backends.Backend, work: Path):
    """A gate fitted on 640x480 frames of the simulated line (default heads)."""
    for split, n, seed in (("train", 30, 1), ("calib", 60, 2)):
        rng = np.random.default_rng(seed)
        for part in simulator.KNOWN_CLASSES:
            (work / split / part).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(work / split / part / f"{i}.png"), camera_frame(part, rng))
    return fit_gate(backend, work / "train", work / "calib", log=lambda m: None)


def bench_guard(model: Path, work: Path, rounds: int, per_round: int) -> dict[str, Any]:
    backend = backends.load(model, 1)
    guard = Guard(small_gate(backend, work), backend)
    frame = camera_frame("gear", np.random.default_rng(5))
    assert guard.score_frames([frame])[0].decision == Verdict.ACCEPT, "the benchmark frame must take the full path"
    x = preprocess(frame, guard.bundle.preprocessing)
    # the previous frame of the stream: a different part on the belt (the same frame would be "frozen")
    prev = cv2.resize(
        cv2.cvtColor(camera_frame("washer", np.random.default_rng(6)), cv2.COLOR_BGR2GRAY),
        (160, 120),
        interpolation=cv2.INTER_AREA,
    )

    def guarded_split(numpy: bool) -> tuple[float, float]:
        """One guarded frame: (total seconds, seconds inside the backbone call)."""
        t0 = time.perf_counter()
        if numpy:
            with numpy_kernels():
                guard.score_frames([frame], [prev])
        else:
            guard.score_frames([frame], [prev])
        return time.perf_counter() - t0, guard.last_backbone_s

    for numpy in (False, True):  # warm up both paths
        for _ in range(10):
            guarded_split(numpy)
    samples: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):  # interleaved rounds, as everywhere
        for numpy in (False, True):
            samples[numpy].extend(guarded_split(numpy) for _ in range(per_round))
    t = _median_us({"backbone": lambda: backend.run(x)}, rounds, per_round)

    def split(numpy: bool) -> tuple[float, float]:
        total = np.array([a for a, _ in samples[numpy]])
        inside = np.array([b for _, b in samples[numpy]])
        return float(np.median(total)) * 1e6, float(np.median(total - inside)) * 1e6

    total_cpp, own_cpp = split(False)
    total_np, own_np = split(True)
    inside = float(np.median([b for _, b in samples[False]])) * 1e6
    return {
        "backbone_us": round(inside, 1),
        "backbone_alone_us": round(t["backbone"], 1),
        "guarded_frame_us": round(total_cpp, 1),
        "guarded_frame_numpy_us": round(total_np, 1),
        "guard_us": round(own_cpp, 1),
        "guard_numpy_us": round(own_np, 1),
        # everything but the backbone call, per frame, as a fraction of that frame's backbone call
        "guard_overhead": round(own_cpp / inside, 4),
        "guard_overhead_numpy": round(own_np / inside, 4),
        "frame": "640x480 BGR, int8 EfficientNet-Lite0 on ONNX Runtime (1 thread), default heads",
    }


def bench_hotpath(
    model: Path | None, work: Path, rounds: int = 5, per_round: int = 40, guard: bool = True
) -> dict[str, Any]:
    """Every kernel; with `guard`, also the guard's overhead per frame (which fits a gate on 360 frames first)."""
    from bouncer import _hotpath as cpp  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    result: dict[str, Any] = {"kernels": bench_kernels(cpp, rounds, per_round)}
    if guard and model is not None:
        result |= bench_guard(model, work, rounds, per_round)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
