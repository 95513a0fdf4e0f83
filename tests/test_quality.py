"""Frame-quality gate: fitted on clean simulator frames, it passes clean frames and names each fault."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.fitting import corruptions
from bouncer.runtime.gates.quality import GREY_H, GREY_W, QualityGate, base_and_grey, grey_small, quality_stats
from bouncer.runtime.preprocess import halve_while
from bouncer.sim import simulator


@pytest.fixture(scope="module")
def gate_and_frames():
    rng = np.random.default_rng(0)
    train = [simulator.render(simulator.KNOWN_CLASSES[i % 4], rng) for i in range(120)]
    fresh = [simulator.render(simulator.KNOWN_CLASSES[i % 4], rng) for i in range(80)]
    return QualityGate.fit([quality_stats(f)[0] for f in train]), fresh


def reasons(gate: QualityGate, frame: np.ndarray, prev: np.ndarray | None = None) -> set[str]:
    return {i["reason"] for i in gate.check(quality_stats(frame, prev)[0])}


def test_clean_frames_pass(gate_and_frames):
    gate, fresh = gate_and_frames
    assert sum(bool(reasons(gate, f)) for f in fresh) == 0


@pytest.mark.parametrize(
    "fault,expected",
    [
        (corruptions.lens_cap, {"dark"}),
        (corruptions.blown_out, {"overexposed"}),
        (corruptions.noise_frame, {"noise"}),
        (corruptions.gaussian_blur, {"blur"}),
        # a washed-out frame loses texture everywhere: low contrast, blur or low-texture tiles all say so
        (corruptions.contrast, {"low_contrast", "blur", "occluded"}),
    ],
)
def test_each_fault_is_named(gate_and_frames, fault, expected):
    gate, fresh = gate_and_frames
    rng = np.random.default_rng(5)
    hits = [bool(expected & reasons(gate, fault(f, rng))) for f in fresh[:20]]
    assert all(hits), f"{expected}: {sum(hits)}/20"


def test_occlusion_and_frozen(gate_and_frames):
    gate, fresh = gate_and_frames
    occluded = fresh[0].copy()
    occluded[:, :110] = 30  # a flat object covers a third of the view
    assert "occluded" in reasons(gate, occluded)
    _, grey = quality_stats(fresh[1])
    assert "frozen" in reasons(gate, fresh[1], grey)
    assert "frozen" not in reasons(gate, fresh[2], grey)


def test_a_two_level_light_change_is_not_rejected(gate_and_frames):
    """A new light bulb (+2 grey levels) is the drift monitor's job, not a per-frame reject."""
    gate, fresh = gate_and_frames
    brighter = [np.clip(f.astype(np.int16) + 2, 0, 255).astype(np.uint8) for f in fresh]
    assert sum(bool(reasons(gate, f)) for f in brighter) == 0


def test_stats_are_resolution_independent():
    frame = simulator.render("gear", np.random.default_rng(1))
    import cv2

    big = cv2.resize(frame, (640, 480), interpolation=cv2.INTER_CUBIC)
    a, b = quality_stats(frame)[0], quality_stats(big)[0]
    assert abs(a["mean"] - b["mean"]) < 1.0
    assert 0.5 < a["sharpness"] / b["sharpness"] < 2.0


def test_round_trip(gate_and_frames):
    gate, _ = gate_and_frames
    assert QualityGate.from_dict(gate.to_dict()) == gate
    with pytest.raises(ValueError, match="lack"):
        QualityGate.from_dict({"bounds": {"mean": [0, 1]}})


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from([(480, 640), (960, 1280), (481, 641), (1080, 1920), (720, 1280), (240, 320), (100, 120)]),
    target=st.sampled_from([(224, 224), (160, 120), (320, 240), (256, 192)]),
    seed=st.integers(0, 2**16),
)
def test_fused_base_and_grey_equal_the_separate_steps(size, target, seed):
    """One pass (kernels.halve_with_grey) where the geometry allows it, the separate steps elsewhere: the same
    pixels either way."""
    frame = np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)
    w, h = max(target[0], GREY_W), max(target[1], GREY_H)
    base, grey = base_and_grey(frame, w, h)
    expected = halve_while(frame, w, h)
    np.testing.assert_array_equal(base, expected)
    np.testing.assert_array_equal(grey, grey_small(expected))


def _binarised(rng: np.random.Generator) -> np.ndarray:
    """A black-and-white AOI patch: traces on a flat board, so many tiles are exactly uniform."""
    img = np.zeros((240, 320), np.uint8)
    for _ in range(rng.integers(1, 4)):
        x, y = int(rng.integers(0, 300)), int(rng.integers(0, 220))
        img[y : y + int(rng.integers(4, 30)), x : x + int(rng.integers(20, 120))] = 255
    return np.dstack([img] * 3)


def _flat_regions(rng: np.random.Generator) -> np.ndarray:
    """A textured part on a perfectly flat background (a cropped tile on a mask)."""
    img = np.full((240, 320, 3), 30, np.uint8)
    h, w = int(rng.integers(60, 160)), int(rng.integers(80, 200))
    img[40 : 40 + h, 60 : 60 + w] = rng.integers(90, 200, (h, w, 1), dtype=np.uint8)
    return img


def _saturated(rng: np.random.Generator) -> np.ndarray:
    """Backlit parts: most of the frame clipped white, a dark silhouette in front."""
    img = np.full((240, 320, 3), 255, np.uint8)
    cx, cy, r = int(rng.integers(100, 220)), int(rng.integers(80, 160)), int(rng.integers(30, 70))
    yy, xx = np.mgrid[:240, :320]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(10, 60)
    return img


@pytest.mark.parametrize("make", [_binarised, _flat_regions, _saturated])
def test_bounds_contain_the_lines_own_frames(make):
    """Whatever a line looks like, a gate passes what its own training frames look like (nearly all of
    them) and fresh frames of the same kind; a binarised tile's std of exactly 0 is normal there."""
    rng = np.random.default_rng(3)
    train = [quality_stats(make(rng))[0] for _ in range(300)]
    gate = QualityGate.fit(train)
    assert sum(bool(gate.check(s)) for s in train) <= 3  # 1%
    fresh = [quality_stats(make(rng))[0] for _ in range(100)]
    assert sum(bool(gate.check(s)) for s in fresh) <= 3
    if make is _binarised:
        assert min(s["tile_std_min"] for s in train) == 0.0
        assert gate.bounds["tile_std_min"][0] == 0.0


def test_flat_tiles_still_occluded_where_the_line_has_none(gate_and_frames):
    """The zero lower bound is only for lines whose own frames have flat tiles: on the simulator a frame with
    a flat patch is still occluded."""
    gate, fresh = gate_and_frames
    assert gate.bounds["tile_std_min"][0] > 0
    frame = fresh[0].copy()
    frame[:120, :160] = 0
    assert "occluded" in reasons(gate, frame)
