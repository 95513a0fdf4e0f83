"""The production-line simulator is deterministic and writes ImageFolder data sets."""

from __future__ import annotations

import itertools
import json

import numpy as np
from helpers import run_cli

from bouncer.runtime.images import image_folder
from bouncer.sim import simulator


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


def test_the_incident_line_is_deterministic_with_ground_truth(tmp_path):
    from bouncer.runtime.sources.streams import open_source
    from bouncer.sim import incidents

    plan = incidents.schedule(warmup=20, frames=560)
    a = list(incidents.line(5, 560, warmup=20))
    b = list(incidents.line(5, 560, warmup=20))
    assert all(np.array_equal(x.frame, y.frame) and x.truth == y.truth for x, y in zip(a, b, strict=True))
    for inc in plan:
        truths = {f.truth for f in a[inc.start : inc.start + inc.length]}
        assert truths == {inc.kind}, inc
    frozen = next(p for p in plan if p.kind == "frozen")
    assert all(np.array_equal(a[i].frame, a[frozen.start - 1].frame) for i in range(frozen.start, frozen.start + 30))
    cap = next(p for p in plan if p.kind == "lens_cap")
    assert a[cap.start].frame.mean() < 10
    assert sum(f.truth is None for f in a) == plan[0].start + sum(
        nxt.start - (p.start + p.length) for p, nxt in itertools.pairwise(plan)
    )
    bulb = plan[-1]
    assert bulb.kind == "light_bulb" and bulb.start + bulb.length == 560
    src = open_source("line:5:560:20")
    items = list(src)
    assert src.finite and len(items) == 560 and items[frozen.start].truth == "frozen"
    res = run_cli("sim", "line", "--out", str(tmp_path / "l"), "--frames", "560", "--warmup", "20", "--seed", "5")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "l" / "truth.jsonl").read_text().splitlines()]
    assert len(rows) == 560 and rows[frozen.start]["incident"] == "frozen"
    assert run_cli("run", "--source", "line:x", "--gate", "g", "--device-id", "d").returncode == 2
