"""The patch head (PatchCore-style local evidence): its grid is OpenCV's resize and box filter, its coreset keeps
the rare patches a random sample loses, it finds one unusual patch that a pooled vector hides, and it travels
in a bundle."""

from __future__ import annotations

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting.select import auroc
from bouncer.runtime.gates.heads import KnnHead, fit_head, head_input, input_key, input_sources, load_head, parse_head
from bouncer.runtime.gates.patch import PatchKnnHead, greedy_coreset, patch_grid


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9), st.integers(1, 5), st.integers(0, 2**31))
def test_the_grid_is_bilinear_upsampling_then_a_3x3_box_filter(n, c, size, c2, seed):
    rng = np.random.default_rng(seed)
    fine = rng.normal(size=(n, c, 2 * size, 2 * size)).astype(np.float32)
    coarse = rng.normal(size=(n, c2, size, size)).astype(np.float32)
    got = patch_grid({"a": fine, "b": coarse}, ("a", "b"))
    assert got.shape == (n, c + c2, 2 * size, 2 * size)
    for i in range(n):
        want = [cv2.blur(fine[i, j], (3, 3), borderType=cv2.BORDER_REPLICATE) for j in range(c)]
        want += [
            cv2.blur(cv2.resize(coarse[i, j], (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR), (3, 3),
                     borderType=cv2.BORDER_REPLICATE)
            for j in range(c2)
        ]  # fmt: skip
        np.testing.assert_allclose(got[i], np.stack(want), atol=1e-5)


def test_the_greedy_coreset_keeps_the_rare_patches():
    rng = np.random.default_rng(0)
    common = rng.normal(size=(5000, 16)) + np.eye(16)[0] * 5
    rare = rng.normal(size=(10, 16)) * 0.1 + np.eye(16)[1] * 5  # 0.2% of the patches, somewhere else
    x = np.vstack([common, rare]).astype(np.float32)
    picks = greedy_coreset(x, 50, seed=1)
    assert len(set(picks.tolist())) == 50
    assert (picks >= 5000).any()  # a random 1% sample holds one of the 10 rare patches about 10% of the time
    random_hits = sum((rng.choice(len(x), 50, replace=False) >= 5000).any() for _ in range(200))
    assert random_hits < 60
    assert list(greedy_coreset(x, 50, seed=1)) == list(picks)  # deterministic


def _maps(rng: np.random.Generator, n: int, defect: bool) -> dict[str, np.ndarray]:
    m = rng.normal(0, 0.3, size=(n, 24, 12, 12)).astype(np.float32) + 1.0
    if defect:  # one small spot per frame: a few patches change, the pooled mean barely moves
        for i in range(n):
            y, x = rng.integers(1, 11, 2)
            m[i, :8, y, x] += 6.0
    return {"map_s16": m}


def test_one_unusual_patch_is_found_where_a_pooled_head_sees_nothing():
    rng = np.random.default_rng(3)
    train, good, bad = _maps(rng, 60, False), _maps(rng, 100, False), _maps(rng, 100, True)
    spec = "patchknn:map_s16"
    assert parse_head(spec) == ("patchknn", "map_s16", "patch") and input_sources(input_key(spec)) == ["map_s16"]
    key = input_key(spec)
    head = fit_head(spec, head_input(key, train), np.zeros(60))
    assert isinstance(head, PatchKnnHead) and head.bank.dtype == np.float16
    local = auroc(head.score(bad), head.score(good))
    pooled = KnnHead.from_vectors("mean", train["map_s16"].mean((2, 3)))
    glob = auroc(pooled.score_vectors(bad["map_s16"].mean((2, 3))), pooled.score_vectors(good["map_s16"].mean((2, 3))))
    assert local > 0.99 and local > glob + 0.1, (local, glob)
    # the heatmap: the most distant patch of a bad frame sits at its spot
    d = head.patch_distances(head_input(key, {"map_s16": bad["map_s16"][:1]}))[0]
    spot = np.unravel_index(np.argmax(bad["map_s16"][0, 0]), (12, 12))
    assert abs(int(np.argmax(d)) // 12 - spot[0]) <= 1 and abs(int(np.argmax(d)) % 12 - spot[1]) <= 1
    # it travels in a bundle as arrays plus metadata
    again = load_head(head.meta(), head.arrays("ood0"), "ood0")
    assert isinstance(again, PatchKnnHead)
    np.testing.assert_array_equal(again.score(bad), head.score(bad))


def test_bad_patch_specs_are_refused():
    import pytest

    from bouncer.runtime.errors import BouncerError

    for bad in ("patchknn:", "patchknn:map_s8+", "knn:map_s8+map_s16", "patchknn:map_s8@max"):
        with pytest.raises(BouncerError, match="OOD head"):
            parse_head(bad)
    with pytest.raises(BouncerError, match="no output 'map_s4'"):
        patch_grid({"map_s8": np.zeros((1, 2, 4, 4), np.float32)}, ("map_s8", "map_s4"))
