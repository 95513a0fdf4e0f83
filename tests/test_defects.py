"""Synthetic defects: local, seeded, and invisible to the quality gate (only the OOD heads may catch them)."""

from __future__ import annotations

import numpy as np
import pytest

from bouncer.fitting.defects import DEFECTS, synthesize
from bouncer.runtime.gates.quality import QualityGate, quality_stats
from bouncer.sim import simulator


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(5)
    return [simulator.render(simulator.KNOWN_CLASSES[i % 4], rng) for i in range(60)]


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_each_defect_is_local_and_keeps_the_frame_usable(frames, name):
    gate = QualityGate.fit([quality_stats(f)[0] for f in frames])
    rng = np.random.default_rng(0)
    changed, flagged = [], 0
    for f in frames[:30]:
        d = DEFECTS[name](f, rng)
        assert d.shape == f.shape and d.dtype == np.uint8
        moved = np.abs(d.astype(int) - f.astype(int)).max(axis=2) > 0
        changed.append(moved.mean())
        flagged += bool(gate.check(quality_stats(d)[0]))
    assert 0.0005 < np.median(changed) < 0.3, changed  # something changed, and only a part of the frame
    assert flagged <= 3  # the quality gate passes (nearly) all of them


def test_defects_are_deterministic_from_the_seed(frames):
    a = [synthesize(f, np.random.default_rng(7)) for f in frames[:5]]
    b = [synthesize(f, np.random.default_rng(7)) for f in frames[:5]]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
