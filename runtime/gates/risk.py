"""Binomial bounds the camera needs at run time (the drift monitor's alarm lines) and the fit needs to
choose the acceptance threshold (fitting/acceptance.py)."""

from __future__ import annotations

import math


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
