"""Drift monitor: sequential tests that notice slow shifts no single frame reveals.

- Continuous signals (frame brightness, log sharpness, OOD score): two-sided CUSUM on values
  standardised by a baseline (median and MAD of the first `warmup` frames). The baseline spread is
  floored at a tenth of the calibration spread recorded in the bundle, so a perfectly steady scene
  does not turn sensor noise into alarms, while a +2 grey-level light change on that scene still
  stands out at once.
- Rates (review, reject): Bernoulli log-likelihood CUSUM of "rate went from p0 to p1", p0 the 95%
  Clopper-Pearson upper bound of the rate over the first max(warmup, 1000) frames (a low estimate
  from a short warmup would turn noise into alarms) and p1 = max(2 p0, p0 + 0.05).
After an alarm a signal reports once, then re-baselines (the new normal). Rejected frames (quality gate,
unreadable) feed the rate tests only: a lens cap is the quality gate's to report, not a brightness drift.
Brightness and sharpness are centred on the median of each predicted class (products differ in both; a
light or focus change moves them all) and follow accepted frames only, whose class is trusted.
- A detector gate's boxes, per class: the number of kept boxes per frame (`count.<class>`) and their mean
  calibrated probability (`score.<class>`), over every frame the quality gate passed. Counts are small integers,
  so their baseline is the warm-up's mean and standard deviation (a median and MAD of 0, 1, 2 would be 0), floored
  at half the calibration frames' spread (in the bundle's drift reference) and at a tenth of a box or a point of
  probability; each frame adds at most 5 standard deviations, so one odd box cannot raise an alarm alone. A class
  the detector stops finding, or finds far more often, or scores lower, moves its CUSUM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bouncer.runtime.gates.decision import Verdict
from bouncer.runtime.gates.risk import clopper_pearson_upper

CONTINUOUS = ("brightness", "sharpness", "ood_score")
CLASS_CENTRED = ("brightness", "sharpness")  # products differ in these; a light or focus change moves all
RATES = ("review_rate", "reject_rate")
BOX_SIGNALS = ("count.", "score.")  # a detector gate's, per class
BOX_FLOOR = {"count": 0.1, "score": 0.01}  # the smallest spreads that matter: a tenth of a box, a point of probability
BOX_CLIP = 5.0  # box scores have heavy tails (one odd box in a thousand frames); a real shift persists


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

    ready: bool = False
    robust: bool = True  # median and MAD baseline; False: mean and standard deviation (discrete counts)
    clip: float = math.inf  # at most this much evidence per frame: one odd frame cannot raise an alarm alone

    def set_baseline(self, values: list[float]) -> None:
        v = np.asarray(values, np.float64)
        if self.robust:
            self.mean = float(np.median(v))
            spread = 1.4826 * float(np.median(np.abs(v - self.mean)))
        else:
            self.mean, spread = float(v.mean()), float(v.std())
        self.std = max(spread, self.floor, 1e-9)
        self.buf, self.ready = [], True

    def update(self, x: float) -> str | None:
        if not math.isfinite(x):
            return None
        if not self.ready:
            self.buf.append(x)
            if len(self.buf) >= self.warmup:
                self.set_baseline(self.buf)
            return None
        z = min(max((x - self.mean) / self.std, -self.clip), self.clip)
        self.hi = max(0.0, self.hi + z - self.k)
        self.lo = max(0.0, self.lo - z - self.k)
        if self.hi > self.h or self.lo > self.h:
            direction = "up" if self.hi > self.h else "down"
            self.buf, self.hi, self.lo, self.ready = [], 0.0, 0.0, False  # re-baseline on the new normal
            return direction
        return None


@dataclass
class _ClassCentred:
    """A CUSUM on the value minus the median of its predicted class. On a line making several products,
    frame brightness differs more between products than a new light bulb moves it; the shift the bulb
    causes is common to all of them. Frames of a class unseen during warm-up are skipped."""

    cusum: _Cusum
    warm: list[tuple[str, float]] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)

    def baseline(self, label: str | None) -> float:
        return self.medians.get(label or "-", math.nan)

    def update(self, x: float, label: str | None) -> str | None:
        if not math.isfinite(x):
            return None
        key = label or "-"
        if not self.medians:
            self.warm.append((key, x))
            if len(self.warm) < self.cusum.warmup:
                return None
            groups: dict[str, list[float]] = {}
            for k, v in self.warm:
                groups.setdefault(k, []).append(v)
            self.medians = {k: float(np.median(v)) for k, v in groups.items() if len(v) >= 5}
            residuals = [v - self.medians[k] for k, v in self.warm if k in self.medians]
            self.warm = []
            if residuals:
                self.cusum.set_baseline(residuals)
            else:
                self.medians = {}
            return None
        if key not in self.medians:
            return None
        direction = self.cusum.update(x - self.medians[key])
        if direction:
            self.medians = {}  # re-baseline, per class, on the new normal (the CUSUM waits for it)
            self.cusum.ready = True
        return direction


@dataclass
class _RateCusum:
    warmup: int
    h: float
    n: int = 0
    hits: int = 0
    p0: float = 0.0
    p1: float = 0.0
    s: float = 0.0
    llr_hit: float = 0.0  # log-likelihood ratios of a hit and a miss, fixed once p0 and p1 are
    llr_miss: float = 0.0

    def update(self, hit: bool) -> str | None:
        if self.n < self.warmup:
            self.n += 1
            self.hits += hit
            if self.n == self.warmup:
                self.p0 = min(max(clopper_pearson_upper(self.hits, self.n, 0.05), 0.5 / self.warmup), 0.9)
                self.p1 = min(max(2 * self.p0, self.p0 + 0.05), 0.99)
                self.llr_hit = math.log(self.p1 / self.p0)
                self.llr_miss = math.log((1 - self.p1) / (1 - self.p0))
            return None
        self.s = max(0.0, self.s + (self.llr_hit if hit else self.llr_miss))
        if self.s > self.h:
            self.n, self.hits, self.s = 0, 0, 0.0
            return "up"
        return None


class DriftMonitor:
    def __init__(
        self, reference: dict[str, float], warmup: int = 500, k: float = 0.5, h: float = 20.0, rate_h: float = 14.0
    ) -> None:
        """reference: calibration spreads {"brightness": std, "sharpness": std of log, "ood_score": spread}."""
        cusums = {
            name: _Cusum(floor=0.1 * float(reference.get(name, 0.0)), k=k, h=h, warmup=warmup) for name in CONTINUOUS
        }
        self.signals: dict[str, _Cusum | _ClassCentred] = {
            name: _ClassCentred(c) if name in CLASS_CENTRED else c for name, c in cusums.items()
        }
        # (signal, the decision it counts, its test)
        self.rates = [(name, name.split("_")[0], _RateCusum(warmup=max(warmup, 1000), h=rate_h)) for name in RATES]
        # a detector gate's per-class box signals, named in its reference by `bouncer fit`
        self.boxes = {
            name: _Cusum(
                floor=max(0.5 * float(spread), BOX_FLOOR[name.split(".")[0]]),
                k=k,
                h=h,
                warmup=warmup,
                robust=False,
                clip=BOX_CLIP,
            )
            for name, spread in reference.items()
            if name.startswith(BOX_SIGNALS)
        }
        self.state: dict[str, str] = {}
        self.h, self.rate_h = h, rate_h

    def statistics(self) -> dict[str, float]:
        """Each signal's CUSUM statistic now (the larger side), beside which an alarm fires at `h` (continuous
        signals and boxes) or `rate_h` (rates): what the station charts against its alarm line."""
        out: dict[str, float] = {}
        for name, test in {**self.signals, **self.boxes}.items():
            c = test.cusum if isinstance(test, _ClassCentred) else test
            out[name] = round(max(c.hi, c.lo), 3)
        for name, _, rate in self.rates:
            out[name] = round(rate.s, 3)
        return out

    def update(
        self,
        quality: dict[str, float],
        ood_score: float | None,
        decision: str,
        label: str | None = None,
        boxes: list[dict] | None = None,
    ) -> list[dict]:
        """Feed one frame (with its predicted class, if any, and a detector gate's kept boxes); returns drift
        events (usually none)."""
        values = {
            "brightness": quality.get("mean", math.nan),
            "sharpness": math.log(max(quality.get("sharpness", math.nan), 1e-6)),
            "ood_score": math.nan if ood_score is None else ood_score,
        }
        events = []
        for name, test in self.signals.items():
            if decision == Verdict.REJECT:
                # a frame the quality gate rejected is a visible, single-frame failure, already reported;
                # the continuous signals follow the frames the line is really producing
                break
            if isinstance(test, _ClassCentred):
                if decision != Verdict.ACCEPT:
                    continue  # the predicted class of a flagged frame is not to be trusted
                baseline = test.baseline(label)
                direction = test.update(values[name], label)
            else:
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
        if boxes is not None and decision != Verdict.REJECT:
            for name, test in self.boxes.items():
                kind, cls = name.split(".", 1)
                ps = [b["p"] for b in boxes if b["class"] == cls]
                x = float(len(ps)) if kind == "count" else float(np.mean(ps)) if ps else math.nan
                baseline = test.mean
                direction = test.update(x)
                if direction:
                    self.state[name] = direction
                    events.append({"event": "drift", "signal": name, "direction": direction,
                                   "baseline": round(baseline, 4), "value": round(x, 4)})  # fmt: skip
        for name, counted, rate in self.rates:
            if rate.update(decision == counted):
                self.state[name] = "up"
                events.append({"event": "drift", "signal": name, "direction": "up", "baseline_rate": rate.p0})
        return events
