"""Explanations: the heatmap points at what is unusual, travels with flagged (and audit-sampled) frames,
and `bouncer score --explain` writes overlays."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
from helpers import run_cli

from bouncer.devices.loop import Device
from bouncer.runtime import backends, schemas
from bouncer.runtime.config import load_config
from bouncer.runtime.gates import explain
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.gates.heads import frame_vectors
from bouncer.runtime.outbox import Outbox
from bouncer.sim import simulator


@pytest.fixture(scope="module")
def guard(sim_gate, built_models) -> Guard:
    return Guard(GateBundle.load(sim_gate), backends.load(built_models["onnx_int8"]))


def test_the_heatmap_points_at_a_foreign_blob(guard):
    rng = np.random.default_rng(11)
    hits = 0
    for trial, (y, x) in enumerate([(30, 30), (190, 260), (40, 270), (200, 50), (120, 290), (30, 160)]):
        frame = simulator.render(simulator.KNOWN_CLASSES[trial % 4], rng)
        cv2.circle(frame, (x, y), 18, (240, 240, 250), -1)
        decision, outputs, _ = guard.score_frame(frame)
        assert "ood" in decision.reasons
        heat = explain.heatmap(guard.bundle, outputs)
        # what the device does: the maxima come from the vectors the flagged frame carries, not taken twice
        shared = explain.heatmap(guard.bundle, outputs, frame_vectors(guard.backend.card, outputs))
        np.testing.assert_array_equal(shared, heat)
        assert heat.shape == (14, 14) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == 1.0
        py, px = np.unravel_index(int(heat.argmax()), heat.shape)
        cy, cx = (py + 0.5) * 240 / 14, (px + 0.5) * 320 / 14
        hits += abs(cy - y) < 50 and abs(cx - x) < 60
    assert hits >= 5, f"the hottest cell was on the blob in {hits} of 6 frames"
    png = explain.heatmap_png(heat)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 4000
    assert explain.overlay(frame, heat).shape == frame.shape


def test_no_heatmap_without_a_spatial_head(guard):
    heads = [h for h in guard.bundle.ood_heads if getattr(h, "reduce", None) != "max"]
    flat = dataclasses.replace(guard.bundle, ood_heads=heads, explainer=None)
    frame = simulator.render("gear", np.random.default_rng(1))
    _, outputs, _ = guard.score_frame(frame)
    assert explain.heatmap(flat, outputs) is None


def test_score_explain_writes_overlays_of_flagged_frames(sim_gate, tmp_path, built_models):
    data = simulator.write_dataset(tmp_path / "d", ("gear", "giraffe"), per_class=2, seed=4)
    res = run_cli("score", "--gate", str(sim_gate), "--jsonl", str(tmp_path / "o.jsonl"), "--explain",
                  str(tmp_path / "ex"), str(data))  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    for r in rows:
        if r["decision"] == "accept":
            assert r["explain"] is None
        else:
            img = cv2.imread(r["explain"])
            assert img is not None and img.shape == (240, 320, 3)
    assert sum(r["explain"] is not None for r in rows) >= 2  # the giraffes


def test_flagged_frames_carry_heatmaps_and_accepted_ones_are_sampled_for_audit(sim_gate, tmp_path, built_models):
    frames = simulator.write_dataset(tmp_path / "f", ("gear", "washer", "giraffe"), per_class=4, seed=8)
    overrides = {"device.id": "cam-x", "device.data_dir": str(tmp_path / "dev"), "source.uri": str(frames),
                 "gate.bundle": str(sim_gate), "outbox.audit_rate": 1.0}  # fmt: skip
    cfg = load_config(None, overrides)
    summary = Device(cfg).run(once=True, handle_signals=False)
    box = Outbox(tmp_path / "dev" / "outbox.sqlite")
    frames = [p for p in box.pending(limit=1000) if p.kind in ("accept", "review", "reject")]  # not events, alerts
    msgs = [schemas.FrameMessage.decode(p.payload) for p in frames]
    box.close()
    assert len(msgs) == summary.frames == 12, "audit rate 1: every accepted frame is sent too"
    audits = [m for m in msgs if m.audit]
    assert len(audits) == summary.decisions["accept"] and all(m.decision == "accept" for m in audits)
    assert all(m.heatmap and m.heatmap[:4] == b"\x89PNG" for m in msgs)
    giraffes = [m for m in msgs if "giraffe" in (m.source or "")]
    assert giraffes and all(not m.audit and "ood" in m.reasons for m in giraffes)
    assert all(d["reason"] == "ood" and d["value"] > d["threshold"] for m in giraffes for d in m.details
               if d["reason"] == "ood")  # fmt: skip


def test_a_per_cell_head_explains_with_its_own_distances(guard):
    """A gate with a per-cell head and no explainer (a detector gate's) shows each cell's distance to the training
    cells: the hottest cell lies on a foreign blob."""
    from bouncer.runtime.gates.heads import GaussianHead, patches
    from bouncer.runtime.preprocess import preprocess

    rng = np.random.default_rng(5)
    pp = guard.bundle.preprocessing
    maps = [guard.backend.run(preprocess(simulator.render(simulator.KNOWN_CLASSES[i % 4], rng), pp))["map_s16"]
            for i in range(40)]  # fmt: skip
    cells = GaussianHead.fit("map_s16", patches(np.concatenate(maps)), None, spatial=True)
    bundle = dataclasses.replace(guard.bundle, ood_heads=[cells], explainer=None)
    hits = 0
    for trial, (y, x) in enumerate([(30, 30), (190, 260), (40, 270), (200, 50), (120, 290), (30, 160)]):
        frame = simulator.render(simulator.KNOWN_CLASSES[trial % 4], rng)
        cv2.circle(frame, (x, y), 18, (240, 240, 250), -1)
        outputs = guard.backend.run(preprocess(frame, pp))
        heat = explain.heatmap(bundle, outputs)
        assert heat.shape == (14, 14) and heat.dtype == np.float32 and heat.min() == 0.0 and heat.max() == 1.0
        py, px = np.unravel_index(int(heat.argmax()), heat.shape)
        cy, cx = (py + 0.5) * 240 / 14, (px + 0.5) * 320 / 14
        hits += abs(cy - y) < 50 and abs(cx - x) < 60
    assert hits >= 5, f"the hottest cell was on the blob in {hits} of 6 frames"
