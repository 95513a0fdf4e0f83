"""Calibration images: read, preprocess and split (deterministically) into calibration and held-out sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bouncer.runtime.errors import BouncerError, ImageError
from bouncer.runtime.images import list_images, read_bgr
from bouncer.runtime.preprocess import Preprocessing, preprocess


def load_calibration(
    folder: Path, pp: Preprocessing, limit: int = 300, holdout: float = 0.2, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Preprocessed (calibration, held-out) inputs. Unreadable images are errors: calibration data must be clean."""
    files = list_images(folder)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))[:limit]
    batches = []
    for i in order:
        try:
            batches.append(preprocess(read_bgr(files[i]), pp))
        except ImageError as exc:
            raise BouncerError(f"calibration folder {folder}: {exc}") from None
    if len(batches) < 2:
        raise BouncerError(f"{folder}: need at least 2 calibration images, found {len(batches)}")
    n_hold = max(1, min(round(len(batches) * holdout), 100))
    return batches[n_hold:], batches[:n_hold]
