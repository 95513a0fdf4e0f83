"""Reading images: every bad file is an ImageError naming the file, never a crash."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bouncer.runtime.errors import BouncerError, ImageError
from bouncer.runtime.images import image_folder, iter_image_paths, read_bgr, to_bgr


def _write(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


def test_formats_are_normalised_to_bgr(tmp_path):
    grey = _write(tmp_path / "g.png", np.full((20, 30), 7, np.uint8))
    rgba = _write(tmp_path / "a.png", np.full((20, 30, 4), 9, np.uint8))
    deep = _write(tmp_path / "d.png", np.full((20, 30), 65535, np.uint16))
    jpg = _write(tmp_path / "c.jpg", np.full((20, 30, 3), 100, np.uint8))
    for p in (grey, rgba, deep, jpg):
        img = read_bgr(p)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert read_bgr(deep)[0, 0, 0] == 255


@pytest.mark.parametrize("content,msg", [(b"", "empty file"), (b"this is not an image", "not a decodable image")])
def test_bad_files(tmp_path, content, msg):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=msg) as exc:
        read_bgr(p)
    assert str(p) in str(exc.value)


def test_truncated_jpeg(tmp_path):
    good = _write(tmp_path / "good.jpg", np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    try:
        img = read_bgr(cut)  # libjpeg may decode a partial image; it must still be a valid frame
        assert img.shape[2] == 3
    except ImageError as exc:
        assert "cut.jpg" in str(exc)


def test_tiny_and_missing(tmp_path):
    tiny = _write(tmp_path / "tiny.png", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ImageError, match="too small"):
        read_bgr(tiny)
    with pytest.raises(ImageError, match="cannot read"):
        read_bgr(tmp_path / "missing.png")


@settings(max_examples=80, deadline=None)
@given(
    arr=st.one_of(
        arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))),
        arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 6))),
        arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 20), st.just(3))),
        arrays(np.uint16, st.tuples(st.integers(8, 20), st.integers(8, 20))),
    )
)
def test_to_bgr_either_converts_or_raises_image_error(arr):
    try:
        out = to_bgr(arr)
    except ImageError:
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and min(out.shape[:2]) >= 8


def test_folders(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "a" / "deep" / "1.png", np.zeros((10, 10, 3), np.uint8))
    _write(tmp_path / "b" / "2.jpg", np.zeros((10, 10, 3), np.uint8))
    (tmp_path / "b" / "notes.txt").write_text("x")
    assert {k: len(v) for k, v in image_folder(tmp_path).items()} == {"a": 1, "b": 1}
    assert len(list(iter_image_paths([tmp_path]))) == 2
    with pytest.raises(BouncerError, match="no class sub-folders"):
        image_folder(tmp_path / "empty")
    with pytest.raises(BouncerError, match="no such file"):
        list(iter_image_paths([tmp_path / "nope"]))
