"""Real lines (../shared): the quality gate fitted on a line's own frames passes (nearly) all of them, on the
magnetic tiles (flat backgrounds, sizes from 100 to 450 px) and the solar cells (dark busbars, cracks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REPO

from bouncer.runtime.gates.quality import QualityGate, quality_stats
from bouncer.runtime.images import image_folder, read_bgr

SHARED = REPO.parent / "shared" / "datasets"
SETS = {
    "magnetic-tile": Path(os.environ.get("BOUNCER_MAGNETIC_TILE", SHARED / "magnetic-tile")),
    "elpv": Path(os.environ.get("BOUNCER_ELPV", SHARED / "elpv")),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_bounds_contain_the_lines_own_frames(name):
    root = SETS[name]
    if not root.is_dir():
        pytest.skip(f"{name} data set not found at {root}")
    paths = [p for ps in image_folder(root).values() for p in sorted(ps)[::3]]  # a third of every class
    stats = [quality_stats(read_bgr(p))[0] for p in paths]
    gate = QualityGate.fit(stats)
    flagged = [p.name for p, s in zip(paths, stats, strict=True) if gate.check(s)]
    assert len(flagged) <= 0.01 * len(paths), (len(flagged), len(paths), flagged[:10])
