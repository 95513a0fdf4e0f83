"""Risk control for the acceptance rule: Clopper-Pearson bounds and Learn-then-Test threshold selection.

The guarantee: with probability at least 1 - delta over the calibration draw, the error rate on
auto-accepted frames drawn like the calibration set is at most alpha (= 1 - target accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (exact; n is at most a few thousand here)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)
    ]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided upper bound on a binomial rate after k events in n trials, at confidence 1 - delta."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(80):  # bisection: the CDF falls monotonically in p
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def frames_needed(alpha: float, delta: float) -> int:
    """Fewest accepted frames for which zero errors already certify error <= alpha at level delta."""
    return math.ceil(math.log(delta) / math.log1p(-alpha))


# A fixed grid of confidence thresholds, strict to lenient, chosen before seeing any data (as Learn-then-Test
# requires); dense near 1 where the decisions are made.
THRESHOLD_GRID = np.unique(np.concatenate([1 - np.logspace(-6, np.log10(0.5), 600), [0.0]]))[::-1]


@dataclass(frozen=True)
class Selection:
    threshold: float | None  # None: no threshold meets the target; nothing is auto-accepted
    n_calibration: int
    n_accepted: int
    n_errors: int
    error_bound: float | None  # Clopper-Pearson upper bound at the chosen threshold
    coverage: float
    frames_needed: int


def select_threshold(confidence: np.ndarray, correct: np.ndarray, alpha: float, delta: float) -> Selection:
    """Fixed-sequence Learn-then-Test over THRESHOLD_GRID: walk from strict to lenient while the
    Clopper-Pearson bound stays <= alpha; the last threshold that passed is chosen.

    The walk starts at the first threshold that accepts enough frames for the bound to be able to
    pass (see `frames_needed`); testing from a threshold that accepts ten frames would stop at once.
    Thresholds are tested in a fixed order, so no multiplicity correction is needed (FWER <= delta).
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    n = len(confidence)
    need = frames_needed(alpha, delta)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, wrong_cum = confidence[order], np.cumsum(~correct[order])
    chosen: tuple[float, int, int, float] | None = None
    started = False
    for lam in THRESHOLD_GRID:
        n_acc = int(np.searchsorted(-conf_sorted, -lam, side="right"))  # frames with confidence >= lam
        if n_acc < need:
            continue
        started = True
        k = int(wrong_cum[n_acc - 1])
        bound = clopper_pearson_upper(k, n_acc, delta)
        if bound > alpha:
            break
        chosen = (float(lam), n_acc, k, bound)
    if not started or chosen is None:
        return Selection(None, n, 0, 0, None, 0.0, need)
    lam, n_acc, k, bound = chosen
    return Selection(lam, n, n_acc, k, bound, n_acc / n if n else 0.0, need)
