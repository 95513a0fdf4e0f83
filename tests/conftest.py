"""Shared fixtures. The backbone models are built once per test run, through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import Mosquitto, run_cli, station_config

from bouncer.runtime import home


@pytest.fixture(scope="session")
def bouncer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache for this run; BOUNCER_TEST_HOME reuses one across runs while developing."""
    path = Path(os.environ.get("BOUNCER_TEST_HOME") or tmp_path_factory.mktemp("bouncer_home"))
    os.environ["BOUNCER_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def built_models(bouncer_home: Path) -> dict[str, Path]:
    """fp32/int8 ONNX and TFLite backbones, built by `bouncer models build --tflite`."""
    res = run_cli("models", "build", "--tflite", env={"BOUNCER_HOME": str(bouncer_home)})
    assert res.returncode == 0, res.stderr[-3000:]
    d = bouncer_home / "models"
    paths = {
        "onnx_fp32": d / home.FP32_ONNX,
        "onnx_int8": d / home.INT8_ONNX,
        "tflite_fp32": d / home.FP32_TFLITE,
        "tflite_int8": d / home.INT8_TFLITE,
        "tflite_int8io": d / home.INT8_IO_TFLITE,
    }
    for p in paths.values():
        assert p.exists(), f"models build did not produce {p}"
    return paths


@pytest.fixture(scope="session")
def sim_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulator data set (ImageFolder layout), 12 frames of each known part."""
    from bouncer.sim import simulator

    return simulator.write_dataset(tmp_path_factory.mktemp("sim"), per_class=12, seed=7)


@pytest.fixture(scope="session")
def sim_gate(built_models, tmp_path_factory) -> Path:
    """A gate fitted on the simulated line (4 parts), through the CLI."""
    from bouncer.sim import simulator

    root = tmp_path_factory.mktemp("sim_gate")
    simulator.write_dataset(root / "train", per_class=30, seed=31)
    simulator.write_dataset(root / "calib", per_class=65, seed=32)
    out = root / "line.gate"
    res = run_cli("fit", "--train", str(root / "train"), "--calib", str(root / "calib"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture()
def broker(tmp_path):
    """A real Mosquitto on a free port (persistence on), stopped after the test."""
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture()
def station_dir(sim_gate, tmp_path) -> Path:
    """`bouncer station init` on the simulated line's gate and its training and calibration folders."""
    cfg = station_config(tmp_path / "station.toml", tmp_path / "station")
    root = sim_gate.parent
    res = run_cli(
        "station", "init", str(cfg), "--gate", str(sim_gate), "--train", str(root / "train"), "--calib",
        str(root / "calib"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gate published" in res.stdout
    return tmp_path / "station"


@pytest.fixture(scope="session")
def detection_line(tmp_path_factory) -> Path:
    """The simulated line in detection mode: training, calibration and test folders, and frames with unknown objects."""
    root = tmp_path_factory.mktemp("detection_line")
    unknown = ["--unknown", "bolt,giraffe", "--unknown-rate", "1"]
    for name, frames, seed, extra in (("train", 240, 1, []), ("calib", 400, 3, []), ("test", 150, 4, []),
                                      ("unknown", 60, 5, unknown)):  # fmt: skip
        res = run_cli("sim", "detection", "--out", str(root / name), "--frames", str(frames), "--seed", str(seed),
                      *extra)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
    return root


@pytest.fixture(scope="session")
def detector(bouncer_home, detection_line) -> Path:
    """YOLOv8n trained by ultralytics on the simulated line (cached in the test model home: minutes on CPU)."""
    out = bouncer_home / "test-detector" / "yolov8n-sim.onnx"
    if not out.is_file():
        res = run_cli("models", "example", "detector", "--train", str(detection_line / "train"), "--out", str(out),
                      "--epochs", "12")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    return out
