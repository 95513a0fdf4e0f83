"""The C++ hot path against its specification, the numpy reference: same results within stated tolerances,
same TypeError/ValueError for bad arguments. Property tests over random shapes, values, NaN/inf and
non-contiguous arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bouncer.runtime.kernels import reference as ref


def _load_cpp():
    """The built extension; BOUNCER_HOTPATH_SO points at another build (scripts/asan_kernels uses it)."""
    import importlib.util
    import os

    path = os.environ.get("BOUNCER_HOTPATH_SO")
    if not path:
        from bouncer import _hotpath  # CI builds it (BOUNCER_REQUIRE_HOTPATH=1): a missing module fails here

        return _hotpath
    spec = importlib.util.spec_from_file_location("bouncer._hotpath", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpp = _load_cpp()

SETTINGS = settings(max_examples=60, deadline=None)
floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def same_error(name: str, *args, **kwargs) -> type[Exception]:
    errors = []
    for impl in (ref, cpp):
        with pytest.raises((TypeError, ValueError)) as exc:
            getattr(impl, name)(*args, **kwargs)
        errors.append(exc.type)
    assert errors[0] is errors[1], errors
    return errors[0]


def with_bad_values(x: np.ndarray, data) -> np.ndarray:
    """Sprinkle NaN / inf into some rows."""
    x = x.copy()
    if not x.size:
        return x
    for _ in range(data.draw(st.integers(0, 2))):
        i = data.draw(st.integers(0, x.shape[0] - 1))
        j = data.draw(st.integers(0, x.shape[1] - 1))
        x[i, j] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return x


@SETTINGS
@given(
    data=st.data(),
    src=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    dst=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    swap=st.booleans(),
)
def test_resize_normalize(data, src, dst, swap):
    img = data.draw(arrays(np.uint8, (*src, 3)))
    mean = tuple(data.draw(st.floats(0, 255)) for _ in range(3))
    std = tuple(data.draw(st.floats(1, 200)) for _ in range(3))
    a = ref.resize_normalize(img, mean, std, swap, np.zeros((3, *dst), np.float32))
    out = np.zeros((3, *dst), np.float32)
    assert cpp.resize_normalize(img, mean, std, swap, out) is out
    np.testing.assert_allclose(out, a, rtol=1e-5, atol=1e-4)
    # letterboxing: only the rectangle is written
    top, left = data.draw(st.integers(0, dst[0] - 1)), data.draw(st.integers(0, dst[1] - 1))
    rect = (top, left, dst[0] - top, dst[1] - left)
    a = ref.resize_normalize(img, mean, std, swap, np.full((3, *dst), 7, np.float32), rect)
    b = cpp.resize_normalize(img, mean, std, swap, np.full((3, *dst), 7, np.float32), rect)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    assert (b[:, :top] == 7).all() and (b[:, :, :left] == 7).all()


def test_resize_normalize_at_equal_size_is_a_plain_normalisation():
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
    out = cpp.resize_normalize(img, (1.0, 2.0, 3.0), (2.0, 4.0, 8.0), True, np.empty((3, 24, 32), np.float32))
    rgb = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_allclose(out, (rgb - np.array([1, 2, 3], np.float32)[:, None, None]) / [[[2]], [[4]], [[8]]])


def test_resize_normalize_errors():
    img, out = np.zeros((8, 8, 3), np.uint8), np.zeros((3, 4, 4), np.float32)
    assert same_error("resize_normalize", img.astype(np.float32), (0, 0, 0), (1, 1, 1), True, out) is TypeError
    assert same_error("resize_normalize", img[:, :, :2], (0, 0, 0), (1, 1, 1), True, out) is ValueError
    assert same_error("resize_normalize", img, (0, 0, 0), (1, 1, 1), True, out.astype(np.float64)) is ValueError
    assert same_error("resize_normalize", img, (0, 0), (1, 1, 1), True, out) is ValueError
    assert same_error("resize_normalize", img, (0, 0, 0), (1, 1, 1), True, out, (2, 2, 3, 3)) is ValueError
    assert same_error("resize_normalize", img, (0, 0, 0), (1, 1, 1), True, out, (0, 0, 0, 4)) is ValueError
    out.flags.writeable = False
    assert same_error("resize_normalize", img, (0, 0, 0), (1, 1, 1), True, out) is ValueError
    with pytest.raises(ValueError, match="C-contiguous"):
        cpp.resize_normalize(np.zeros((8, 16, 3), np.uint8)[:, ::2], (0, 0, 0), (1, 1, 1), True, out)


@SETTINGS
@given(data=st.data(), h=st.integers(2, 60), w=st.integers(2, 60))
def test_halve_is_exact(data, h, w):
    img = data.draw(arrays(np.uint8, (h, w, 3)))
    np.testing.assert_array_equal(cpp.halve(img), ref.halve(img))
    if h % 2 == 0 and w % 2 == 0:  # the box mean OpenCV's INTER_AREA computes at half size
        np.testing.assert_array_equal(ref.halve(img), cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA))


@SETTINGS
@given(data=st.data(), h=st.integers(4, 60), w=st.integers(4, 60))
def test_halve_with_grey_is_exact(data, h, w):
    img = data.draw(arrays(np.uint8, (h, w, 3)))
    (half, grey), (h2, g2) = cpp.halve_with_grey(img), ref.halve_with_grey(img)
    np.testing.assert_array_equal(half, h2)
    np.testing.assert_array_equal(grey, g2)
    np.testing.assert_array_equal(ref.luma(half), cv2.cvtColor(half, cv2.COLOR_BGR2GRAY))  # OpenCV's, exactly


def test_halve_errors():
    assert same_error("halve", np.zeros((8, 8, 3), np.float32)) is TypeError
    assert same_error("halve", np.zeros((1, 8, 3), np.uint8)) is ValueError
    assert same_error("halve", np.zeros((8, 8), np.uint8)) is ValueError
    assert same_error("halve", np.zeros((8, 16, 3), np.uint8)[:, ::2]) is ValueError
    assert same_error("halve_with_grey", np.zeros((3, 8, 3), np.uint8)) is ValueError
    assert same_error("halve_with_grey", np.zeros((8, 8, 3), np.int16)) is TypeError


@SETTINGS
@given(data=st.data(), tiles=st.integers(1, 4), th=st.integers(1, 12), tw=st.integers(1, 12), with_prev=st.booleans())
def test_quality_stats(data, tiles, th, tw, with_prev):
    h, w = max(3, tiles * th) // tiles * tiles, max(3, tiles * tw) // tiles * tiles
    h, w = (h if h >= 3 else tiles * 3), (w if w >= 3 else tiles * 3)
    grey = data.draw(arrays(np.uint8, (h, w)))
    prev = data.draw(arrays(np.uint8, (h, w))) if with_prev else None
    a = ref.quality_stats(grey, prev, tiles, 8, 247)
    b = cpp.quality_stats(grey, prev, tiles, 8, 247)
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_quality_stats_errors():
    g = np.zeros((12, 16), np.uint8)
    assert same_error("quality_stats", g.astype(np.int16), None, 4, 8, 247) is TypeError
    assert same_error("quality_stats", g, None, 5, 8, 247) is ValueError  # 5 does not divide 12 x 16
    assert same_error("quality_stats", g, np.zeros((12, 15), np.uint8), 4, 8, 247) is ValueError
    assert same_error("quality_stats", np.zeros((2, 8), np.uint8), None, 1, 8, 247) is ValueError


@SETTINGS
@given(data=st.data(), m=st.integers(1, 6), c=st.integers(1, 8), d=st.integers(1, 64), t=st.floats(0.05, 20))
def test_linear_probs(data, m, c, d, t):
    x = with_bad_values(data.draw(arrays(np.float32, (m, d), elements=floats)), data)
    w = data.draw(arrays(np.float32, (c, d), elements=st.floats(-5, 5, width=32)))
    b = data.draw(arrays(np.float32, (c,), elements=st.floats(-5, 5, width=32)))
    np.testing.assert_allclose(cpp.linear_probs(x, w, b, t), ref.linear_probs(x, w, b, t), rtol=1e-4, atol=1e-6)


@SETTINGS
@given(
    data=st.data(),
    m=st.integers(1, 5),
    c=st.integers(1, 6),
    d=st.integers(2, 48),
    r=st.integers(1, 80),
    half=st.booleans(),
)
def test_mahalanobis(data, m, c, d, r, half):
    r = min(r, d)
    x = with_bad_values(data.draw(arrays(np.float32, (m, d), elements=floats)), data)
    means = data.draw(arrays(np.float32, (c, d), elements=st.floats(-1, 1, width=32)))
    q, _ = np.linalg.qr(np.random.default_rng(data.draw(st.integers(0, 999))).normal(size=(d, d)))
    basis = np.ascontiguousarray(q[:, :r], np.float16 if half else np.float32)
    inv_evals = data.draw(arrays(np.float32, (r,), elements=st.floats(0.125, 100, width=32)))
    inv_rest = data.draw(st.floats(0.1, 100))
    mp = np.ascontiguousarray(means @ basis.astype(np.float32), np.float32)
    a = ref.mahalanobis(x, means, basis, inv_evals, inv_rest, mp)
    b = cpp.mahalanobis(x, means, basis, inv_evals, inv_rest, mp)
    scale = max(100.0, float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 100.0)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * scale)


@SETTINGS
@given(
    data=st.data(),
    m=st.integers(1, 19),  # 8 and more: the blocked path, eight queries at a time with a remainder
    n=st.integers(1, 150),  # past one 64-row chunk of the bank
    d=st.integers(1, 40),
    kind=st.sampled_from(["f32", "f16", "i8"]),
)
def test_knn_score(data, m, n, d, kind):
    x = with_bad_values(data.draw(arrays(np.float32, (m, d), elements=floats)), data)
    raw = data.draw(arrays(np.float32, (n, d), elements=st.floats(-1, 1, width=32)))
    raw /= np.linalg.norm(raw, axis=1, keepdims=True) + 1e-6
    scale = None
    bank = raw.astype(np.float16) if kind == "f16" else raw
    if kind == "i8":
        bank, scale = ref.quantize_bank(raw)
    k = data.draw(st.integers(1, n))
    a, b = ref.knn_score(x, bank, k, scale), cpp.knn_score(x, bank, k, scale)
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_knn_int8_bank_is_close_to_float():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 192)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q8, s = ref.quantize_bank(bank)
    x = rng.normal(size=(10, 192)).astype(np.float32)
    np.testing.assert_allclose(cpp.knn_score(x, q8, 3, s), ref.knn_score(x, bank, 3), atol=0.01)


def test_knn_errors():
    x = np.zeros((1, 4), np.float32)
    assert same_error("knn_score", x, np.zeros((3, 4), np.float64), 1) is TypeError
    assert same_error("knn_score", x, np.zeros((3, 4), np.float32), 4) is ValueError
    assert same_error("knn_score", x, np.zeros((3, 4), np.int8), 1) is ValueError  # int8 without scales
    assert same_error("knn_score", np.zeros((1, 5), np.float32), np.zeros((3, 4), np.float32), 1) is ValueError
    assert same_error("knn_score", np.zeros((4, 4), np.float32)[:, ::2], np.zeros((3, 2), np.float32), 1) is ValueError


@SETTINGS
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)))
def test_spatial_max(data, shape):
    fmap = data.draw(arrays(np.float32, shape, elements=st.floats(allow_nan=True, allow_infinity=True, width=32)))
    np.testing.assert_array_equal(cpp.spatial_max(fmap), ref.spatial_max(fmap))


@SETTINGS
@given(data=st.data(), m=st.integers(1, 8), h=st.integers(1, 6), k=st.integers(2, 12), combine=st.integers(0, 2))
def test_fuse(data, m, h, k, combine):
    s = data.draw(arrays(np.float32, (m, h), elements=floats))
    steps = data.draw(arrays(np.float64, (h, k), elements=st.floats(0.01, 5)))
    kx = np.ascontiguousarray(np.cumsum(steps, axis=1) + data.draw(st.floats(-10, 10)))
    ky = data.draw(arrays(np.float64, (h, k), elements=st.floats(-10, 10)))
    lo = data.draw(arrays(np.float64, (h,), elements=st.floats(0, 5)))
    hi = data.draw(arrays(np.float64, (h,), elements=st.floats(0, 5)))
    got, want = cpp.fuse(s, kx, ky, lo, hi, combine), ref.fuse(s, kx, ky, lo, hi, combine)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_fuse_curve_values():
    """The curve passes through its knots, interpolates between them, extends with its slopes, and combines."""
    kx = np.array([[0.0, 1.0, 3.0], [10.0, 20.0, 30.0]])
    ky = np.array([[0.0, 2.0, 3.0], [0.0, 1.0, 5.0]])
    lo, hi = np.array([0.5, 0.0]), np.array([1.0, 0.1])
    s = np.array([[1.0, 25.0], [2.0, 5.0], [-2.0, 40.0], [np.nan, 10.0]], np.float32)
    # head 0: 2, 2.5, -1, nan; head 1: 3, 0, 6, 0
    for impl in (ref, cpp):
        np.testing.assert_allclose(impl.fuse(s, kx, ky, lo, hi, 1)[:3], [3.0, 2.5, 6.0], rtol=1e-6)
        np.testing.assert_allclose(impl.fuse(s, kx, ky, lo, hi, 2)[:3], [5.0, 2.5, 5.0], rtol=1e-6)
        np.testing.assert_allclose(impl.fuse(s, kx, ky, lo, hi, 0)[:3], [2.5, 1.25, 2.5], rtol=1e-6)
        assert np.isnan(impl.fuse(s, kx, ky, lo, hi, 0)[3])


def test_decode_boxes_rounds_as_the_reference_without_fused_multiply_adds():
    """Corners are centre -/+ size * 0.5, each rounded: a fused multiply-add (aarch64's GCC fuses unless told not
    to) rounds once and differs on subnormal sizes (found by the property test below under QEMU)."""
    tiny = np.float32(1.4e-45)
    raw = np.array([[tiny], [tiny], [tiny], [tiny], [1.0]], np.float32)  # ultralytics layout, one class
    (gb, _, _), (wb, _, _) = (impl.decode_boxes(raw, 0, 1, 0.0, 1) for impl in (cpp, ref))
    np.testing.assert_array_equal(gb, wb)
    assert wb.tolist() == [[tiny, tiny, tiny, tiny]]


def _raw_detections(data, layout: int, n: int, c: int) -> np.ndarray:
    """A raw detector output: boxes in a 64 px frame, scores in 0..1 with ties (quantised), some NaN/inf."""
    geo = data.draw(arrays(np.float32, (n, 4), elements=st.floats(0, 64, width=32)))
    levels = st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.5, 0.9, 1.0])
    probs = data.draw(arrays(np.float32, (n, c + layout), elements=levels))
    rows = np.concatenate([geo, probs], axis=1)
    rows = with_bad_values(rows, data)
    return np.ascontiguousarray(rows.T if layout == 0 else rows)


@SETTINGS
@given(data=st.data(), layout=st.integers(0, 1), n=st.integers(0, 40), c=st.integers(1, 5),
       min_score=st.sampled_from([0.0, 0.05, 0.5]), cap=st.integers(1, 50))  # fmt: skip
def test_decode_boxes(data, layout, n, c, min_score, cap):
    raw = _raw_detections(data, layout, n, c)
    (gb, gs, gbad), (wb, ws, wbad) = (impl.decode_boxes(raw, layout, c, min_score, cap) for impl in (cpp, ref))
    assert gbad == wbad and gb.shape == wb.shape and gs.shape == ws.shape == (len(wb), c)
    np.testing.assert_array_equal(gb, wb)  # same candidates, same order: exact
    np.testing.assert_array_equal(gs, ws)
    assert len(wb) <= cap and (len(ws) == 0 or ws.max(axis=1).min() >= np.float32(min_score))


@SETTINGS
@given(data=st.data(), m=st.integers(0, 30), c=st.integers(1, 4), iou=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
def test_nms(data, m, c, iou):
    corner = data.draw(arrays(np.float32, (m, 2), elements=st.floats(0, 40, width=32)))
    size = data.draw(arrays(np.float32, (m, 2), elements=st.floats(0, 20, width=32)))
    boxes = with_bad_values(np.ascontiguousarray(np.concatenate([corner, corner + size], 1)), data)
    scores = data.draw(arrays(np.float32, (m, c), elements=st.sampled_from([0.1, 0.5, 0.5, 0.8, 1.0])))
    got, want = cpp.nms(boxes, scores, iou), ref.nms(boxes, scores, iou)
    assert got.dtype == want.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    kept = set(want.tolist())
    assert all(np.isfinite(boxes[i]).all() for i in kept)  # a NaN box is never kept


def test_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.6, 0.1], [0.9, 0.0], [0.1, 0.7], [0.55, 0.2]], np.float32)
    for impl in (ref, cpp):
        # box 1 (class 0, 0.9) suppresses box 0 (class 0, IoU 0.68); box 2 is class 1: kept beside them
        assert impl.nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
        assert impl.nms(boxes, scores, 0.7).tolist() == [1, 2, 0, 3]


def test_decode_boxes_reads_both_layouts():
    # two candidates, two classes: cx cy w h | scores (ultralytics) or objectness and class probabilities (YOLOX)
    ultra = np.array([[10, 30], [10, 30], [4, 8], [2, 6], [0.2, 0.9], [0.7, 0.1]], np.float32)
    yolox = np.array([[10, 10, 4, 2, 0.5, 0.2, 0.9], [30, 30, 8, 6, 1.0, 0.9, 0.1]], np.float32)
    for impl in (ref, cpp):
        b, s, bad = impl.decode_boxes(ultra, 0, 2, 0.5, 10)
        assert bad == 0 and b.tolist() == [[26, 27, 34, 33], [8, 9, 12, 11]]
        np.testing.assert_allclose(s, [[0.9, 0.1], [0.2, 0.7]])
        b, s, bad = impl.decode_boxes(yolox, 1, 2, 0.3, 10)
        np.testing.assert_allclose(s, [[0.9, 0.1], [0.1, 0.45]], rtol=1e-6)
        assert b.tolist() == [[26, 27, 34, 33], [8, 9, 12, 11]]


def test_shape_and_dtype_errors_match():
    w, b = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)
    assert same_error("linear_probs", np.zeros((2, 4), np.float64), w, b, 1.0) is TypeError
    assert same_error("linear_probs", np.zeros((2, 5), np.float32), w, b, 1.0) is ValueError
    assert same_error("linear_probs", np.zeros((2, 4), np.float32), w, np.zeros(2, np.float32), 1.0) is ValueError
    assert same_error("linear_probs", np.zeros((2, 4), np.float32), w, b, 0.0) is ValueError
    assert same_error("linear_probs", np.zeros(4, np.float32), w, b, 1.0) is ValueError
    means, basis = np.zeros((2, 4), np.float32), np.zeros((4, 3), np.float32)
    ie, mp = np.ones(3, np.float32), np.zeros((2, 3), np.float32)
    assert same_error("mahalanobis", np.zeros((1, 4), np.float32), means, basis, np.ones(2, np.float32), 1.0, mp)
    assert same_error("mahalanobis", np.zeros((1, 4), np.float32), means, np.zeros((5, 3), np.float32), ie, 1.0, mp)
    assert same_error("spatial_max", np.zeros((1, 2, 3), np.float32)) is ValueError
    assert same_error("spatial_max", np.zeros((1, 2, 3, 3), np.float64)) is TypeError
    kx, ky, sl = np.array([[0.0, 1.0]] * 3), np.zeros((3, 2)), np.ones(3)
    assert same_error("fuse", np.zeros((2, 3), np.float32), kx[:2], ky[:2], sl[:2], sl[:2], 1) is ValueError
    assert same_error("fuse", np.zeros((2, 3), np.float32), kx, ky[:, :1], sl, sl, 1) is ValueError
    assert same_error("fuse", np.zeros((2, 3), np.float32), kx, ky, sl, sl, 3) is ValueError
    assert same_error("fuse", np.zeros((2, 3), np.float64), kx, ky, sl, sl, 1) is TypeError
    raw = np.zeros((6, 10), np.float32)
    assert same_error("decode_boxes", raw.astype(np.float64), 0, 2, 0.1, 5) is TypeError
    assert same_error("decode_boxes", raw, 0, 3, 0.1, 5) is ValueError  # 4 + 3 rows needed
    assert same_error("decode_boxes", raw, 1, 2, 0.1, 5) is ValueError  # YOLOX: columns, not rows
    assert same_error("decode_boxes", raw, 2, 2, 0.1, 5) is ValueError
    assert same_error("decode_boxes", raw, 0, 2, 0.1, 0) is ValueError
    assert same_error("decode_boxes", raw[:, ::2], 0, 2, 0.1, 5) is ValueError
    boxes, scores = np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32)
    assert same_error("nms", boxes[:, :3].copy(), scores, 0.5) is ValueError
    assert same_error("nms", boxes, scores[:2], 0.5) is ValueError
    assert same_error("nms", boxes, scores, 1.5) is ValueError
    assert same_error("nms", boxes.astype(np.float64), scores, 0.5) is TypeError


@pytest.mark.parametrize("kernel", ["knn_score", "halve", "halve_with_grey", "resize_normalize"])
def test_kernels_release_the_gil(kernel):
    """While a long kernel runs in one thread, Python keeps running in another; a kernel holding the GIL
    would stall it for the kernel's whole duration (zero ticks). Other load on the machine slows the ticking
    thread too, so the bar is a tenth of the rate beside a sleeping thread, best of three tries: far from
    the zero a held GIL gives, robust to a busy CI machine."""
    import threading
    import time

    def ticks_per_second(fn) -> tuple[float, float]:
        started = threading.Event()

        def work() -> None:
            started.set()
            fn()

        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        ticks, t0 = 0, time.perf_counter()
        while worker.is_alive():
            ticks += 1
        duration = time.perf_counter() - t0
        return ticks / duration, duration

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (4096, 4096, 3), np.uint8)
    out = np.empty((3, 2048, 2048), np.float32)
    calls = {
        "knn_score": (
            rng.normal(size=(60, 192)).astype(np.float32),
            rng.normal(size=(50000, 192)).astype(np.float32),
            1,
        ),
        "halve": (frame,),
        "halve_with_grey": (frame,),
        "resize_normalize": (frame, (0.0,) * 3, (1.0,) * 3, True, out),
    }
    repeats = 1 if kernel == "knn_score" else 5  # long enough to tell
    tries = []
    for _ in range(3):
        idle, _ = ticks_per_second(lambda: time.sleep(0.08))
        busy, duration = ticks_per_second(lambda: [getattr(cpp, kernel)(*calls[kernel]) for _ in range(repeats)])
        assert duration > 0.02, duration  # the kernel ran long enough to tell
        tries.append((busy / idle, busy, idle))
        if busy > 0.1 * idle:
            break
    assert max(t[0] for t in tries) > 0.1, tries


def test_missing_extension_falls_back_with_one_warning():
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'bouncer._hotpath':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bouncer.runtime import kernels\n"
        "from bouncer.runtime.gates import guard, heads, quality\n"
        "import numpy as np\n"
        "print(kernels.ACTIVE, kernels.fuse is kernels.reference.fuse)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "numpy (C++ hot path not built) True"
    assert res.stderr.count("C++ hot path not available") == 1, res.stderr
