"""Heads: the compact Mahalanobis equals the dense formula, kNN equals brute force, fusion and softmax behave."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting.calibration import expected_calibration_error, fit_temperature
from bouncer.fitting.fit import fit_logistic
from bouncer.fitting.select import conformal_quantile
from bouncer.runtime.gates.detector import DetectorTask, OrphanHead
from bouncer.runtime.gates.heads import (
    HEAD_KINDS,
    Fusion,
    GaussianHead,
    KnnHead,
    fit_head,
    head_input,
    input_key,
    l2n,
    ledoit_wolf,
    load_head,
)
from bouncer.runtime.kernels import spatial_max


def dense_shrunk_cov(xc: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf (2004) written the textbook way, as the reference for the eigen form."""
    n, d = xc.shape
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta2 = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta2 = sum(((np.outer(x, x) - s) ** 2).sum() for x in xc) / (n * n * d)
    shrink = min(beta2 / delta2, 1.0)
    return shrink * mu * np.eye(d) + (1 - shrink) * s


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 60), d=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_low_rank_mahalanobis_matches_dense(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, d)
    labels = rng.integers(0, 3, n)
    labels[:3] = [0, 1, 2]
    head = GaussianHead.fit("f", x, labels, spatial=False, rank=d)
    xn = l2n(x).astype(np.float64)
    means = np.stack([xn[labels == c].mean(0) for c in range(3)])
    cov = dense_shrunk_cov(xn - means[labels])
    prec = np.linalg.inv(cov)
    q = rng.normal(size=(7, d))
    qn = l2n(q).astype(np.float64)
    dense = np.array([[(v - m) @ prec @ (v - m) for m in means] for v in qn])
    np.testing.assert_allclose(head.distances(q), dense, rtol=1e-2, atol=1e-2)  # basis stored as float16


def test_truncated_rank_stays_close():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 300)).astype(np.float32)
    full = GaussianHead.fit("f", x, np.zeros(80, int), spatial=False, rank=300)
    small = GaussianHead.fit("f", x, np.zeros(80, int), spatial=False, rank=79)  # the sample rank
    q = rng.normal(size=(10, 300))
    np.testing.assert_allclose(small.score_vectors(q), full.score_vectors(q), rtol=1e-3)


def test_ledoit_wolf_shrinks_toward_the_mean_eigenvalue():
    rng = np.random.default_rng(2)
    xc = rng.normal(size=(20, 100))
    _, evals, rest = ledoit_wolf(xc - xc.mean(0))
    assert rest > 0 and evals.min() >= rest - 1e-12


def test_knn_matches_brute_force_and_spatial_max():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(50, 16))
    q = rng.normal(size=(6, 16))
    head = KnnHead.fit("f", bank, k=3)
    sims = l2n(q) @ l2n(bank).T
    expected = 1 - np.sort(sims, axis=1)[:, -3]
    np.testing.assert_allclose(head.score_vectors(q), expected, atol=2e-3)  # fp16 bank
    fmap = rng.normal(size=(4, 8, 5, 5))
    np.testing.assert_array_equal(spatial_max(fmap.astype(np.float32)), fmap.astype(np.float32).max(axis=(2, 3)))
    mh = KnnHead.fit("m", fmap, reduce="max")
    assert np.all(mh.score({"m": fmap}) < 1e-2)  # each frame is its own nearest neighbour


def test_patch_head_flags_a_local_anomaly():
    rng = np.random.default_rng(4)
    normal = rng.normal(0.5, 0.05, size=(30, 8, 6, 6)).clip(0)
    head = GaussianHead.fit("m", normal.reshape(30, 8, 36).transpose(0, 2, 1), None, spatial=True)
    test = rng.normal(0.5, 0.05, size=(2, 8, 6, 6)).clip(0)
    test[1, :, 2, 3] = np.eye(8)[0] * 3  # one odd patch
    s = head.score({"m": test})
    assert s[1] > 5 * s[0]


def test_mean_fusion_standardises_then_averages():
    cal = np.column_stack([np.arange(101.0), np.arange(101.0) * 10])
    f = Fusion.fit(["a", "b"], cal, "mean")
    np.testing.assert_allclose(f.fuse(np.array([[50.0, 500.0]])), [0.0], atol=1e-6)  # the medians
    np.testing.assert_allclose(f.fuse(np.array([[90.0, 900.0]])), [1.0], atol=1e-6)  # the q90s
    np.testing.assert_allclose(f.fuse(np.array([[90.0, 500.0]])), [0.5], atol=1e-6)


def test_pvalue_fusion_lets_one_strong_alarm_through():
    """min-p (`max`): a frame far beyond one head's calibration scores is flagged however ordinary it looks to
    the other; the mean of standardised scores dilutes that alarm by the number of heads."""
    rng = np.random.default_rng(0)
    cal = rng.gamma(2.0, 1.0, (300, 3))
    low = np.quantile(cal, 0.05, axis=0)
    odd = np.array([[low[0], 1.4 * cal[:, 1].max(), low[2]]])  # one head far out, two quite ordinary
    for method, flagged in (("max", True), ("sum", True), ("mean", False)):
        f = Fusion.fit(["a", "b", "c"], cal, method)
        threshold = conformal_quantile(f.fuse(cal), 0.99)
        assert bool(f.fuse(odd)[0] > threshold) is flagged, method
    # -log p at a calibration score is -log((1 + #scores >= it) / (n + 1)): the largest score gets log(301 / 2)
    f = Fusion.fit(["a"], cal[:, :1], "max")
    np.testing.assert_allclose(f.fuse(np.array([[cal[:, 0].max()]], np.float32)), [np.log(301 / 2)], rtol=1e-5)


def test_logistic_head_and_temperature():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 20)) * 2
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 20))
    head = fit_logistic(x, y, 3)
    assert (head.logits(x).argmax(1) == y).mean() > 0.9
    head.temperature = fit_temperature(head.logits(x), y)
    p = head.probs(x)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    assert expected_calibration_error(p, y) < 0.05


def test_conformal_quantile():
    s = np.arange(1, 100.0)  # 99 scores
    assert conformal_quantile(s, 0.9) == 90.0
    assert conformal_quantile(s, 0.999) == 99.0


def test_every_head_kind_keeps_one_interface():
    """Each kind reads its input from outputs, scores the same from outputs, from vectors and through the
    guard's bound scorer, and comes back from its saved arrays and metadata scoring identically."""
    rng = np.random.default_rng(9)
    outputs = {"pool": rng.normal(size=(12, 24)).astype(np.float32),
               "map": np.abs(rng.normal(size=(12, 6, 4, 4))).astype(np.float32)}  # fmt: skip
    labels = np.repeat([0, 1], 6)
    heads = [
        fit_head(spec, head_input(input_key(spec), outputs), labels)
        for spec in ("maha:pool", "knn:pool", "knn:map@max", "patch:map")
    ]
    # a detector's orphan head reads its raw candidates: 12 frames of (4 + 2) x 30, boxes and two class scores
    raw = np.concatenate([rng.uniform(0, 64, (12, 4, 30)), rng.uniform(0, 0.6, (12, 2, 30))], axis=1)
    outputs["output0"] = raw.astype(np.float32)
    heads.append(OrphanHead("output0", DetectorTask("ultralytics", 2, np.array([4.0, 3.0]), np.array([1.0, 0.5]))))
    assert {type(h).kind for h in heads} == set(HEAD_KINDS)
    for h in heads:
        via_outputs, via_vectors = h.score(outputs), h.score_vectors(h.vectors(outputs))
        np.testing.assert_allclose(via_outputs, via_vectors, rtol=1e-6)
        np.testing.assert_allclose(h.scorer()(outputs), via_outputs, rtol=1e-6)
        back = load_head(h.meta(), h.arrays("x"), "x")
        assert type(back) is type(h) and back.input_key == h.input_key
        np.testing.assert_allclose(back.score(outputs), via_outputs, rtol=1e-5)
