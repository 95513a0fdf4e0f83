"""Real inspection data: the magnetic-tile defect set (../shared). Splits are seeded; thresholds come from
calibration data only. The guard must beat softmax >= 0.9 and last-layer Mahalanobis at equal coverage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import REPO, run_cli

TILE = Path(os.environ.get("BOUNCER_MAGNETIC_TILE", REPO.parent / "shared" / "datasets" / "magnetic-tile"))

pytestmark = pytest.mark.skipif(
    not TILE.is_dir(), reason=f"magnetic-tile data set not found at {TILE} (set BOUNCER_MAGNETIC_TILE)"
)


@pytest.fixture(scope="module")
def results(built_models, tmp_path_factory, bouncer_home) -> dict:
    work = tmp_path_factory.mktemp("bench_gates")
    res = run_cli("bench", "gates", "--magnetic-tile", str(TILE), "--work", str(work))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])["gates"]
    return {r["scenario"]: r for r in rows}


@pytest.mark.parametrize("scenario", ["magnetic_tile", "magnetic_tile_one_class"])
def test_guard_beats_both_baselines_at_equal_coverage(results, scenario):
    r = results[scenario]
    for c in ("0.500", "0.700"):
        guard = r[f"guard_error_at_{c}"]
        assert guard < r[f"softmax_0.9_error_at_{c}"], (c, r)
        assert guard < r[f"last_layer_mahalanobis_error_at_{c}"], (c, r)
    assert r["unknown_auroc"] > r["unknown_auroc_last_layer_mahalanobis"]
    assert r["foreign_auroc"] >= 0.99
    assert r["garbage_accepted"] == 0


def test_multi_class_guard_refuses_to_pretend(results):
    """No threshold reaches 99% accuracy on the tiles' calibration set: the guard accepts nothing rather
    than promise what the data cannot support."""
    r = results["magnetic_tile"]
    assert r["guard_clean_coverage"] == 0.0 and r["guard_accepted_error"] == 0.0


def test_simulator_row_meets_the_bar(results):
    r = results["simulator"]
    assert r["guard_accepted_error"] <= 0.01 and r["guard_clean_coverage"] >= 0.9
    assert r["unknown_auroc"] >= 0.99 and r["ece"] < 0.02 and r["garbage_accepted"] == 0
