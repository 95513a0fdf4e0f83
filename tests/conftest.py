"""Shared fixtures. The backbone models are built once per test run, through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import Mosquitto, Postgres, SeaweedFS, run_cli, station_config

from bouncer.runtime import home

# The fast tier (`scripts/test --fast`) leaves out every test that needs a trained model, a real server or the
# packaged install: those that use these fixtures, are marked slow or heavy, or run the type check or a wheel build.
HEAVY_FIXTURES = {"bouncer_home", "built_models", "sim_gate", "broker", "postgres_server", "s3_server", "detector",
                  "detection_line", "station_dir"}  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true", help="only tests that need no trained model or real server")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "heavy: needs a trained model, a real server or a build (not in --fast)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fast"):
        return
    keep, drop = [], []
    for item in items:
        heavy = HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow")
        (drop if heavy or item.get_closest_marker("heavy") else keep).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


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


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the session, in a temporary folder of its own (outside pytest's, which only root
    may enter: the server runs as `postgres`), stopped by its process id at the end."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bouncer-pg-"))
    server = Postgres(work).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture()
def postgres(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return postgres_server.database()


@pytest.fixture()
def station_database(request) -> str:
    """The station's database: SQLite (the default), or PostgreSQL where a test asks for it with
    `@pytest.mark.parametrize("station_database", ["postgres"], indirect=True)`."""
    if getattr(request, "param", "") == "postgres":
        return request.getfixturevalue("postgres")
    return ""


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server for the session (SeaweedFS on loopback), stopped by its process id at the end. Its
    access key is in the environment, where obstore (in the tests and the station processes they start) finds it."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bouncer-s3-"))
    server = SeaweedFS(work).start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=server.KEY, AWS_SECRET_ACCESS_KEY=server.SECRET)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture()
def station_objects(request, station_database) -> str:
    """Where the station keeps frames: files in its folder beside SQLite; a fresh bucket on the session's S3
    server beside PostgreSQL (the scaled-out station is PostgreSQL + S3)."""
    return request.getfixturevalue("s3_server").bucket() if station_database else ""


@pytest.fixture()
def station_dir(sim_gate, tmp_path, station_database, station_objects) -> Path:
    """`bouncer station init` on the simulated line's gate and its training and calibration folders."""
    cfg = station_config(tmp_path / "station.toml", tmp_path / "station", database=station_database,
                         objects=station_objects)  # fmt: skip
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
