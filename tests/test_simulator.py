"""The production-line simulator is deterministic and writes ImageFolder data sets."""

from __future__ import annotations

import numpy as np

from bouncer.runtime.images import image_folder
from bouncer.runtime.sources import simulator


def test_deterministic_from_seed():
    a = simulator.render("gear", np.random.default_rng(3))
    b = simulator.render("gear", np.random.default_rng(3))
    c = simulator.render("gear", np.random.default_rng(4))
    assert a.shape == (simulator.FRAME_H, simulator.FRAME_W, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_parts_differ_from_each_other():
    rng = np.random.default_rng(0)
    scene = simulator.random_scene(rng)
    frames = {p: simulator.render(p, np.random.default_rng(1), scene).astype(np.float32) for p in simulator.PARTS}
    names = list(frames)
    for i, p in enumerate(names):
        for q in names[i + 1 :]:
            assert np.abs(frames[p] - frames[q]).mean() > 3.0, (p, q)


def test_write_dataset_layout(tmp_path):
    simulator.write_dataset(tmp_path, ("washer", "bolt"), per_class=3, seed=1)
    folders = image_folder(tmp_path)
    assert {k: len(v) for k, v in folders.items()} == {"bolt": 3, "washer": 3}
