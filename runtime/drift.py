"""Drift monitor: sequential tests that notice slow shifts no single frame reveals.

- Continuous signals (frame brightness, log sharpness, OOD score): two-sided CUSUM on values
  standardised by a baseline (median and MAD of the first `warmup` frames). The baseline spread is
  floored at a tenth of the calibration spread recorded in the bundle, so a perfectly steady scene
  does not turn sensor noise into alarms, while a +2 grey-level light change on that scene still
  stands out at once.
- Rates (review, reject): Bernoulli log-likelihood CUSUM of "rate went from p0 to p1", p0 the 95%
  Clopper-Pearson upper bound of the rate over the first max(warmup, 1000) frames (a low estimate
  from a short warmup would turn noise into alarms) and p1 = max(2 p0, p0 + 0.05).
After an alarm a signal reports once, then re-baselines (the new normal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bouncer.runtime.gates.risk import clopper_pearson_upper

CONTINUOUS = ("brightness", "sharpness", "ood_score")
RATES = ("review_rate", "reject_rate")


@dataclass
class _Cusum:
    floor: float
    k: float
    h: float
    warmup: int
    buf: list[float] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0
    hi: float = 0.0
    lo: float = 0.0

    def update(self, x: float) -> str | None:
        if not math.isfinite(x):
            return None
        if len(self.buf) < self.warmup:
            self.buf.append(x)
            if len(self.buf) == self.warmup:
                v = np.asarray(self.buf)
                self.mean = float(np.median(v))
                self.std = max(1.4826 * float(np.median(np.abs(v - self.mean))), self.floor, 1e-9)
            return None
        z = (x - self.mean) / self.std
        self.hi = max(0.0, self.hi + z - self.k)
        self.lo = max(0.0, self.lo - z - self.k)
        if self.hi > self.h or self.lo > self.h:
            direction = "up" if self.hi > self.h else "down"
            self.buf, self.hi, self.lo = [], 0.0, 0.0  # re-baseline on the new normal
            return direction
        return None


@dataclass
class _RateCusum:
    warmup: int
    h: float
    n: int = 0
    hits: int = 0
    p0: float = 0.0
    p1: float = 0.0
    s: float = 0.0

    def update(self, hit: bool) -> str | None:
        if self.n < self.warmup:
            self.n += 1
            self.hits += hit
            if self.n == self.warmup:
                self.p0 = min(max(clopper_pearson_upper(self.hits, self.n, 0.05), 0.5 / self.warmup), 0.9)
                self.p1 = min(max(2 * self.p0, self.p0 + 0.05), 0.99)
            return None
        llr = math.log(self.p1 / self.p0) if hit else math.log((1 - self.p1) / (1 - self.p0))
        self.s = max(0.0, self.s + llr)
        if self.s > self.h:
            self.n, self.hits, self.s = 0, 0, 0.0
            return "up"
        return None


class DriftMonitor:
    def __init__(
        self, reference: dict[str, float], warmup: int = 500, k: float = 0.5, h: float = 20.0, rate_h: float = 14.0
    ) -> None:
        """reference: calibration spreads {"brightness": std, "sharpness": std of log, "ood_score": spread}."""
        self.signals = {
            name: _Cusum(floor=0.1 * float(reference.get(name, 0.0)), k=k, h=h, warmup=warmup) for name in CONTINUOUS
        }
        self.rates = {name: _RateCusum(warmup=max(warmup, 1000), h=rate_h) for name in RATES}
        self.state: dict[str, str] = {}

    def update(self, quality: dict[str, float], ood_score: float | None, decision: str) -> list[dict]:
        """Feed one frame; returns drift events (usually none)."""
        values = {
            "brightness": quality.get("mean", math.nan),
            "sharpness": math.log(max(quality.get("sharpness", math.nan), 1e-6)),
            "ood_score": math.nan if ood_score is None else ood_score,
        }
        events = []
        for name, test in self.signals.items():
            baseline = test.mean
            direction = test.update(values[name])
            if direction:
                self.state[name] = direction
                events.append(
                    {
                        "event": "drift",
                        "signal": name,
                        "direction": direction,
                        "baseline": round(baseline, 4),
                        "value": round(values[name], 4),
                    }
                )
        for name, test in self.rates.items():
            if test.update(decision == name.split("_")[0]):
                self.state[name] = "up"
                events.append({"event": "drift", "signal": name, "direction": "up", "baseline_rate": test.p0})
        return events
