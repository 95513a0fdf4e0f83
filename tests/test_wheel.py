"""A wheel install (not only the editable one) carries every subpackage, data file and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from helpers import REPO


def test_wheel_builds_and_runs_without_the_checkout(tmp_path: Path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(dist.glob("bouncer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "bouncer/__init__.py",
        "bouncer/cli/main.py",
        "bouncer/runtime/backends/onnx.py",
        "bouncer/runtime/backends/litert.py",
        "bouncer/quantize/export.py",
        "bouncer/devices/data/generic.toml",
        "bouncer/station/__init__.py",
        "bouncer/station/web.py",
        "bouncer/station/templates/queue.html",
        "bouncer/station/templates/base.html",
        "bouncer/station/static/queue.js",
        "bouncer/station/static/style.css",
        "bouncer/devices/ota.py",
        "bouncer/cli/demo.py",
        "bouncer/bench/servers.py",
        "bouncer/bench/hotpath.py",
        "bouncer/sim/incidents.py",
        "bouncer/sim/sources.py",
        "bouncer/fitting/fit.py",
        "bouncer/runtime/gates/explain.py",
        "bouncer/runtime/gates/guard.py",
        "bouncer/runtime/kernels/reference.py",
        "bouncer/runtime/sources/genicam.py",
        "bouncer/runtime/sources/aravis_camera.py",
        "bouncer/runtime/sources/pylon_camera.py",
    ):
        assert expected in names, expected
    assert any(n.startswith("bouncer/_hotpath") and n.endswith(".so") for n in names), "C++ hot path not in the wheel"
    assert not any(n.startswith(("bouncer/tests/", "bouncer/.venv", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    entries = zipfile.ZipFile(wheel).read(entry).decode()
    assert "bouncer = bouncer.cli.main:main" in entries
    assert "[bouncer.sources]" in entries and "sim = bouncer.sim.sources:open_sim" in entries  # the plug-ins
    assert "genicam = bouncer.runtime.sources.genicam:open_genicam" in entries
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    stacks = [
        ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and ("pypylon" in ln or "pygobject" in ln)
    ]
    assert len(stacks) == 2 and all('extra == "cameras"' in ln for ln in stacks), (
        stacks
    )  # `pip install .` pulls neither

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # -S skips .pth files, so the editable install of the checkout cannot shadow the wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    res = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import bouncer, json, sys; from bouncer.cli.main import main; "
            "print(json.dumps(bouncer.__file__)); sys.exit(main(['doctor', '--json']))",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert json.loads(lines[0]).startswith(str(target))
    info = json.loads(lines[-1])
    assert info["onnxruntime"]["version"]
    assert info["hot_path"].startswith("c++"), info["hot_path"]
