"""Gates around the user's own model: a classifier's predictions and an anomaly model's scores, certified.

The models are made here with `bouncer models example` (a classifier trained on the simulated line's known parts,
a PatchCore-style anomaly model on good gears), and guarded through the CLI as a user would.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from helpers import run_cli, tiny_classifier
from onnx import TensorProto, helper

from bouncer.fitting.defects import synthesize
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.tasks import AnomalyScore, UserScores
from bouncer.runtime.images import image_folder, read_bgr
from bouncer.runtime.modelcard import ModelCard, write_card_file
from bouncer.runtime.preprocess import Preprocessing
from bouncer.sim import simulator


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_line")
    simulator.write_dataset(root / "train", per_class=30, seed=41)
    simulator.write_dataset(root / "calib", per_class=65, seed=42)
    simulator.write_dataset(root / "test", per_class=25, seed=43)
    simulator.write_dataset(root / "unknown", simulator.UNKNOWN_PARTS + simulator.FOREIGN, per_class=25, seed=44)
    return root


@pytest.fixture(scope="module")
def classifier(built_models, line) -> Path:
    out = line / "models" / "classifier.onnx"
    res = run_cli("models", "example", "classifier", "--train", str(line / "train"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((out.parent / "classifier.onnx.card.json").read_text())
    assert card["task"] == "classifier" and card["score_kind"] == "softmax" and card["features"] == "embedding"
    return out


def scored(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_user_classifier_is_guarded_on_its_own_predictions(classifier, line, tmp_path):
    gate = tmp_path / "user.gate"
    res = run_cli("fit", "--model", str(classifier), "--train", str(line / "train"), "--calib", str(line / "calib"),
                  "--out", str(gate))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reading sidecar" in res.stdout or "reading model and sidecar" in res.stdout, res.stdout
    b = GateBundle.load(gate)
    assert isinstance(b.task, UserScores) and b.task.score_kind == "softmax" and b.task.temperature > 0
    assert b.sidecar is not None and b.classes == sorted(simulator.KNOWN_CLASSES)
    assert b.selection["reads"], b.selection
    out = tmp_path / "s.jsonl"
    res = run_cli("score", "--gate", str(gate), "--model", str(classifier), "--jsonl", str(out),
                  str(line / "test"), str(line / "unknown"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = scored(out)
    known = [r for r in rows if "/test/" in r["path"]]
    strange = [r for r in rows if "/unknown/" in r["path"]]
    accepted = [r for r in known if r["decision"] == "accept"]
    assert len(accepted) >= 0.8 * len(known)
    assert all(r["label"] == Path(r["path"]).parent.name for r in accepted)  # the user's model's own labels
    assert sum(r["decision"] == "accept" for r in strange) <= 0.05 * len(strange)
    # the gate is bound to the user's model: Bouncer's backbone alone is refused
    res = run_cli("score", "--gate", str(gate), "--jsonl", str(tmp_path / "x.jsonl"), str(line / "test"))
    assert res.returncode == 2 and "fitted on backbone example-classifier" in res.stderr


def test_without_the_sidecar_the_heads_read_the_models_own_embedding(classifier, line, tmp_path):
    gate = tmp_path / "own.gate"
    res = run_cli("fit", "--model", str(classifier), "--sidecar", "none", "--train", str(line / "train"),
                  "--calib", str(line / "calib"), "--out", str(gate), "--target-accuracy", "0.95")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    b = GateBundle.load(gate)
    assert b.sidecar is None and b.selection["reads"] == ["model"]
    assert {h.input_key for h in b.ood_heads} == {"embedding"} and b.baseline is not None
    out = tmp_path / "s.jsonl"
    res = run_cli("score", "--gate", str(gate), "--model", str(classifier), "--jsonl", str(out), str(line / "test"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert Counter(r["decision"] for r in scored(out))["accept"] >= 50


def test_a_tensor_inside_the_users_graph_is_exposed_as_the_features_the_heads_read(classifier, line, tmp_path):
    """A classifier exported with `probs` only: `models expose` adds its hidden layer (or a pooled conv map) as an
    output without touching the weights, and `fit --sidecar none` then reads it."""
    import onnxruntime as ort

    m = onnx.load(str(classifier))
    del m.graph.output[1:]  # only `probs`: the hidden layer `embedding` is now inside the graph
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    card = json.loads((classifier.parent / "classifier.onnx.card.json").read_text()) | {"features": None}
    (tmp_path / "bare.onnx.card.json").write_text(json.dumps(card))

    res = run_cli("models", "expose", str(bare), "--list")
    listed = dict(ln.split("  ") for ln in res.stdout.splitlines())
    assert res.returncode == 0 and listed["embedding"].endswith("x128"), res.stdout[-2000:]
    four_d = [name for name, dims in listed.items() if dims.count("x") == 3]
    assert four_d, res.stdout
    res = run_cli("models", "expose", str(bare), "--tensor", "nope", "--out", str(tmp_path / "x.onnx"))
    assert res.returncode == 2 and "no tensor 'nope'" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = run_cli("models", "expose", str(tmp_path / "bare.onnx.card.json"), "--tensor", "embedding",
                  "--out", str(tmp_path / "x.onnx"))  # fmt: skip
    assert res.returncode == 2 and "no model card" in res.stderr, res.stderr

    exposed = tmp_path / "exposed.onnx"
    res = run_cli("models", "expose", str(bare), "--tensor", "embedding", "--out", str(exposed))
    assert res.returncode == 0, res.stderr[-3000:]
    pooled = tmp_path / "pooled.onnx"
    res = run_cli("models", "expose", str(bare), "--tensor", four_d[-1], "--as", "neck", "--out", str(pooled))
    assert res.returncode == 0, res.stderr[-3000:]
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    ref = ort.InferenceSession(str(classifier)).run(None, {"input": x})
    got = ort.InferenceSession(str(exposed)).run(None, {"input": x})
    np.testing.assert_array_equal(got[0], ref[0])  # same weights, same predictions
    np.testing.assert_array_equal(got[1], ref[1])  # the exposed hidden layer is the old `embedding` output
    neck = ort.InferenceSession(str(pooled)).run(["neck"], {"input": x})[0]
    assert neck.ndim == 2 and neck.shape[0] == 2 and np.isfinite(neck).all()
    assert json.loads((tmp_path / "exposed.onnx.card.json").read_text())["features"] == "features"

    gate = tmp_path / "exposed.gate"
    res = run_cli("fit", "--model", str(exposed), "--sidecar", "none", "--train", str(line / "train"),
                  "--calib", str(line / "calib"), "--out", str(gate), "--target-accuracy", "0.95")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert {h.input_key for h in GateBundle.load(gate).ood_heads} == {"features"}


@pytest.fixture(scope="module")
def gears(line) -> Path:
    """Good gears to train and calibrate an anomaly model on; scratched, dented and stained ones to find."""
    root = line / "gears"
    rng = np.random.default_rng(5)
    for split in ("train", "calib", "test"):
        for p in image_folder(line / split)["gear"]:
            dst = root / split / "good" / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(p)
    extra = simulator.write_dataset(line / "more_gears", ("gear",), per_class=120, seed=45)
    for p in image_folder(extra)["gear"]:
        (root / "calib" / "good" / f"more_{p.name}").symlink_to(p)
    for split in ("calib", "test"):
        for i, p in enumerate(image_folder(line / split)["gear"][:20]):
            dst = root / f"{split}_defects" / "defect" / f"{i}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), synthesize(read_bgr(p), rng))
    return root


@pytest.fixture(scope="module")
def anomaly_model(built_models, gears) -> Path:
    out = gears / "anomaly.onnx"
    res = run_cli("models", "example", "anomaly", "--train", str(gears / "train"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_an_anomaly_model_gets_a_stated_false_alarm_rate_and_the_input_gate_around_it(anomaly_model, gears, line,
                                                                                      tmp_path):  # fmt: skip
    gate = tmp_path / "anomaly.gate"
    res = run_cli("fit", "--model", str(anomaly_model), "--train", str(gears / "train"), "--calib",
                  str(gears / "calib"), "--out", str(gate), "--false-alarm", "0.02")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not certified" in res.stdout  # no defective calibration frames: the misses are not promised
    b = GateBundle.load(gate)
    an = b.fit_metrics["anomaly"]
    assert isinstance(b.task, AnomalyScore) and b.classes == ["good"]
    assert an["false_alarm_met"] and an["false_alarm_bound"] <= 0.02 and not an["miss_rate_certified"]
    assert b.acceptance.error_bound is None
    # good gears pass, defective ones are flagged as anomalies, other parts by the sidecar's OOD heads
    blurred = tmp_path / "blurred" / "good"
    blurred.mkdir(parents=True)
    for p in image_folder(gears / "test")["good"][:5]:
        cv2.imwrite(str(blurred / p.name), cv2.GaussianBlur(read_bgr(p), (0, 0), 6))
    out = tmp_path / "s.jsonl"
    folders = [gears / "test", gears / "test_defects", line / "test" / "washer", blurred]
    res = run_cli("score", "--gate", str(gate), "--model", str(anomaly_model), "--jsonl", str(out), *map(str, folders))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = scored(out)
    good = [r for r in rows if "/test/good/" in r["path"]]
    bad = [r for r in rows if "/test_defects/" in r["path"]]
    washers = [r for r in rows if "/washer/" in r["path"]]
    assert sum(r["decision"] == "accept" for r in good) >= 0.8 * len(good)
    assert all(r["label"] == "good" for r in good if r["decision"] == "accept")
    flagged = [r for r in bad if r["decision"] != "accept"]
    assert len(flagged) >= 0.7 * len(bad), Counter(r["decision"] for r in bad)
    assert any("anomaly" in r["reasons"] for r in flagged)
    assert all(r["decision"] != "accept" for r in washers)
    assert all(r["decision"] != "accept" for r in rows if "/blurred/" in r["path"])


def test_labelled_defects_certify_the_misses_among_accepted_frames(anomaly_model, gears, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "good").symlink_to(gears / "calib" / "good", target_is_directory=True)
    (calib / "defect").symlink_to(gears / "calib_defects" / "defect", target_is_directory=True)
    gate = tmp_path / "certified.gate"
    res = run_cli("fit", "--model", str(anomaly_model), "--train", str(gears / "train"), "--calib", str(calib),
                  "--out", str(gate), "--target-accuracy", "0.9", "--false-alarm", "0.05")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    an = GateBundle.load(gate).fit_metrics["anomaly"]
    assert an["defective_calibration_frames"] == 20 and "Learn-then-Test" in an["basis"], an
    assert an["miss_rate_certified"] and an["observed_miss_rate"] <= 0.1


def _odd_model(path: Path) -> Path:
    """tiny_classifier plus outputs a card can misdescribe: per-class sigmoids (rows do not sum to one), scores
    shifted out of [0, 1], and NaN."""
    model = onnx.load(str(tiny_classifier(path)))
    g = model.graph
    g.initializer.append(onnx.numpy_helper.from_array(np.array(5.0, np.float32), "five"))
    g.node.extend([
        helper.make_node("Sigmoid", ["scores"], ["sig"]),
        helper.make_node("Add", ["scores", "five"], ["shifted"]),
        helper.make_node("Abs", ["scores"], ["abs"]),
        helper.make_node("Neg", ["abs"], ["neg"]),
        helper.make_node("Sub", ["neg", "five"], ["below"]),
        helper.make_node("Sqrt", ["below"], ["nan"]),
    ])  # fmt: skip
    for name in ("sig", "shifted", "nan"):
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("scores", "kind", "message"),
    [
        ("sig", "softmax", "do not sum to one"),
        ("shifted", "sigmoid", "outside [0, 1]"),
        ("nan", "logits", "NaN or infinite scores"),
        ("missing", "logits", "lacks required output(s) missing"),
    ],
)
def test_a_model_that_does_not_match_its_card_is_a_clear_error(tmp_path, scores, kind, message):
    model = _odd_model(tmp_path / "odd.onnx")
    card = ModelCard(name="odd", task="classifier", features="feat", logits=None, scores=scores, score_kind=kind,
                     classes=("gear", "plate"), preprocessing=Preprocessing(32, 32))  # fmt: skip
    write_card_file(model, card)
    simulator.write_dataset(tmp_path / "train", ("gear", "plate"), per_class=6, seed=1)
    simulator.write_dataset(tmp_path / "calib", ("gear", "plate"), per_class=6, seed=2)
    res = run_cli("fit", "--model", str(model), "--sidecar", "none", "--train", str(tmp_path / "train"), "--calib",
                  str(tmp_path / "calib"), "--out", str(tmp_path / "g.gate"), "--heads", "maha:feat")  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_card_errors_name_the_key_and_the_fix(tmp_path):
    model = tiny_classifier(tmp_path / "m.onnx")
    cases = {
        '{"name": "m", "task": "classifier", "scores": "scores"}': "needs `classes`",
        '{"name": "m", "task": "classifier", "classes": ["a", "b"]}': "needs `scores`",
        '{"name": "m", "task": "segmenter", "features": "feat"}': "task = 'segmenter'",
        '{"name": "m", "task": "detector", "features": "feat"}': "needs `detections`",
        '{"name": "m", "task": "detector", "detections": "feat", "classes": ["a"], '
        '"layout": "yolov9"}': "layout = 'yolov9'",
        '{"name": "m", "task": "anomaly"}': "needs `pred_score`",
        '{"name": "m", "features": "feat", "score_kind": "probs", "task": "classifier", "scores": "scores", '
        '"classes": ["a", "b"]}': "score_kind = 'probs'",
        '{"name": "m", "features": "feat", "threshold": 0.5}': "unknown key(s) threshold",
    }
    for text, message in cases.items():
        (tmp_path / "m.onnx.card.json").write_text(text)
        res = run_cli("infer", "--model", str(model), str(tmp_path))
        assert res.returncode == 2 and message in res.stderr, (text, res.stderr[-1000:])


def test_a_camera_runs_the_users_classifier_with_its_sidecar_and_flags_what_it_does_not_know(
    broker, classifier, line, tmp_path
):
    from helpers import Collector

    from bouncer.runtime import schemas

    gate = tmp_path / "user.gate"
    res = run_cli("fit", "--model", str(classifier), "--train", str(line / "train"), "--calib", str(line / "calib"),
                  "--out", str(gate))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    src = simulator.write_dataset(tmp_path / "frames", ("gear", "washer", "bolt", "giraffe"), per_class=3, seed=9)
    collector = Collector(broker.port)
    res = run_cli("run", "--source", str(src), "--gate", str(gate), "--model", str(classifier), "--broker",
                  broker.url, "--device-id", "cam-u", "--data-dir", str(tmp_path / "data"), "--once")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 12 and summary["decisions"]["accept"] >= 5, summary
    flagged = summary["frames"] - summary["decisions"]["accept"]
    msgs = [schemas.FrameMessage.decode(p) for p in collector.wait_for("/frames", flagged)]
    strange = [m for m in msgs if "bolt" in m.source or "giraffe" in m.source]
    assert len(strange) == 6 and all(m.decision == "review" for m in strange)
    m = strange[0]
    # what the station needs to recalibrate and choose heads again: the user's scores and every candidate input
    f = m.feature_arrays()
    assert f["probs"].shape == (4,) and f["embedding"].shape == (128,)
    assert f["sidecar.pool_s32"].shape == (192,) and m.backbone_hash == GateBundle.load(gate).backbone_hash
    collector.close()


def test_the_tflite_twin_of_a_user_classifier_is_guarded_the_same_way_on_litert(built_models, line, tmp_path):
    out = tmp_path / "twin" / "classifier.onnx"
    res = run_cli("models", "example", "classifier", "--train", str(line / "train"), "--out", str(out), "--tflite")
    assert res.returncode == 0, res.stderr[-3000:]
    twin = Path(json.loads(res.stdout.strip().splitlines()[-1])["tflite"])
    card = json.loads(twin.with_name(twin.name + ".card.json").read_text())
    assert card["task"] == "classifier" and set(card["tensors"]) == {"probs", "embedding"}
    decisions = {}
    for model in (out, twin):
        gate = tmp_path / f"{model.suffix[1:]}.gate"
        res = run_cli("fit", "--model", str(model), "--train", str(line / "train"), "--calib", str(line / "calib"),
                      "--out", str(gate), "--target-accuracy", "0.95")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        jsonl = tmp_path / f"{model.suffix[1:]}.jsonl"
        res = run_cli("score", "--gate", str(gate), "--model", str(model), "--jsonl", str(jsonl),
                      str(line / "test"), str(line / "unknown"))  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        decisions[model.suffix] = {r["path"]: (r["decision"], r["label"]) for r in scored(jsonl)}
    same = sum(decisions[".onnx"][p] == decisions[".tflite"][p] for p in decisions[".onnx"])
    assert same >= 0.95 * len(decisions[".onnx"]), same


def test_the_station_takes_a_user_classifiers_gate_and_says_what_labels_cannot_teach_it(
    broker, classifier, line, tmp_path
):
    from helpers import StationProcess, device_messages, free_port, http_json, publish_all, station_config, wait_until

    from bouncer.runtime import schemas

    gate = tmp_path / "user.gate"
    res = run_cli("fit", "--model", str(classifier), "--train", str(line / "train"), "--calib", str(line / "calib"),
                  "--out", str(gate), "--target-accuracy", "0.95")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = station_config(tmp_path / "station.toml", tmp_path / "station", broker.url)
    res = run_cli("station", "init", str(cfg), "--gate", str(gate), "--train", str(line / "train"), "--calib",
                  str(line / "calib"), "--model", str(classifier))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    station = StationProcess(cfg, free_port()).start()
    try:
        bolts = simulator.write_dataset(tmp_path / "bolts", ("bolt",), per_class=12, seed=3)
        msgs = device_messages(gate, classifier, bolts, "cam-7")
        assert len(msgs) == 12 and {"probs", "embedding", "sidecar.pool_s32"} <= set(msgs[0].features)
        publish_all(broker.port, [(schemas.topic("cam-7", "frames"), m.encode()) for m in msgs])
        queue = wait_until(lambda: (q := http_json(f"{station.url}/api/queue?limit=100")[1])["counts"]["frames"]
                           == 12 and q)  # fmt: skip
        for f in queue["frames"]:
            assert http_json(f"{station.url}/api/frames/{f['id']}/label", {"label": "new:bolt"})[0] == 200
        status, result = http_json(f"{station.url}/api/retrain", {})
        assert status == 200 and not result["published"], result
        assert "bolt your model does not predict" in result["reason"], result["reason"]
        assert result["metrics"]["not_predicted_by_model"] == ["bolt"]
    finally:
        station.stop()


def test_the_user_model_bench_prints_its_table(built_models, tmp_path):
    res = run_cli("bench", "user-model", "--simulator-only", "--work", str(tmp_path / "work"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = {(r["target"], r["gate"]): r for r in out["classifier"]}
    assert len(rows) == 6 and all(r["data"] == "simulator" for r in out["classifier"])
    side = rows[(0.99, "user classifier + sidecar")]
    assert side["accepted_error_known"] <= 0.01 and side["clean_coverage"] >= 0.9 and side["unknown_accepted"] == "0/60"
    assert all(h.startswith("maha:sidecar.") or h.startswith("knn:sidecar.") for h in side["heads"])
    cost = out["cost"]["classifier"]
    assert cost["bare model"] > 0 and cost["guard + sidecar"] > cost["guard"] and "anomaly" not in out["cost"]
    assert "| simulator | 0.99 | user classifier + sidecar |" in res.stdout


@pytest.mark.parametrize(("k", "n", "m", "j"), [(0, 30, 30, 0), (1, 50, 50, 2), (3, 40, 80, 1), (2, 20, 10, 4)])
def test_window_exceedance_is_what_exchangeable_scores_do(k, n, m, j):
    """The exact count against 40,000 draws of n calibration and m later scores from one distribution."""
    from bouncer.fitting.acceptance import window_exceedance

    rng = np.random.default_rng(k * 1000 + n + m + j)
    draws = rng.random((40_000, n + m))
    threshold = -np.sort(-draws[:, :n], axis=1)[:, k]  # the (k+1)-th largest calibration score
    above = (draws[:, n:] > threshold[:, None]).sum(1)
    assert abs(float((above > j).mean()) - window_exceedance(k, n, m, j)) < 0.01


def test_a_model_that_starts_emitting_nan_sends_frames_to_review(tmp_path):
    """Fitted while its scores were fine; at run time the same model's scores are NaN (the card now points at the
    NaN output, as a broken export would): every frame goes to review, none is accepted or crashes the loop."""
    model = _odd_model(tmp_path / "odd.onnx")
    card = dict(name="odd", task="classifier", features="feat", logits=None, scores="scores", score_kind="logits",
                classes=("gear", "plate"), preprocessing=Preprocessing(32, 32))  # fmt: skip
    write_card_file(model, ModelCard(**card))
    simulator.write_dataset(tmp_path / "train", ("gear", "plate"), per_class=8, seed=1)
    simulator.write_dataset(tmp_path / "calib", ("gear", "plate"), per_class=8, seed=2)
    gate = tmp_path / "g.gate"
    res = run_cli("fit", "--model", str(model), "--sidecar", "none", "--train", str(tmp_path / "train"), "--calib",
                  str(tmp_path / "calib"), "--out", str(gate), "--heads", "maha:feat", "--target-accuracy", "0.5",
                  "--delta", "0.5")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    write_card_file(model, ModelCard(**{**card, "scores": "nan"}))
    out = tmp_path / "s.jsonl"
    res = run_cli("score", "--gate", str(gate), "--model", str(model), "--jsonl", str(out), str(tmp_path / "calib"))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = scored(out)
    assert len(rows) == 16 and all(r["decision"] != "accept" for r in rows)
    invalid = [r for r in rows if r["reasons"] == ["invalid_output"] and r["decision"] == "review"]
    assert len(invalid) >= 12, rows[:2]  # the rest, if any, stopped at the quality gate before the model
