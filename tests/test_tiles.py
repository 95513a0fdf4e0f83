"""Tiled scoring for small defects on large frames: the grid covers every frame, a tile head scores the frame by
its most unusual tile and points at it, a tiled gate travels in its bundle, and bad tile settings are one clear
line each."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.gates.heads import KnnHead, fit_head, head_input, input_key, l2n, load_head, parse_head
from bouncer.runtime.tiles import Tiling, auto_tiling, parse_tiles, resolve_tiling


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(2, 1300), st.integers(2, 900), st.sampled_from([0, 0.25, 0.5]))
def test_the_tiles_cover_the_frame_inside_it_with_their_overlap(rows, cols, w, h, overlap):
    if rows * cols < 2:
        return
    t = Tiling(rows, cols, overlap)
    rects = t.rects(w, h)
    assert len(rects) == t.count
    seen = np.zeros((h, w), np.int32)
    for x1, y1, x2, y2 in rects:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        seen[y1:y2, x1:x2] += 1
    assert seen.min() >= 1  # every pixel is in a tile
    assert len({(x2 - x1, y2 - y1) for x1, y1, x2, y2 in rects}) == 1  # one tile size: one backbone input scale
    if cols > 1 and w >= 4 * cols:  # neighbours share about `overlap` of a tile
        (a, _, b, _), (c, _, _, _) = rects[0], rects[1]
        assert b - c >= int(overlap * (b - a)) - 1
    frame = np.zeros((h, w, 3), np.uint8)
    assert [c.shape[:2] for c in t.crops(frame)] == [(y2 - y1, x2 - x1) for x1, y1, x2, y2 in rects]


def test_auto_tiles_only_frames_much_larger_than_the_input():
    assert auto_tiling(400, 300, 224, 224) is None  # 1.3 x 1.8: the whole frame loses little
    assert auto_tiling(1000, 440, 224, 224) is None  # a short side under twice the input
    assert auto_tiling(640, 480, 224, 224) == Tiling(2, 3)
    grid = auto_tiling(1130, 460, 224, 224)  # the machined-surface frames of the issue
    assert grid == Tiling(2, 5)
    x1, y1, x2, y2 = grid.rects(1130, 460)[0]
    assert (x2 - x1) <= 1.5 * 224 and (y2 - y1) <= 1.5 * 224  # each tile shrunk by at most 1.5x
    assert resolve_tiling("off", [(1130, 460)], 224, 224) is None
    assert resolve_tiling("auto", [(1130, 460), (1130, 460), (1000, 400)], 224, 224) == Tiling(2, 5)
    assert resolve_tiling("2x3", [(900, 700)], 224, 224) == Tiling(2, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2x", "expected auto, off or ROWSxCOLS"),
        ("tiles", "expected auto, off or ROWSxCOLS"),
        ("1x1", "at least two tiles"),
        ("0x4", "at least two tiles"),
        ("9x9", "at most 64 tiles"),
    ],
)
def test_bad_tile_settings_are_named(spec, message):
    with pytest.raises(BouncerError, match=message):
        parse_tiles(spec)
    with pytest.raises(BouncerError, match="smaller than half the backbone input"):
        resolve_tiling("6x6", [(320, 240)], 224, 224)


def _tile_vectors(rng: np.random.Generator, n: int, tiles: int, defect: bool) -> np.ndarray:
    x = rng.normal(0, 0.2, (n, tiles, 32)).astype(np.float32) + 1.0
    if defect:  # one tile per frame looks unlike any good tile
        for i in range(n):
            x[i, rng.integers(tiles), :6] += 3.0
    return x


def test_a_tile_head_scores_the_frame_by_its_most_unusual_tile():
    rng = np.random.default_rng(5)
    train, good, bad = (_tile_vectors(rng, n, 8, d) for n, d in ((80, False), (50, False), (50, True)))
    spec = "knn:pool_s32b@tiles"
    assert parse_head(spec) == ("knn", "pool_s32b", "tiles") and input_key(spec) == "pool_s32b@tiles"
    head = fit_head(spec, head_input(input_key(spec), {"tiles:pool_s32b": train}), np.zeros(80))
    assert isinstance(head, KnnHead) and head.reduce == "tiles" and head.bank.shape == (640, 32)
    # the reference: 1 - the best cosine of each tile to the bank, the frame's worst tile
    ref = (1 - np.einsum("ntd,md->ntm", l2n(bad), l2n(train.reshape(-1, 32))).max(2)).max(1)
    np.testing.assert_allclose(head.score_vectors(bad), ref, atol=2e-3)  # the bank is fp16
    assert head.score_vectors(bad).min() > head.score_vectors(good).max()
    # the guard's scorer reads the same from a backbone's outputs
    np.testing.assert_array_equal(head.scorer()({"tiles:pool_s32b": bad}), head.score_vectors(bad))
    again = load_head(head.meta(), head.arrays("ood0"), "ood0")
    np.testing.assert_array_equal(again.score_vectors(bad), head.score_vectors(bad))
    with pytest.raises(BouncerError, match="was not tiled"):
        head_input("pool_s32b@tiles", {"pool_s32b": bad[:, 0]})


# ---- a tiled gate end to end, through the CLI, on the real int8 backbone ------------------------------------


def _large_line(root, seed: int, n: int, pits: bool = False):
    """The simulator's washers seen by a high-resolution camera (960 x 720); `pits`: a dark pit 8-14 px across,
    made differently from fit's synthetic defects, whose centre the file name records."""
    from bouncer.sim import simulator

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = cv2.resize(simulator.render("washer", rng), (960, 720), interpolation=cv2.INTER_CUBIC)
        name = f"{i:03d}"
        if pits:
            cx, cy = int(rng.uniform(0.3, 0.7) * 960), int(rng.uniform(0.3, 0.7) * 720)
            mask = np.zeros((720, 960), np.float32)
            cv2.circle(mask, (cx, cy), int(rng.integers(4, 8)), 1.0, -1, cv2.LINE_AA)
            img = np.clip(img - 70 * mask[..., None], 0, 255).astype(np.uint8)
            name += f"_{cx}_{cy}"
        cv2.imwrite(str(root / f"{name}.png"), img)


@pytest.fixture(scope="module")
def tiled_line(built_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    _large_line(root / "train" / "good", 1, 40)
    _large_line(root / "calib" / "good", 2, 60)
    _large_line(root / "test" / "good", 3, 20)
    _large_line(root / "pits", 4, 20, pits=True)
    return root


def test_a_tiled_gate_points_at_the_pit_and_costs_what_it_says(tiled_line, tmp_path):
    from bouncer.runtime.gates.bundle import BundleError, GateBundle

    gate = tmp_path / "tiled.gate"
    fit = ["fit", "--train", str(tiled_line / "train"), "--calib", str(tiled_line / "calib"), "--out", str(gate),
           "--target-accuracy", "0.95", "--tiles", "auto", "--heads", "knn:pool_s32b@tiles"]  # fmt: skip
    res = run_cli(*fit)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cost: tiles 3x4 (12 tiles): 13 backbone calls per frame" in res.stdout, res.stdout
    bundle = GateBundle.load(gate)
    assert bundle.tiling == Tiling(3, 4) and [h.input_key for h in bundle.ood_heads] == ["pool_s32b@tiles"]

    out = tmp_path / "scores.jsonl"
    res = run_cli("score", "--gate", str(gate), "--jsonl", str(out), str(tiled_line / "test"), str(tiled_line / "pits"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = [r for r in rows if "/test/" in r["path"]]
    pits = [r for r in rows if "/pits/" in r["path"]]
    assert len(good) == 20 and len(pits) == 20
    assert np.median([r["ood_score"] for r in pits]) > np.median([r["ood_score"] for r in good])
    flagged = [r for r in pits if "ood" in r["reasons"]]
    assert len(flagged) >= 5, [r["ood_score"] for r in pits]
    inside = 0
    for r in flagged:
        x1, y1, x2, y2 = next(d["tile"] for d in r["details"] if d["reason"] == "ood")
        cx, cy = map(int, r["path"].rsplit("/", 1)[1][:-4].split("_")[1:])
        inside += x1 <= cx < x2 and y1 <= cy < y2
    print(f"tiled gate: {len(flagged)} of 20 pitted frames flagged, the worst tile holds the pit in {inside}")
    assert inside >= 0.8 * len(flagged)

    # an OTA trial decides the old gate on the new one's outputs: a tiled gate runs its tiles from the frame
    from bouncer.cli.main import _fit_backend
    from bouncer.runtime.gates.guard import Guard
    from bouncer.runtime.images import read_bgr

    guard = Guard(bundle, _fit_backend(None, None, 1))
    frame = read_bgr(flagged[0]["path"])
    d, outputs, _ = guard.score_frame(frame)
    assert outputs is not None and "tiles:pool_s32b" in outputs
    whole = {k: v for k, v in outputs.items() if not k.startswith("tiles:")}
    again = guard.decide_outputs(d.quality, whole, (960, 720), frame=frame)
    assert again.decision == d.decision and again.ood_score == pytest.approx(d.ood_score, abs=1e-5)
    with pytest.raises(BundleError, match="needs the frame"):
        guard.decide_outputs(d.quality, whole, (960, 720))


def test_large_frames_get_a_hint_and_bad_tile_settings_one_line(tiled_line, tmp_path):
    base = ["fit", "--train", str(tiled_line / "train"), "--calib", str(tiled_line / "calib"), "--out",
            str(tmp_path / "g.gate"), "--target-accuracy", "0.95"]  # fmt: skip
    res = run_cli(*base, "--tiles", "off", "--heads", "knn:pool_s32b@tiles")
    assert res.returncode != 0 and "tile heads (@tiles) need a tiling" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(*base, "--tiles", "12x12")
    assert res.returncode != 0 and "at most 64 tiles" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(*base, "--tiles", "9x7")
    assert res.returncode != 0 and "smaller than half the backbone input" in res.stderr, res.stderr[-2000:]
    res = run_cli(*base, "--heads", "knn:pool_s32b")  # the default, untiled, on frames 4x the input
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--tiles auto makes tile heads (3x4) candidates" in res.stderr
