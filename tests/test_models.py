"""The built backbones: named outputs, metadata, size, and agreement across precisions and runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from bouncer.bench.backbone import held_out_frames
from bouncer.quantize.report import cosine_rows
from bouncer.runtime import backends
from bouncer.runtime.preprocess import preprocess

TAPS = ("pool_s2", "pool_s4", "pool_s8", "pool_s16a", "pool_s16", "pool_s32", "pool_s32b")
FEATURE_OUTPUTS = ("features", *TAPS, "map_s8", "map_s16")
SHAPES = {
    "logits": (1, 1000),
    "features": (1, 1280),
    "pool_s2": (1, 16),
    "pool_s4": (1, 24),
    "pool_s8": (1, 40),
    "pool_s16a": (1, 80),
    "pool_s16": (1, 112),
    "pool_s32": (1, 192),
    "pool_s32b": (1, 320),
    "map_s8": (1, 40, 28, 28),
    "map_s16": (1, 112, 14, 14),
}


@pytest.fixture(scope="module")
def held_out(built_models):
    b = backends.load(built_models["onnx_fp32"])
    return [preprocess(f, b.card.preprocessing) for f in held_out_frames(16)]


def outputs(path, inputs):
    m = backends.load(path)
    runs = [m.run(x) for x in inputs]
    return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}


@pytest.mark.parametrize("kind", ["onnx_fp32", "onnx_int8", "tflite_fp32", "tflite_int8", "tflite_int8io"])
def test_named_outputs_and_card(built_models, held_out, kind):
    m = backends.load(built_models[kind])
    out = m.run(held_out[0])
    assert {k: v.shape for k, v in out.items()} == SHAPES
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    card = m.card
    assert card.taps == TAPS and card.maps == ("map_s8", "map_s16")
    assert card.preprocessing.height == 224 and card.preprocessing.mean == (127.0,) * 3
    assert len(card.model_hash) == 64


def test_hashes_identify_each_model(built_models):
    hashes = {k: backends.load(p).card.model_hash for k, p in built_models.items()}
    assert len(set(hashes.values())) == len(hashes)
    # the hash is stable: loading twice gives the same identity
    assert backends.load(built_models["onnx_int8"]).card.model_hash == hashes["onnx_int8"]


def test_int8_onnx_is_small(built_models):
    assert built_models["onnx_int8"].stat().st_size <= 6_000_000
    assert built_models["onnx_fp32"].stat().st_size > 3 * built_models["onnx_int8"].stat().st_size


def test_int8_features_stay_close_to_fp32(built_models, held_out):
    ref, q = outputs(built_models["onnx_fp32"], held_out), outputs(built_models["onnx_int8"], held_out)
    for name in FEATURE_OUTPUTS:
        assert np.median(cosine_rows(ref[name], q[name])) >= 0.97, name


@pytest.mark.parametrize(
    "onnx_kind,tflite_kind,floor",
    [("onnx_fp32", "tflite_fp32", 0.999), ("onnx_int8", "tflite_int8", 0.95), ("onnx_int8", "tflite_int8io", 0.95)],
)
def test_runtimes_agree(built_models, held_out, onnx_kind, tflite_kind, floor):
    a, b = outputs(built_models[onnx_kind], held_out), outputs(built_models[tflite_kind], held_out)
    for name in SHAPES:
        assert cosine_rows(a[name], b[name]).min() >= floor, name


def test_tflite_card_maps_renamed_outputs(built_models):
    card = json.loads(
        (built_models["tflite_int8"].parent / (built_models["tflite_int8"].name + ".card.json")).read_text()
    )
    assert set(card["tensors"]) == set(SHAPES)
    assert len(set(card["tensors"].values())) == len(SHAPES)


def test_batch_of_several_frames(built_models, held_out):
    batch = np.concatenate(held_out[:3])
    for kind in ("onnx_int8", "tflite_int8"):
        m = backends.load(built_models[kind])
        out = m.run(batch)["features"]
        single = np.concatenate([m.run(x)["features"] for x in held_out[:3]])
        assert out.shape == (3, 1280)
        np.testing.assert_allclose(out, single, rtol=1e-4, atol=1e-4)


def test_models_build_reuses_the_cache(built_models, bouncer_home):
    res = run_cli("models", "build", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0 and "already built" in res.stdout


def test_quantize_cli_on_a_calibration_folder(built_models, sim_folder, tmp_path):
    out = tmp_path / "q.int8.onnx"
    res = run_cli("quantize", str(built_models["onnx_fp32"]), "--calib", str(sim_folder), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "top-1 agreement" in res.stdout and "cosine features" in res.stdout and "p50/p90/p99" in res.stdout
    report = json.loads((tmp_path / "q.int8.onnx.report.json").read_text())
    entry = report["runtimes"]["onnxruntime"]
    assert entry["int8_mb"] < entry["fp32_mb"] / 3
    assert entry["cosine"]["features"]["median"] >= 0.97
    assert backends.load(out).run(np.zeros((1, 3, 224, 224), np.float32))["features"].shape == (1, 1280)


def test_bench_backbone_prints_json_last(built_models, bouncer_home):
    res = run_cli("bench", "backbone", "--rounds", "1", "--per-round", "3", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("ort_fp32_ms", "ort_int8_ms", "litert_fp32_ms", "litert_int8_ms", "int8_speedup", "int8_mb"):
        assert figures[key] > 0, key
    assert figures["int8_mb"] <= 6.0


def test_infer_scores_a_folder_and_survives_bad_files(built_models, sim_folder, tmp_path, bouncer_home):
    (tmp_path / "imgs").mkdir()
    good = next((sim_folder / "gear").iterdir())
    (tmp_path / "imgs" / "good.png").write_bytes(good.read_bytes())
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"garbage")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    res = run_cli("infer", str(tmp_path / "imgs"), "--jsonl", str(out), env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr
    rows = {r["path"].rsplit("/", 1)[1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"good.png", "broken.jpg", "empty.png"}
    assert rows["good.png"]["feature_norm"] > 0 and 0 < rows["good.png"]["top1_prob"] <= 1
    assert "not a decodable image" in rows["broken.jpg"]["error"] and "empty file" in rows["empty.png"]["error"]


def test_bench_hotpath_prints_the_documented_json(built_models, bouncer_home):
    res = run_cli("bench", "hotpath", "--rounds", "1", "--per-round", "5", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["kernels"]) >= 7
    for k in out["kernels"].values():
        ratio = k["numpy_us"] / k["cpp_us"]
        assert k["numpy_us"] > 0 and k["cpp_us"] > 0 and abs(k["speedup"] - ratio) < 0.01 * ratio
    assert 0 < out["guard_overhead"] < out["guard_overhead_numpy"]


def test_bench_device_prints_the_documented_json(built_models, bouncer_home):
    res = run_cli("bench", "device", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("bare_fps", "guarded_fps", "guarded_over_bare", "outbox_drain_msgs_per_s", "peak_rss_mb"):
        assert out[key] > 0, key
    assert out["drain_left"] == 0 and out["peak_rss_mb"] < 1000
