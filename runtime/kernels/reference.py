"""The numpy reference of every per-frame kernel: the specification the C++ hot path (`bouncer._hotpath`)
must match. Same names, same arguments, same results within the tolerances the tests state.

Conventions shared by both implementations:
- feature inputs are float32 M x D (a batch of rows); each row is l2-normalised inside the kernel;
- a row holding NaN or inf yields NaN in every output of that row (never a silently wrong number);
- wrong dtypes, shapes or mismatched sizes raise TypeError / ValueError before any work.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def _rows(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"{name}: expected a float32 array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected 2 dimensions (rows x features), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: rows have {x.shape[1]} features, expected {dim}")
    return _contiguous(x, name)


def _contiguous(x: np.ndarray, name: str) -> np.ndarray:
    """Kernels read arrays in place: a strided view is refused rather than silently copied."""
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    return x


def _l2n(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (float32, the norm taken in float64) and a mask of rows that were all finite."""
    finite = np.isfinite(x).all(axis=1)
    x = np.where(finite[:, None], x, np.float32(0))
    norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True) + EPS
    return (x * (1.0 / norm).astype(np.float32)).astype(np.float32), finite


def _bgr(img: np.ndarray, least: int) -> np.ndarray:
    """A BGR uint8 H x W x 3 image, C-contiguous, each side at least `least` pixels."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise TypeError(f"img: expected uint8, got {getattr(img, 'dtype', type(img).__name__)}")
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < least:
        raise ValueError(f"img: expected H x W x 3 with H, W >= {least}, got shape {img.shape}")
    return _contiguous(img, "img")


def _taps(n: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output coordinate: the left (top) source neighbour and the weight of the next one, pixel centres
    aligned as OpenCV's INTER_LINEAR; past the last pixel the edge pixel repeats."""
    s = np.maximum((np.arange(n_out) + 0.5) * (n / n_out) - 0.5, 0.0)
    i = s.astype(np.int64)
    inside = i < n - 1
    return np.where(inside, i, n - 1), np.where(inside, s - i, 0.0).astype(np.float32)


def resize_normalize(
    img: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    swap_rb: bool,
    out: np.ndarray,
    rect: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """BGR uint8 H x W x 3 -> model input in one pass: bilinear to `rect` = (top, left, height, width) of `out`
    (float32 3 x H x W; default: all of it), then (value - mean) / std per output channel, channels reversed
    if swap_rb (mean and std are in the output's order). The rest of `out` is left as it is (letterboxing
    fills it first). With an equal size it is a plain normalisation."""
    _bgr(img, 1)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std: three values each")
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.ndim != 3
        or out.shape[0] != 3
        or not out.flags.c_contiguous
    ):
        raise ValueError("out: expected a C-contiguous float32 array of shape (3, H, W)")
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    top, left, h, w = (0, 0, out.shape[1], out.shape[2]) if rect is None else rect
    if min(top, left) < 0 or min(h, w) < 1 or top + h > out.shape[1] or left + w > out.shape[2]:
        raise ValueError(f"rect: expected (top, left, height, width) inside the output {out.shape}")
    y0, wy = _taps(img.shape[0], h)
    x0, wx = _taps(img.shape[1], w)
    src = img.astype(np.float32)
    a, b = src[y0], src[np.minimum(y0 + 1, img.shape[0] - 1)]
    rows = a + wy[:, None, None] * (b - a)
    a, b = rows[:, x0], rows[:, np.minimum(x0 + 1, img.shape[1] - 1)]
    px = a + wx[None, :, None] * (b - a)
    if swap_rb:
        px = px[:, :, ::-1]
    for c in range(3):
        out[c, top : top + h, left : left + w] = (px[:, :, c] - np.float32(mean[c])) * np.float32(1.0 / std[c])
    return out


def halve(img: np.ndarray) -> np.ndarray:
    """BGR uint8 H x W x 3 -> H//2 x W//2 x 3: the rounded mean of each 2x2 box (an odd last row or column
    is dropped). For even sizes this is exactly OpenCV's INTER_AREA at half size."""
    _bgr(img, 2)
    h, w = img.shape[0] // 2, img.shape[1] // 2
    a = img[: 2 * h, : 2 * w].astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) >> 2).astype(np.uint8)


def luma(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR2GRAY, exactly: BT.601 weights in 15-bit fixed point, rounded."""
    px = bgr.astype(np.uint32)
    return ((px[:, :, 0] * 3735 + px[:, :, 1] * 19235 + px[:, :, 2] * 9798 + 16384) >> 15).astype(np.uint8)


def halve_with_grey(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`halve`, and the grey image of the result halved again: a frame's model input and its quality
    statistics' input from one pass over the frame (H, W >= 4)."""
    half = halve(_bgr(img, 4))
    return half, luma(halve(half))


STAT_FIELDS = ("mean", "std", "dark_frac", "bright_frac", "sharpness", "tile_std_min", "frame_diff")


def quality_stats(grey: np.ndarray, prev: np.ndarray | None, tiles: int, dark: int, bright: int) -> np.ndarray:
    """Fused frame statistics of a grey uint8 h x w image, as float64[7] in STAT_FIELDS order.

    sharpness is the variance of the 4-neighbour Laplacian over interior pixels; tile_std_min the lowest
    population std of a tiles x tiles grid (h and w divisible by tiles); frame_diff the mean absolute
    difference to `prev` (NaN without one).
    """
    if not isinstance(grey, np.ndarray) or grey.dtype != np.uint8:
        raise TypeError("grey: expected uint8")
    if grey.ndim != 2 or min(grey.shape) < 3:
        raise ValueError(f"grey: expected a 2-d image of at least 3 x 3, got shape {grey.shape}")
    _contiguous(grey, "grey")
    h, w = grey.shape
    if tiles < 1 or h % tiles or w % tiles:
        raise ValueError(f"tiles: {tiles} does not divide the image {h} x {w}")
    if prev is not None and (not isinstance(prev, np.ndarray) or prev.dtype != np.uint8 or prev.shape != grey.shape):
        raise ValueError("prev: expected a uint8 image of the same shape as grey")
    g = grey.astype(np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    t = g.reshape(tiles, h // tiles, tiles, w // tiles).transpose(0, 2, 1, 3).reshape(tiles * tiles, -1)
    diff = float(np.abs(g - prev.astype(np.float64)).mean()) if prev is not None else float("nan")
    return np.array(
        [g.mean(), g.std(), (grey <= dark).mean(), (grey >= bright).mean(), lap.var(), t.std(axis=1).min(), diff]
    )


def linear_probs(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, temperature: float) -> np.ndarray:
    """softmax((W l2n(x) + b) / T): M x C class probabilities."""
    weight = _rows(weight, "weight")
    x = _rows(x, "x", weight.shape[1])
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {bias.shape}")
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    xn, finite = _l2n(x)
    z = ((xn @ weight.T).astype(np.float64) + bias) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[~finite] = np.nan
    return p.astype(np.float32)


def mahalanobis(
    x: np.ndarray,
    means: np.ndarray,
    basis: np.ndarray,
    inv_evals: np.ndarray,
    inv_rest: float,
    means_proj: np.ndarray,
) -> np.ndarray:
    """Squared Mahalanobis distance of each l2-normalised row to each mean: M x C.

    The precision is basis diag(inv_evals) basis^T + inv_rest (I - basis basis^T): a low-rank whitening
    plus one isotropic precision for the rest of the space. means_proj = means @ basis, computed once
    when the head is loaded, not per frame. The basis may be stored as float16 (half the bytes to
    stream per frame, which is what bounds this kernel).
    """
    means = _rows(means, "means")
    if not isinstance(basis, np.ndarray) or basis.dtype not in (np.float32, np.float16):
        raise TypeError(f"basis: expected a float32 or float16 array, got {getattr(basis, 'dtype', type(basis))}")
    if basis.ndim != 2:
        raise ValueError(f"basis: expected 2 dimensions, got shape {basis.shape}")
    _contiguous(basis, "basis")
    x = _rows(x, "x", means.shape[1])
    if not isinstance(inv_evals, np.ndarray) or inv_evals.dtype != np.float32:
        raise TypeError("inv_evals: expected a float32 array")
    if basis.shape[0] != means.shape[1] or inv_evals.shape != (basis.shape[1],):
        raise ValueError(f"basis {basis.shape} / inv_evals {inv_evals.shape} do not match means {means.shape}")
    means_proj = _rows(means_proj, "means_proj", basis.shape[1])
    if len(means_proj) != len(means):
        raise ValueError("means_proj: expected one row per mean")
    xn, finite = _l2n(x)
    diff_p = (xn @ basis.astype(np.float32, copy=False))[:, None, :] - means_proj[None, :, :]
    in_basis = (diff_p**2 * inv_evals).sum(-1, dtype=np.float64)
    sq = (xn**2).sum(1, dtype=np.float64)[:, None] - 2.0 * (xn @ means.T) + (means**2).sum(1, dtype=np.float64)[None, :]
    d = in_basis + np.maximum(sq - (diff_p**2).sum(-1, dtype=np.float64), 0.0) * inv_rest
    d[~finite] = np.nan
    return d.astype(np.float32)


def knn_score(x: np.ndarray, bank: np.ndarray, k: int, bank_scale: np.ndarray | None = None) -> np.ndarray:
    """1 - the k-th largest cosine similarity of each l2-normalised row to the bank: M.

    The bank holds l2-normalised rows as float32, float16, or int8 with one scale per row
    (row = int8 * scale). Against an int8 bank the query row is quantised the same way
    (`quantize_bank`) and the dot products are exact integer sums: 4x less memory than float32.
    """
    if bank.dtype not in (np.float32, np.float16, np.int8) or bank.ndim != 2:
        raise TypeError(f"bank: expected a 2-d float32, float16 or int8 array, got {bank.dtype} {bank.shape}")
    _contiguous(bank, "bank")
    x = _rows(x, "x", bank.shape[1])
    if not 1 <= k <= len(bank):
        raise ValueError(f"k: {k} outside 1..{len(bank)}")
    if bank.dtype == np.int8 and (bank_scale is None or bank_scale.shape != (len(bank),)):
        raise ValueError("bank_scale: an int8 bank needs one float32 scale per row")
    xn, finite = _l2n(x)
    if bank.dtype == np.int8:
        assert bank_scale is not None  # checked above
        xq, xs = quantize_bank(xn)
        dots = (xq.astype(np.int32) @ bank.astype(np.int32).T).astype(np.float32)
        sims = dots * (xs[:, None] * bank_scale[None, :])
    else:
        sims = xn @ bank.astype(np.float32, copy=False).T
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    out = (1.0 - kth).astype(np.float32)
    out[~finite] = np.nan
    return out


def quantize_bank(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 of a float bank: (int8 rows, float32 scales)."""
    b = np.asarray(bank, np.float32)
    scale = np.abs(b).max(axis=1) / np.float32(127.0)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(b * (np.float32(1.0) / scale)[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def spatial_max(fmap: np.ndarray) -> np.ndarray:
    """N x C x H x W -> N x C, each channel's maximum over the map (NaN if the map holds NaN)."""
    if not isinstance(fmap, np.ndarray) or fmap.dtype != np.float32:
        raise TypeError("fmap: expected float32")
    if fmap.ndim != 4 or fmap.shape[2] * fmap.shape[3] == 0:
        raise ValueError(f"fmap: expected a non-empty N x C x H x W map, got shape {fmap.shape}")
    _contiguous(fmap, "fmap")
    return fmap.reshape(fmap.shape[0], fmap.shape[1], -1).max(axis=2)


FUSE_METHODS = ("mean", "max", "sum")  # the combine codes 0, 1, 2 of `fuse`


def fuse(
    scores: np.ndarray,
    knots_x: np.ndarray,
    knots_y: np.ndarray,
    slope_lo: np.ndarray,
    slope_hi: np.ndarray,
    combine: int,
) -> np.ndarray:
    """Each head's raw score mapped through its own piecewise-linear curve, then combined over heads.

    Head h's curve runs through the knots (knots_x[h, k], knots_y[h, k]) (x strictly increasing) and goes on
    in straight lines of slope slope_lo[h] below the first and slope_hi[h] above the last knot. `combine`
    picks the mean (0), the maximum (1) or the sum (2) of the mapped scores: M x H -> M.
    """
    scores = _rows(scores, "scores")
    h = scores.shape[1]
    if knots_x.dtype != np.float64 or knots_x.ndim != 2 or knots_x.shape[0] != h or knots_x.shape[1] < 2:
        raise ValueError(f"knots_x: expected float64 shape ({h}, K >= 2)")
    if knots_y.dtype != np.float64 or knots_y.shape != knots_x.shape:
        raise ValueError(f"knots_y: expected float64 shape {knots_x.shape}")
    if any(a.dtype != np.float64 or a.shape != (h,) for a in (slope_lo, slope_hi)):
        raise ValueError(f"slope_lo/slope_hi: expected float64 shape ({h},)")
    for a, name in ((knots_x, "knots_x"), (knots_y, "knots_y"), (slope_lo, "slope_lo"), (slope_hi, "slope_hi")):
        _contiguous(a, name)
    if combine not in (0, 1, 2):
        raise ValueError(f"combine: expected 0 (mean), 1 (max) or 2 (sum), got {combine}")
    s = scores.astype(np.float64)
    mapped = np.empty_like(s)
    for j in range(h):
        x, y = knots_x[j], knots_y[j]
        v = np.interp(s[:, j], x, y)
        v = np.where(s[:, j] < x[0], y[0] + slope_lo[j] * (s[:, j] - x[0]), v)
        v = np.where(s[:, j] > x[-1], y[-1] + slope_hi[j] * (s[:, j] - x[-1]), v)
        mapped[:, j] = np.where(np.isnan(s[:, j]), np.nan, v)
    if h == 0:
        return np.zeros(len(s), np.float32)
    out = (mapped.mean(axis=1), mapped.max(axis=1), mapped.sum(axis=1))[combine]
    return out.astype(np.float32)


LAYOUTS = ("ultralytics", "yolox")  # the layout codes 0, 1 of `decode_boxes`


def decode_boxes(
    raw: np.ndarray, layout: int, n_classes: int, min_score: float, max_candidates: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """A detector's raw output -> its candidate boxes: (M x 4 corners x1 y1 x2 y2, M x C class scores, bad).

    layout 0 (ultralytics, no NMS): (4 + C) x N, rows cx, cy, w, h then one probability per class.
    layout 1 (YOLOX): N x (5 + C), columns cx, cy, w, h, objectness, class probabilities; a class's score is
    objectness x its probability. A candidate is kept when its best class score is at least `min_score`; at
    most `max_candidates`, best first (ties: lower index first). `bad` counts candidates with NaN or inf
    anywhere: they are dropped, and the caller treats a frame with any as an invalid model output.
    """
    if not isinstance(raw, np.ndarray) or raw.dtype != np.float32:
        raise TypeError(f"raw: expected a float32 array, got {getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.ndim != 2:
        raise ValueError(f"raw: expected 2 dimensions, got shape {raw.shape}")
    _contiguous(raw, "raw")
    if layout not in (0, 1):
        raise ValueError(f"layout: expected 0 (ultralytics) or 1 (yolox), got {layout}")
    if n_classes < 1:
        raise ValueError(f"n_classes: at least 1, got {n_classes}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates: at least 1, got {max_candidates}")
    width = 4 + n_classes + layout
    if (raw.shape[0] if layout == 0 else raw.shape[1]) != width:
        raise ValueError(f"raw: layout {LAYOUTS[layout]} with {n_classes} classes needs {width} values per "
                         f"candidate, got shape {raw.shape}")  # fmt: skip
    finite = np.isfinite(raw).all(axis=0 if layout == 0 else 1)
    rows = np.where(finite[:, None], raw.T if layout == 0 else raw, np.float32(0))  # non-finite rows: dropped below
    geo = rows[:, :4]
    scores = rows[:, 4:] if layout == 0 else rows[:, 5:] * rows[:, 4:5]
    best = np.where(finite, scores.max(axis=1, initial=-np.inf), -np.inf)
    keep = np.flatnonzero(finite & (best >= np.float32(min_score)))
    keep = keep[np.argsort(-best[keep], kind="stable")][:max_candidates]
    half = geo[keep, 2:4] * np.float32(0.5)
    boxes = np.concatenate([geo[keep, :2] - half, geo[keep, :2] + half], axis=1).astype(np.float32)
    return boxes, np.ascontiguousarray(scores[keep], np.float32), int((~finite).sum())


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware greedy non-maximum suppression: indices of the candidates kept, best first.

    A candidate's class is its best class score's (the first, on ties); candidates are visited best first
    (ties: lower index first) and one is dropped when a kept candidate of its class overlaps it with IoU above
    `iou_threshold` (IoU in float64 of the float32 corners; boxes with no area overlap nothing). Rows with NaN
    or inf are never kept.
    """
    boxes = _rows(boxes, "boxes", 4)
    scores = _rows(scores, "scores")
    if len(scores) != len(boxes):
        raise ValueError(f"scores: {len(scores)} rows for {len(boxes)} boxes")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected 0..1, got {iou_threshold}")
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores).all(axis=1)
    if not finite.any() or not scores.shape[1]:
        return np.zeros(0, np.int64)
    cls = np.where(finite[:, None], scores, 0).argmax(axis=1)
    order = np.flatnonzero(finite)
    order = order[np.argsort(-scores[order].max(axis=1), kind="stable")]
    b = np.where(finite[:, None], boxes, 0).astype(np.float64)  # non-finite rows are never visited
    area = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    kept: list[int] = []
    for i in order:
        same = [j for j in kept if cls[j] == cls[i]]
        if same:
            j = np.array(same)
            w = np.maximum(np.minimum(b[j, 2], b[i, 2]) - np.maximum(b[j, 0], b[i, 0]), 0.0)
            h = np.maximum(np.minimum(b[j, 3], b[i, 3]) - np.maximum(b[j, 1], b[i, 1]), 0.0)
            inter = w * h
            union = area[j] + area[i] - inter
            iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
            if (iou > iou_threshold).any():
                continue
        kept.append(int(i))
    return np.array(kept, np.int64)
