"""The OOD operating point from the review budget: the certified flag rate holds, the curve reads the folds,
the rule picks what it says, and bad budgets are one clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting.operating import (
    REAL,
    SYNTHETIC,
    FoldScores,
    certified_flags,
    check_budget,
    choose,
    curve_plot,
    curve_table,
)
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.bundle import conformal_pvalue
from bouncer.runtime.gates.risk import binom_cdf


def test_certified_flags_match_the_order_statistics_of_bates_et_al():
    # alpha 1%, delta 10%: the largest of 300 good scores, the 2nd of 500, the 6th of 1000; below ~230 none
    assert certified_flags(300, 0.01, 0.1) == 0
    assert certified_flags(500, 0.01, 0.1) == 1
    assert certified_flags(1000, 0.01, 0.1) == 5
    assert certified_flags(229, 0.01, 0.1) is None
    assert certified_flags(45, 0.05, 0.1) == 0
    assert certified_flags(44, 0.05, 0.1) is None


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.floats(0.001, 0.5), st.floats(0.01, 0.5))
def test_certified_flags_is_the_largest_k_the_binomial_allows(n, rate, delta):
    k = certified_flags(n, rate, delta)
    if k is None:
        assert binom_cdf(0, n, rate) > delta
        return
    assert binom_cdf(k, n, rate) <= delta
    assert k + 1 >= n or binom_cdf(k + 1, n, rate) > delta


def test_the_good_frames_flag_rate_holds_with_probability_one_minus_delta():
    """Draw calibration sets of good scores, set the threshold, and read its true flag rate (normal scores):
    the rate exceeds the budget in at most about delta of the draws (and the threshold is not timid)."""
    from statistics import NormalDist

    rng = np.random.default_rng(0)
    budget, delta, n, draws = 0.05, 0.1, 300, 2000
    over, rates = 0, []
    for _ in range(draws):
        good = rng.normal(size=n)
        t = choose(good, [], budget, None, delta).threshold
        rate = 1 - NormalDist().cdf(t)
        rates.append(rate)
        over += rate > budget
    # binomial slack: 3 standard deviations above delta
    assert over / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws), over
    assert 0.02 < float(np.mean(rates)) < budget  # it spends most of the budget


def _folds(rng, shift_classes: float, shift_synth: float) -> list[FoldScores]:
    calib = rng.normal(size=400)
    return [
        FoldScores("held out: a", calib, rng.normal(shift_classes, 1, 200)),
        FoldScores("held out: b", calib, rng.normal(shift_classes, 1, 200)),
        FoldScores(SYNTHETIC, calib, rng.normal(shift_synth, 1, 200)),
    ]


def test_the_budget_is_spent_when_more_flags_catch_more():
    rng = np.random.default_rng(1)
    op = choose(rng.normal(size=400), _folds(rng, 1.5, 3.0), 0.05, None, 0.1)
    assert op.rate == 0.05
    rates = [r["rate"] for r in op.record["curve"]]
    assert rates == sorted(rates) and rates[-1] == 0.05
    catches = [r["catch"] for r in op.record["curve"]]
    assert catches == sorted(catches) and catches[-1] > catches[0]
    assert op.record["basis"].startswith("known classes held out")
    assert op.record["catch_low"] <= op.record["catch"] <= op.record["catch_high"]


def test_a_lower_rate_when_the_held_out_classes_are_caught_already():
    """Synthetic defects that more flags would still catch do not hold the rate up where real evidence exists."""
    rng = np.random.default_rng(2)
    op = choose(rng.normal(size=400), _folds(rng, 12.0, 1.0), 0.05, None, 0.1)
    assert op.rate < 0.05
    assert op.record["catch"] == 1.0
    assert op.record["curve"][0]["by_fold"][SYNTHETIC] < op.record["curve"][-1]["by_fold"][SYNTHETIC]


def test_synthetic_defects_alone_never_lower_the_rate():
    rng = np.random.default_rng(3)
    calib = rng.normal(size=400)
    op = choose(calib, [FoldScores(SYNTHETIC, calib, rng.normal(12, 1, 200))], 0.05, None, 0.1)
    assert op.rate == 0.05
    assert "synthetic defects only" in op.record["basis"]


def test_real_defects_are_the_basis_when_given():
    rng = np.random.default_rng(4)
    folds = [*_folds(rng, 1.0, 3.0), FoldScores(REAL, rng.normal(size=400), rng.normal(2.5, 1, 60))]
    op = choose(rng.normal(size=400), folds, 0.05, None, 0.1)
    assert op.record["basis"] == "real defective frames given at fit time"
    assert op.record["curve"][-1]["frames"] == 60


def test_a_target_catch_takes_the_lowest_rate_reaching_it():
    rng = np.random.default_rng(5)
    folds = _folds(rng, 2.5, 3.0)
    full = choose(rng.normal(size=400), folds, 0.2, None, 0.1)
    want = full.record["curve"][2]["catch"]
    op = choose(rng.normal(size=400), folds, 0.2, want, 0.1)
    assert op.rate == full.record["curve"][2]["rate"] < 0.2
    never = choose(rng.normal(size=400), folds, 0.05, 1.0, 0.1)
    assert never.rate == 0.05 and "not reached" in never.record["rule"]


def test_too_few_good_frames_for_the_budget_is_one_error_naming_how_many():
    with pytest.raises(BouncerError, match="needs at least 230 good calibration frames"):
        choose(np.zeros(100), [], 0.01, None, 0.1)


@pytest.mark.parametrize("budget", [0.0, -0.1, 0.51, 1.0])
def test_a_budget_outside_its_range_is_refused(budget):
    with pytest.raises(BouncerError, match=r"--review-budget must be in \(0, 0.5\]"):
        check_budget(budget, None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=200), st.floats(-2e3, 2e3))
def test_pvalues_count_the_calibration_scores_at_or_above(ref, s):
    ref_s = np.sort(np.array(ref))
    assert conformal_pvalue(ref_s, s) == pytest.approx((1 + sum(r >= s for r in ref)) / (len(ref) + 1))
    assert conformal_pvalue(ref_s, float("nan")) == pytest.approx(1 / (len(ref) + 1))


def test_the_curve_is_drawn_and_tabled(tmp_path):
    rng = np.random.default_rng(6)
    op = choose(rng.normal(size=400), _folds(rng, 1.5, 3.0), 0.1, None, 0.1)
    table = curve_table(op.record)
    assert len(table) == 2 + len(op.record["curve"])
    assert sum("operating point" in row for row in table) == 1
    png = curve_plot(op.record, tmp_path / "curve.png")
    import cv2

    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100


def test_no_pseudo_unknowns_means_no_curve_to_draw(tmp_path):
    """A detector gate has no folds: the budget still sets the threshold, and there is no catch to plot."""
    op = choose(np.random.default_rng(7).normal(size=300), [], 0.05, None, 0.1)
    assert op.record["catch"] is None and op.record["basis"] == "no pseudo-unknowns: catch not estimated"
    assert curve_plot(op.record, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()
