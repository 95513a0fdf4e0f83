"""Preprocessing: the numpy reference every backend input goes through."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.preprocess import Preprocessing, preprocess

frames = st.tuples(st.integers(8, 300), st.integers(8, 300)).flatmap(lambda hw: arrays(np.uint8, (hw[0], hw[1], 3)))


@settings(max_examples=60, deadline=None)
@given(frame=frames, resize=st.sampled_from(["stretch", "letterbox"]), color=st.sampled_from(["rgb", "bgr"]))
def test_output_shape_dtype_and_range(frame, resize, color):
    pp = Preprocessing(height=64, width=48, resize=resize, color=color)
    x = preprocess(frame, pp)
    assert x.shape == (1, 3, 64, 48) and x.dtype == np.float32 and x.flags.c_contiguous
    assert np.all(x >= -127 / 128 - 1e-6) and np.all(x <= 128 / 128 + 1e-6)


def test_constant_frame_maps_to_the_normalised_value_and_rgb_order():
    frame = np.zeros((50, 70, 3), np.uint8)
    frame[:] = (10, 20, 30)  # BGR
    x = preprocess(frame, Preprocessing(height=32, width=32))
    np.testing.assert_allclose(x[0, :, 5, 5], (np.array([30, 20, 10]) - 127) / 128, atol=1e-6)


def test_letterbox_keeps_aspect_and_pads_with_the_mean():
    frame = np.full((100, 400, 3), 255, np.uint8)  # 4:1 -> a 224x56 band in the middle
    pp = Preprocessing(resize="letterbox", mean=(100.0, 110.0, 120.0), std=(1.0, 1.0, 1.0))
    x = preprocess(frame, pp)[0]
    band = (x != 0).any(axis=(0, 2))
    assert band.sum() == 56 and band[84:140].all()  # the band, centred
    np.testing.assert_allclose(x[:, 112, :], (255 - np.array([100, 110, 120]))[:, None] * np.ones((1, 224)))
    assert (x[:, :84] == 0).all() and (x[:, 140:] == 0).all()  # pad = mean colour, normalised to 0


def test_stretch_matches_opencv_within_a_grey_level():
    """The box halving is OpenCV's INTER_AREA exactly; the bilinear step is INTER_LINEAR without its
    fixed-point rounding, so the two paths differ by less than one grey level."""
    frame = cv2.resize(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8), (640, 480))
    pp = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="bgr")
    half = cv2.resize(frame, (320, 240), interpolation=cv2.INTER_AREA)
    expected = cv2.resize(half, (224, 224), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    diff = np.abs(preprocess(frame, pp)[0] - expected)
    assert diff.max() < 1.0 and diff.mean() < 0.5


@pytest.mark.parametrize(
    "bad,msg",
    [({"std": 0}, "std"), ({"mean": [1, 2]}, "mean"), ({"color": "hsv"}, "color"), ({"resize": "crop"}, "resize")],
)
def test_bad_preprocessing_is_a_clear_error(bad, msg):
    with pytest.raises(BouncerError, match=msg):
        Preprocessing.from_dict(bad)


def test_round_trip():
    pp = Preprocessing(
        height=100, width=120, color="bgr", mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), resize="letterbox"
    )
    assert Preprocessing.from_dict(pp.to_dict()) == pp
