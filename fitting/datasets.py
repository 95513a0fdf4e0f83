"""Deterministic splits of an ImageFolder data set into train / calib / test and held-out classes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bouncer.runtime.errors import BouncerError
from bouncer.runtime.images import image_folder

SPLITS = ("train", "calib", "test")


def split_dataset(
    root: Path,
    out: Path,
    known: Sequence[str],
    unknown: Sequence[str] = (),
    fractions: tuple[float, float, float] = (0.4, 0.35, 0.25),
    seed: int = 0,
    copy: bool = False,
) -> dict[str, dict[str, int]]:
    """OUT/{train,calib,test}/CLASS for known classes, OUT/unknown/CLASS for held-out ones.

    Files are linked (or copied), never moved; the same seed always gives the same split.
    """
    folders = image_folder(root)
    missing = [c for c in (*known, *unknown) if c not in folders]
    if missing:
        raise BouncerError(f"{root}: no class folder(s) {', '.join(missing)} (has: {', '.join(folders)})")
    if set(known) & set(unknown):
        raise BouncerError("a class cannot be both known and unknown")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise BouncerError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    if out.exists() and any(out.iterdir()):
        raise BouncerError(f"{out}: exists and is not empty")
    place = shutil.copy2 if copy else (lambda src, dst: os.symlink(Path(src).resolve(), dst))
    counts: dict[str, dict[str, int]] = {s: {} for s in (*SPLITS, "unknown")}
    for k, cls in enumerate(sorted(known)):
        files = folders[cls]
        order = np.random.default_rng([seed, k]).permutation(len(files))
        cut1 = round(fractions[0] * len(files))
        cut2 = cut1 + round(fractions[1] * len(files))
        for split, idx in zip(SPLITS, (order[:cut1], order[cut1:cut2], order[cut2:]), strict=True):
            d = out / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in idx:
                place(files[i], d / files[i].name)
            counts[split][cls] = len(idx)
    for cls in unknown:
        d = out / "unknown" / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in folders[cls]:
            place(f, d / f.name)
        counts["unknown"][cls] = len(folders[cls])
    return counts
