"""The acceptance guarantee: Clopper-Pearson bounds and Learn-then-Test selection, checked where the truth is known."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting.acceptance import MAX_STARTS, select_threshold, start_plan
from bouncer.runtime.gates.risk import binom_cdf, clopper_pearson_upper, frames_needed


def test_known_values():
    assert frames_needed(0.01, 0.1) == 230  # FIELD-NOTES: zero errors, 1% at delta 0.1
    # zero events: the bound solves (1 - p)^n = delta
    assert math.isclose(clopper_pearson_upper(0, 230, 0.1), 1 - 0.1 ** (1 / 230), rel_tol=1e-6)
    assert clopper_pearson_upper(0, 0, 0.1) == 1.0
    assert math.isclose(binom_cdf(1, 2, 0.5), 0.75)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 600), frac=st.floats(0, 1), delta=st.floats(0.01, 0.5))
def test_bound_is_a_valid_upper_bound(n, frac, delta):
    k = int(frac * n)
    ub = clopper_pearson_upper(k, n, delta)
    assert k / n <= ub <= 1.0
    if k < n:
        assert abs(binom_cdf(k, n, ub) - delta) < 1e-6  # it is the exact inversion
        assert clopper_pearson_upper(k + 1, n, delta) >= ub  # more errors, looser bound
        assert clopper_pearson_upper(k, n, delta * 2) <= ub + 1e-12  # less confidence, tighter bound


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(50, 800),
    acc=st.floats(0.9, 1.0),
    alpha=st.sampled_from([0.01, 0.02, 0.05]),
    delta=st.sampled_from([0.05, 0.1, 0.2]),
    seed=st.integers(0, 2**31),
)
def test_selection_is_consistent(n, acc, alpha, delta, seed):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    correct = rng.uniform(size=n) < acc
    sel = select_threshold(conf, correct, alpha, delta)
    assert sel.frames_needed == start_plan(n, alpha, delta)[0][0]
    if sel.threshold is None:
        assert sel.n_accepted == 0
        return
    accepted = conf >= sel.threshold
    assert sel.n_accepted == accepted.sum() >= sel.frames_needed
    assert sel.n_errors == (~correct[accepted]).sum()
    assert sel.error_bound <= alpha
    assert math.isclose(sel.coverage, accepted.mean())


def test_guarantee_holds_where_the_truth_is_known():
    """Synthetic confidence/correctness with a known error curve: P(true risk of the chosen threshold > alpha)
    must stay below delta over many calibration draws."""
    alpha, delta, n, trials = 0.02, 0.1, 1500, 120
    rng = np.random.default_rng(1)

    def true_risk(lam: float) -> float:
        # conf ~ U(0.5, 1); P(wrong | conf = c) = 0.5 * (1 - c)^2 * 4  (0 at c = 1, 0.5 at c = 0.5)
        c = np.linspace(lam, 1.0, 2001)
        return float((2 * (1 - c) ** 2).mean())

    violations = chosen = 0
    for _ in range(trials):
        conf = rng.uniform(0.5, 1.0, n)
        correct = rng.uniform(size=n) >= 2 * (1 - conf) ** 2
        sel = select_threshold(conf, correct, alpha, delta)
        if sel.threshold is not None:
            chosen += 1
            violations += true_risk(sel.threshold) > alpha
    assert chosen > trials * 0.75  # the target is reachable: the test has power
    assert violations / trials <= delta  # the promise


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 20000), alpha=st.floats(0.001, 0.3), delta=st.floats(0.01, 0.5))
def test_start_plan_spends_delta_once_and_fits_the_frames(n, alpha, delta):
    plan = start_plan(n, alpha, delta)
    assert 1 <= len(plan) <= MAX_STARTS
    assert math.isclose(sum(share for _, share in plan), delta)
    starts = [start for start, _ in plan]
    assert starts == sorted(starts)
    if len(plan) == 1:  # a small set keeps the single chain, and its full delta
        assert plan == [(frames_needed(alpha, delta), delta)]
    else:
        assert starts[-1] <= n


def test_one_confident_mistake_at_the_top_no_longer_voids_the_target():
    """The magnetic-tile failure: 600 frames, 97% right overall, but one error among the 20 most confident.
    One chain stops there and certifies nothing; the later chains certify most of the set."""
    conf = np.linspace(1.0, 0.5, 600)
    correct = np.ones(600, bool)
    correct[5] = False  # the confident mistake
    correct[np.arange(40, 600, 40)] = False  # 14 more, spread out: 2.5% overall
    alpha, delta = 0.1, 0.1
    single = frames_needed(alpha, delta)
    assert not correct[:single].all()  # a single chain from its start would stop at once
    sel = select_threshold(conf, correct, alpha, delta)
    assert sel.threshold is not None and sel.coverage > 0.9 and sel.error_bound <= alpha
