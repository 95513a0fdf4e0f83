"""Latency measurement: interleaved rounds so a noisy shared machine hurts every contender alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def interleaved_latency_ms(
    fns: dict[str, Callable[[], object]], rounds: int = 5, per_round: int = 20, warmup: int = 5
) -> dict[str, np.ndarray]:
    """Per-call latencies (ms) of each function, measured in alternating rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in samples.items()}


def percentiles(ms: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}
