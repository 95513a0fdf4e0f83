"""Preprocessing: the numpy reference every backend input goes through."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.preprocess import Preprocessing, preprocess, resize_frame

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
    pp = Preprocessing(resize="letterbox", mean=(100.0, 110.0, 120.0))
    out = resize_frame(frame, pp)
    assert out.shape == (224, 224, 3)
    assert (out[112, :, :] == 255).all()  # the band
    assert tuple(out[0, 0]) == (120, 110, 100)  # pad = mean colour, BGR
    x = preprocess(frame, pp)
    np.testing.assert_allclose(x[0, :, 0, 0], 0.0, atol=0.01)


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
