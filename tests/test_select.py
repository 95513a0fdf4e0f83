"""Head selection from the line's own known classes: it finds the input that separates held-out classes,
is deterministic, records what it measured, and says clearly when the data cannot support it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting.fit import FeatureSet, FitSettings, choose_heads, fit_from_features
from bouncer.fitting.select import auroc, conformal_quantile
from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import Fusion
from bouncer.runtime.preprocess import Preprocessing

STATS = {"mean": 100.0, "std": 30.0, "dark_frac": 0.0, "bright_frac": 0.0, "sharpness": 50.0, "tile_std_min": 10.0}


def line(rng: np.random.Generator, classes: int, per_class: int, informative: str = "pool_b") -> FeatureSet:
    """Each class is a cluster in `informative` (so a held-out class sits apart from the rest); in every other
    input all classes share one noise cloud, so no head on it can tell a new class from a known one."""
    labels = np.repeat(np.arange(classes), per_class)
    n = len(labels)
    centres = np.zeros((classes, 24))
    for c in range(classes):  # each class lights its own six channels
        centres[c, 6 * c : 6 * c + 6] = 5.0
    vectors = {
        "pool_a": np.abs(rng.normal(1, 1, (n, 16))),
        "pool_b": np.abs(rng.normal(1, 1, (n, 24))),
        "pool_c": np.abs(rng.normal(1, 1, (n, 32))),
    }
    vectors[informative] = np.abs(centres[labels] + rng.normal(0, 0.5, (n, 24)))
    features = np.concatenate([vectors["pool_a"], vectors["pool_b"]], 1) + rng.normal(0, 0.01, (n, 40))
    vectors["features"] = features
    return FeatureSet(labels, features.astype(np.float32), {k: v.astype(np.float32) for k, v in vectors.items()},
                      [dict(STATS) for _ in range(n)])  # fmt: skip


def test_the_separating_input_is_chosen_and_recorded():
    rng = np.random.default_rng(0)
    train, calib = line(rng, 4, 40), line(rng, 4, 70)
    logs: list[str] = []
    heads, method, record, scores = choose_heads(train, calib, ["a", "b", "c", "d"], None, 0.99, logs.append)
    assert all(h.split(":")[1] in ("pool_b", "features") for h in heads), heads  # the inputs with the classes
    chosen = record["chosen"]
    assert chosen["heads"] == list(heads) and chosen["fusion"] == method
    assert chosen["mean_catch"] >= 0.9 and len(record["folds"]) == 4
    assert [f["name"] for f in record["folds"]] == [f"held out: {c}" for c in "abcd"]
    assert record["candidates"][0]["objective"] >= record["candidates"][-1]["objective"]
    assert any(line.startswith("heads chosen:") for line in logs)
    # deterministic: the same data gives the same choice and the same record
    assert choose_heads(train, calib, ["a", "b", "c", "d"], None, 0.99, lambda m: None)[:3] == (heads, method, record)
    # the chosen mix's fused fold scores: what the operating point's catch curve is read from
    assert [f.name for f in scores] == [f["name"] for f in record["folds"]]
    assert all(len(f.unknown) == r["held_out"] for f, r in zip(scores, record["folds"], strict=True))


def test_the_bundle_carries_the_choice():
    rng = np.random.default_rng(1)
    train, calib = line(rng, 3, 40), line(rng, 3, 90)
    ident = {"backbone_hash": "h" * 64, "backbone_name": "test", "preprocessing": Preprocessing()}
    bundle = fit_from_features(train, calib, ["a", "b", "c"], FitSettings(0.9), log=lambda m: None, **ident)
    assert bundle.selection["chosen"]["heads"] == bundle.fusion.names
    assert bundle.fusion.method == bundle.selection["chosen"]["fusion"]
    named = fit_from_features(train, calib, ["a", "b", "c"], FitSettings(0.9, heads=("maha:pool_a",), fusion="sum"),
                              log=lambda m: None, **ident)  # fmt: skip
    assert named.fusion.names == ["maha:pool_a"] and named.fusion.method == "sum"
    assert named.selection["rule"] == "named with --heads"


def test_one_class_needs_synthetic_defects():
    rng = np.random.default_rng(2)
    train, calib = line(rng, 1, 60), line(rng, 1, 60)
    with pytest.raises(BouncerError, match="synthetic defects"):
        choose_heads(train, calib, ["good"], None, 0.99, lambda m: None)
    # with defects made from its own frames (here: a shift in one input), the fold exists and drives the choice
    pseudo = line(rng, 1, 40)
    pseudo.vectors["pool_c"][:, :8] += 6.0
    heads, _, record, _ = choose_heads(train, calib, ["good"], pseudo, 0.99, lambda m: None)
    assert [f["name"] for f in record["folds"]] == ["synthetic defects"]
    assert all("pool_c" in h for h in heads)
    # real defective frames given at fit time are a fold of their own, and choose the input where they differ
    real = line(rng, 1, 30)
    real.vectors["pool_a"][:, :8] += 6.0
    heads, _, record, scores = choose_heads(train, calib, ["good"], pseudo, 0.99, lambda m: None, real)
    assert [f["name"] for f in record["folds"]] == ["synthetic defects", "real defects"]
    assert len(scores[1].unknown) == 30


def test_classes_too_small_to_hold_out_are_named():
    rng = np.random.default_rng(3)
    train, calib = line(rng, 2, 2), line(rng, 2, 4)  # 6 frames of each class, 4 calibration frames of the other
    notes: list[str] = []
    with pytest.raises(BouncerError, match="--heads"):
        choose_heads(train, calib, ["a", "b"], None, 0.99, notes.append)
    assert any("class a not held out" in n and "need 20" in n for n in notes), notes


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40))
def test_auroc_is_the_mann_whitney_statistic(pos, neg):
    p, n = np.array(pos), np.array(neg)
    want = ((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n))
    assert auroc(p, n) == pytest.approx(want)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=5, max_size=200), st.sampled_from(["max", "sum", "mean"]))
def test_fusion_is_monotone_and_flags_at_most_its_share(scores, method):
    """Each head's curve rises with its score; on the calibration frames themselves the conformal threshold
    at q flags at most 1 - q of them (plus ties)."""
    s = np.array(scores)[:, None]
    f = Fusion.fit(["a", "b"], np.hstack([s, s[::-1]]), method)
    grid = np.linspace(-10, 120, 50)
    fused = f.fuse(np.stack([grid, np.zeros_like(grid)], 1))
    assert (np.diff(fused) >= -1e-6).all()
    cal = f.fuse(np.hstack([s, s[::-1]]))
    thr = conformal_quantile(cal, 0.9)
    assert (cal > thr).mean() <= 0.1 + 1e-9
