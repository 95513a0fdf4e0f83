"""Bad input to the model commands: one clear line naming the file, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_classifier

from bouncer.runtime.modelcard import ModelCard, write_card_file
from bouncer.runtime.preprocess import Preprocessing


def assert_clean_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("bouncer: error:"), res.stderr
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    import cv2

    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return d


def test_missing_model(tmp_path, calib):
    assert_clean_error(
        run_cli("quantize", str(tmp_path / "none.onnx"), "--calib", str(calib)), "none.onnx", "not found"
    )


def test_non_model_file(tmp_path, calib):
    p = tmp_path / "notes.onnx"
    p.write_text("hello")
    assert_clean_error(run_cli("quantize", str(p), "--calib", str(calib)), "notes.onnx", "not a loadable ONNX model")


def test_truncated_model(tmp_path, calib):
    good = tiny_classifier(tmp_path / "good.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[:200])
    assert_clean_error(run_cli("quantize", str(cut), "--calib", str(calib)), "cut.onnx")


def test_model_lacking_output(tmp_path, calib):
    m = tiny_classifier(tmp_path / "short.onnx", outputs=("scores",))
    write_card_file(m, ModelCard(name="s", features="feat", logits="scores", preprocessing=Preprocessing(32, 32)))
    assert_clean_error(run_cli("quantize", str(m), "--calib", str(calib)), "short.onnx", "feat")


def test_empty_calibration_folder(tmp_path):
    m = tiny_classifier(tmp_path / "m.onnx")
    write_card_file(m, ModelCard(name="m", features="feat", logits="scores", preprocessing=Preprocessing(32, 32)))
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("quantize", str(m), "--calib", str(tmp_path / "empty")), "empty", "no image files")
    assert_clean_error(run_cli("quantize", str(m), "--calib", str(tmp_path / "absent")), "absent", "not a folder")


def test_calibration_images_that_are_not_images(tmp_path, calib):
    m = tiny_classifier(tmp_path / "m.onnx")
    write_card_file(m, ModelCard(name="m", features="feat", logits="scores", preprocessing=Preprocessing(32, 32)))
    (calib / "fake.jpg").write_text("I am text")
    assert_clean_error(run_cli("quantize", str(m), "--calib", str(calib)), "fake.jpg", "not a decodable image")


def test_user_model_quantizes(tmp_path, calib):
    """A user's classifier with a card goes through the same pipeline."""
    m = tiny_classifier(tmp_path / "m.onnx")
    write_card_file(m, ModelCard(name="m", features="feat", logits="scores", preprocessing=Preprocessing(32, 32)))
    res = run_cli("quantize", str(m), "--calib", str(calib))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.int8.onnx").exists() and "cosine feat" in res.stdout


def test_bad_options():
    assert_clean_error(run_cli("quantize"), "model")
    assert_clean_error(run_cli("bench", "backbone", "--rounds", "0"), "at least 1")
    assert_clean_error(run_cli("sim", "dataset", "--out", "/tmp/x", "--parts", "unicorn"), "unicorn")


def test_station_commands_name_what_is_wrong(tmp_path, sim_folder, bouncer_home):
    cfg = tmp_path / "station.toml"
    assert_clean_error(run_cli("station", str(tmp_path / "none.toml")), "none.toml", "not found")
    cfg.write_text('[station]\ngroups = "line-a"\n')
    assert_clean_error(run_cli("station", "retrain", str(cfg)), "station.groups: Expected `array`, got `str`")
    cfg.write_text('[station]\ngroups = ["line a"]\n')
    assert_clean_error(run_cli("station", "retrain", str(cfg)), "station.groups", "line a")
    cfg.write_text(f'[station]\ndata_dir = "{tmp_path / "st"}"\ngroups = ["line-a"]\n[retrain]\napproval = "maybe"\n')
    assert_clean_error(run_cli("station", "retrain", str(cfg)), "retrain.approval")
    cfg.write_text(f'[station]\ndata_dir = "{tmp_path / "st"}"\ngroups = ["line-a"]\n')
    assert_clean_error(run_cli("station", "retrain", str(cfg)), "group 'line-a' has no published gate")
    assert_clean_error(run_cli("station", "retrain", str(cfg), "--group", "line-b"), "'line-b' is not managed")
    gate = tmp_path / "junk.gate"
    gate.write_bytes(b"not a zip")
    res = run_cli("station", "init", str(cfg), "--gate", str(gate), "--train", str(sim_folder), "--calib",
                  str(sim_folder))  # fmt: skip
    assert_clean_error(res, "junk.gate", "corrupt gate bundle")
    assert_clean_error(run_cli("demo", "--devices", "5"), "--devices: 1 to 3")
    # accounts: a station that was never set up, then bad names, roles, passwords and users
    other = tmp_path / "other.toml"
    other.write_text(f'[station]\ndata_dir = "{tmp_path / "never"}"\n')
    assert_clean_error(run_cli("station", "user", "list", str(other)), "no station database here")
    assert_clean_error(run_cli("station", "user", "add", str(cfg), "olga", "--role", "operator"),
                       "--password-stdin")  # fmt: skip
    for name, password, needle in (("olga", "short", "at least 8 characters"), ("bad name", "long-enough",
                                   "user name 'bad name'")):  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "bouncer", "station", "user", "add", str(cfg), name, "--role",
                              "operator", "--password-stdin"], input=password + "\n", capture_output=True,
                             text=True)  # fmt: skip
        assert_clean_error(res, needle)
    assert_clean_error(run_cli("station", "user", "token", str(cfg), "nobody"), "no user 'nobody'")
    assert_clean_error(run_cli("station", "user", "remove", str(cfg), "nobody"), "no user 'nobody'")
    res = run_cli("station", "user", "add", str(cfg), "olga", "--role", "king")
    assert res.returncode == 2 and "invalid choice: 'king'" in res.stderr, res.stderr


def test_fit_says_what_head_selection_needs(tmp_path, built_models):
    """A one-class line with too few calibration images to make synthetic defects from, and a line whose
    classes are too small to hold out: a clear line naming what is needed, never a silent fallback."""
    from bouncer.sim import simulator

    simulator.write_dataset(tmp_path / "one" / "train", ("gear",), per_class=20, seed=1)
    simulator.write_dataset(tmp_path / "one" / "calib", ("gear",), per_class=10, seed=2)
    res = run_cli("fit", "--train", str(tmp_path / "one" / "train"), "--calib", str(tmp_path / "one" / "calib"),
                  "--out", str(tmp_path / "one.gate"))  # fmt: skip
    assert_clean_error(res, "head selection needs at least one held-out fold", "--heads")
    simulator.write_dataset(tmp_path / "two" / "train", ("gear", "washer"), per_class=2, seed=3)
    simulator.write_dataset(tmp_path / "two" / "calib", ("gear", "washer"), per_class=8, seed=4)
    res = run_cli("fit", "--train", str(tmp_path / "two" / "train"), "--calib", str(tmp_path / "two" / "calib"),
                  "--out", str(tmp_path / "two.gate"))  # fmt: skip
    assert_clean_error(res, "head selection needs at least one held-out fold")
    assert "class gear not held out" in res.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (("bench", "labels", "--target-accuracy", "2"), "--target-accuracy must be in [0.5, 1)"),
        (("bench", "gates", "--rotation", "--target-accuracy", "0.1"), "--target-accuracy must be in [0.5, 1)"),
        (("bench", "gates", "--rotation", "--elpv", "/nonexistent/elpv"), "/nonexistent/elpv"),
        (("bench", "detector", "--seeds", "0"), "0: must be at least 1"),
        (("bench", "station", "--workers", "1,x"), "--workers 1,x: worker counts such as 1,2,4"),
        (
            ("sim", "detection", "--out", "/tmp/never-written", "--unknown", "unicorn"),
            "--unknown: unknown part(s) unicorn",
        ),
        (("sim", "detection", "--out", "/tmp/never-written", "--unknown-rate", "2"), "--unknown-rate: a share 0..1"),
    ],
)
def test_benchmarks_refuse_bad_settings_before_any_work(args, needle):
    assert_clean_error(run_cli(*args), needle)


def test_the_example_detector_needs_a_detection_folder(tmp_path, sim_folder):
    """Checked before ultralytics is imported or anything trains."""
    res = run_cli("models", "example", "detector", "--train", str(sim_folder), "--out", str(tmp_path / "d.onnx"))
    assert_clean_error(res, "a detection folder needs images/, labels/ (YOLO rows) and classes.json")
    assert not (tmp_path / "d.onnx").exists()


def test_fit_names_a_bad_review_budget_or_defects_folder(tmp_path, sim_folder, built_models):
    """Each is one line, before minutes of feature extraction where it can be."""
    args = ("fit", "--train", str(sim_folder), "--calib", str(sim_folder), "--out", str(tmp_path / "g.gate"))
    for bad in ("0", "0.6", "-0.1"):
        assert_clean_error(run_cli(*args, "--review-budget", bad), "--review-budget must be in (0, 0.5]", bad)
    assert_clean_error(run_cli(*args, "--target-catch", "1.5"), "--target-catch must be in (0, 1]")
    assert_clean_error(run_cli(*args, "--head-budget", "0"), "0: must be at least 1")
    assert_clean_error(run_cli(*args, "--heads", "patchknn:map_s8+"), "OOD head 'patchknn:map_s8+'")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli(*args, "--defects", str(empty)), "--defects", "no images in it")
    assert_clean_error(run_cli(*args, "--defects", str(tmp_path / "none")), "--defects", "not a folder")
    junk = tmp_path / "junk" / "scratch"
    junk.mkdir(parents=True)
    for i in range(3):
        (junk / f"{i}.png").write_bytes(b"not an image")
    assert_clean_error(run_cli(*args, "--defects", str(tmp_path / "junk")), "none of 3 defect images is readable")
    # 48 calibration frames cannot certify 1% (230 are needed): the line says how many
    assert_clean_error(run_cli(*args, "--review-budget", "0.01"), "needs at least 230 good calibration frames")
    assert not (tmp_path / "g.gate").exists()
