"""`bouncer bench tiles`: whole-frame heads against tile heads on large frames with small defects, one run.

Three one-class lines of frames much larger than the backbone input, each with defects that fill a small part of
the frame: the simulator's washers seen at 960 x 720 with dark pits 8-14 px across; EL module strips of 2 x 4
polycrystalline solar cells (elpv, 1200 x 600) where one cell is defective; mosaics of 2 x 4 magnetic tiles
(1200 x 600) where one shows a blowhole. Cells of the training, calibration and test frames come from disjoint
pools of the real images. Each line is fitted twice with the defaults, `--tiles off` and `--tiles auto`, and
scored on held-out good and defective frames: catch, good frames flagged, AUROC of the fused score, time per
frame.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bouncer.fitting.fit import fit_gate
from bouncer.fitting.select import auroc
from bouncer.runtime import backends
from bouncer.runtime.gates.decision import Verdict
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.images import read_bgr
from bouncer.sim import simulator

COUNTS = {"train": 150, "calib": 250, "test": 100, "defect": 100}


def _washers(root: Path) -> None:
    def big(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (960, 720), interpolation=cv2.INTER_CUBIC)

    for k, (split, n) in enumerate(COUNTS.items()):
        d = root / split / "good"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([7, k])
        for i in range(n):
            img = big(simulator.render("washer", rng))
            if split == "defect":
                mask = np.zeros(img.shape[:2], np.float32)
                centre = (int(rng.uniform(0.3, 0.7) * 960), int(rng.uniform(0.3, 0.7) * 720))
                cv2.circle(mask, centre, int(rng.integers(4, 8)), 1.0, -1, cv2.LINE_AA)
                img = np.clip(img - 70 * mask[..., None], 0, 255).astype(np.uint8)
            cv2.imwrite(str(d / f"{i:04d}.png"), img)


def _mosaics(root: Path, good: list[Path], bad: list[Path]) -> None:
    """2 x 4 cells of 300 x 300 per frame; a defect frame has one cell from `bad`."""
    rng = random.Random(0)
    good, bad = sorted(good), sorted(bad)
    rng.shuffle(good)
    rng.shuffle(bad)
    n = len(good)
    pools = {"train": good[: int(0.4 * n)], "calib": good[int(0.4 * n) : int(0.7 * n)], "test": good[int(0.7 * n) :]}
    pools["defect"] = pools["test"]

    def cell(p: Path) -> np.ndarray:
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise SystemExit(f"bench tiles: cannot read {p}")
        return cv2.resize(img, (300, 300), interpolation=cv2.INTER_AREA)

    for split, count in COUNTS.items():
        d = root / split / "good"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(min(count, len(bad)) if split == "defect" else count):
            cells = [cell(p) for p in rng.sample(pools[split], 8)]
            if split == "defect":
                cells[rng.randrange(8)] = cell(bad[i])
            cv2.imwrite(str(d / f"{i:04d}.png"), np.vstack([np.hstack(cells[:4]), np.hstack(cells[4:])]))


def _score(guard: Guard, folder: Path) -> tuple[np.ndarray, np.ndarray, float]:
    flagged, scores, spent = [], [], 0.0
    for p in sorted(folder.rglob("*.png")):
        img = read_bgr(p)
        t0 = time.perf_counter()
        d, _, _ = guard.score_frame(img)
        spent += time.perf_counter() - t0
        flagged.append(d.decision != Verdict.ACCEPT)
        scores.append(d.ood_score if d.ood_score is not None else np.inf)
    return np.array(flagged), np.array(scores, np.float64), spent / max(len(flagged), 1)


def bench_tiles(model: Path, elpv: Path | None, tile: Path | None, work: Path | None, log) -> dict[str, Any]:
    backend = backends.load(model, 2)
    base = work or Path(tempfile.mkdtemp(prefix="bouncer-bench-tiles-"))
    lines: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {"simulator washers 960x720, pits": (_washers, ())}
    if elpv is not None:
        lines["elpv strips 1200x600, one defective cell"] = (
            _mosaics, (list((elpv / "poly_ok").glob("*.jpg")), list((elpv / "poly_defective").glob("*.jpg")))
        )  # fmt: skip
    if tile is not None:
        lines["magnetic-tile mosaics 1200x600, one blowhole"] = (
            _mosaics, (list((tile / "free").glob("*.jpg")), list((tile / "blowhole").glob("*.jpg")))
        )  # fmt: skip
    results: dict[str, Any] = {}
    for name, (make, args) in lines.items():
        root = base / name.split()[0].replace("-", "_")
        if not (root / "defect").exists():
            make(root, *args)
        for tiles in ("off", "auto"):
            log(f"{name}: fitting with --tiles {tiles}")
            bundle = fit_gate(backend, root / "train", root / "calib", version=f"{name}-{tiles}", log=log, tiles=tiles)
            guard = Guard(bundle, backend)
            good_f, good_s, ms_good = _score(guard, root / "test")
            bad_f, bad_s, ms_bad = _score(guard, root / "defect")
            results[f"{name} | {tiles}"] = {
                "heads": bundle.fusion.names,
                "tiling": None if bundle.tiling is None else str(bundle.tiling),
                "catch": round(float(bad_f.mean()), 3),
                "good_flagged": round(float(good_f.mean()), 3),
                "auroc": round(auroc(bad_s[np.isfinite(bad_s)], good_s[np.isfinite(good_s)]), 3),
                "ms_per_frame": round((ms_good + ms_bad) * 500, 1),
                "frames": {"good": len(good_f), "defective": len(bad_f)},
            }
    return results


def print_tiles(results: dict[str, Any]) -> None:
    print("| line | --tiles | heads chosen | catch | good flagged | AUROC | ms per frame |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        line, tiles = key.split(" | ")
        grid = f"{tiles} ({r['tiling']})" if r["tiling"] else tiles
        print(f"| {line} | {grid} | {', '.join(r['heads'])} | {r['catch']:.3f} | {r['good_flagged']:.3f} | "
              f"{r['auroc']:.3f} | {r['ms_per_frame']} |")  # fmt: skip
    print(json.dumps({"tiles": results}))
