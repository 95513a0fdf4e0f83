"""Learn-then-Test selection of the acceptance threshold.

The guarantee: with probability at least 1 - delta over the calibration draw, the error rate on
auto-accepted frames drawn like the calibration set is at most alpha (= 1 - target accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bouncer.runtime.gates.risk import clopper_pearson_upper, frames_needed

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


MAX_STARTS = 4


def start_plan(n: int, alpha: float, delta: float) -> list[tuple[int, float]]:
    """Where the fixed-sequence chains start (fewest accepted frames) and the share of delta each spends.

    One chain from the strictest threshold that can pass stops at the first confident mistake, however good
    the rest is: on real lines (magnetic tiles, solar cells) one error among the 22 most confident frames left
    a 90% target with no threshold at all, at 88% calibration accuracy. So chain j starts where 2^j times its
    own minimum is accepted; the first keeps half of delta, the others share the rest (Bonferroni: the
    family-wise error stays <= delta). How many chains depends on the number of frames only, never on labels:
    as many (up to MAX_STARTS) as the calibration set can hold, so a small set keeps the single chain.
    """

    def plan(m: int) -> list[tuple[int, float]]:
        shares = [1.0] if m == 1 else [0.5] + [0.5 / (m - 1)] * (m - 1)
        return [(frames_needed(alpha, delta * w) * 2**j, delta * w) for j, w in enumerate(shares)]

    m = 1
    while m < MAX_STARTS and max(start for start, _ in plan(m + 1)) <= n:
        m += 1
    return plan(m)


def select_threshold(confidence: np.ndarray, correct: np.ndarray, alpha: float, delta: float) -> Selection:
    """Learn-then-Test over THRESHOLD_GRID by fixed-sequence chains (see `start_plan`): each walks from its
    start towards lenient thresholds while its Clopper-Pearson bound (at its share of delta) stays <= alpha;
    the most lenient threshold any chain passed is chosen.

    Thresholds are tested in an order fixed before the labels are seen, so within a chain no multiplicity
    correction is needed, and across chains the shares of delta add up to delta (FWER <= delta).
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    n = len(confidence)
    plan = start_plan(n, alpha, delta)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, wrong_cum = confidence[order], np.cumsum(~correct[order])
    accepted = np.searchsorted(-conf_sorted, -THRESHOLD_GRID, side="right")  # frames with confidence >= lam
    chosen: tuple[float, int, int, float] | None = None
    for start, share in plan:
        for lam, n_acc in zip(THRESHOLD_GRID, accepted.tolist(), strict=True):
            if n_acc < start:
                continue
            k = int(wrong_cum[n_acc - 1])
            bound = clopper_pearson_upper(k, n_acc, share)
            if bound > alpha:
                break
            if chosen is None or lam < chosen[0]:
                chosen = (float(lam), n_acc, k, bound)
    need = plan[0][0]
    if chosen is None:
        return Selection(None, n, 0, 0, None, 0.0, need)
    lam, n_acc, k, bound = chosen
    return Selection(lam, n, n_acc, k, bound, n_acc / n if n else 0.0, need)


def window_exceedance(k: int, n: int, m: int, j: int) -> float:
    """P(more than j of the next m exchangeable frames score above the (k+1)-th largest of n calibration frames).

    Distribution-free: that happens iff fewer than k+1 calibration frames are among the top k+1+j of all n+m,
    a hypergeometric count. It covers both the calibration draw and a finite window of frames, so the rate a
    user observes over the window (not only the true rate) stays within the bound with the stated probability.
    """
    r = k + 1 + j
    if r > n + m:
        return 0.0
    inside = sum(math.comb(n, i) * math.comb(m, r - i) for i in range(k + 1, min(r, n) + 1))
    return 1.0 - inside / math.comb(n + m, r)
