"""The package shape the design card promises: one import package, one CLI, lean device imports."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import run_cli


def test_subpackages_import():
    import bouncer.devices
    import bouncer.quantize
    import bouncer.runtime
    import bouncer.station

    assert bouncer.__version__


def test_device_imports_pull_no_build_time_libraries():
    code = (
        "import sys, bouncer.runtime.backends, bouncer.runtime.preprocess, bouncer.runtime.images, "
        "bouncer.runtime.sources.simulator, bouncer.devices.profiles, bouncer.cli.main\n"
        "bad = [m for m in ('torch', 'sklearn', 'onnx', 'tensorflow', 'onnx2tf') if m in sys.modules]\n"
        "print(json.dumps(bad))"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_version_and_help():
    res = run_cli("--version")
    assert res.returncode == 0 and "bouncer" in res.stdout
    res = run_cli("--help")
    assert res.returncode == 0
    for command in ("doctor", "models", "quantize", "bench", "sim", "infer"):
        assert command in res.stdout


def test_unknown_command_is_one_line_exit_2():
    res = run_cli("frobnicate")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1


def test_doctor_json_reports_runtimes_and_cache(tmp_path):
    res = run_cli("doctor", "--json", env={"BOUNCER_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["onnxruntime"]["version"]
    assert info["litert"].startswith(("ai-edge-litert", "tflite-runtime"))
    assert set(info["cpu_features"]) >= {"avx2", "avx512_vnni", "neon"}
    assert info["bouncer_home"] == str(tmp_path)
    assert "hot_path" in info and info["device_profile"]


def test_doctor_text():
    res = run_cli("doctor")
    assert res.returncode == 0
    assert "onnxruntime" in res.stdout and "C++ hot path" in res.stdout


def test_device_profiles_are_data():
    from bouncer.devices import profiles

    known = profiles.available()
    assert {"generic", "x86-ipc", "rpi4", "rpi5", "jetson-orin-nano"} <= set(known)
    assert all(p.threads >= 1 and p.max_fps > 0 for p in known.values())
    assert profiles.detect().name in known


def test_layers_meet_only_where_the_design_says():
    """runtime/ is the core; devices/ and station/ build on it; only the CLI knows every layer."""
    from helpers import REPO

    rules = {
        "runtime": ("bouncer.cli", "bouncer.quantize", "bouncer.devices", "bouncer.station"),
        "devices": ("bouncer.cli", "bouncer.quantize", "bouncer.station"),
        "station": ("bouncer.cli", "bouncer.quantize", "bouncer.devices"),
    }
    for layer, forbidden in rules.items():
        for path in (REPO / layer).rglob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert f"from {name}" not in text and f"import {name}" not in text, (path, name)
