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
        "bouncer.sim.simulator, bouncer.devices.profiles, bouncer.cli.main\n"
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


def _layer_table() -> dict[str, tuple[set[str] | None, set[str]]]:
    """README's layer table: package -> (layers it builds on, None for all; third-party modules)."""
    from helpers import REPO

    text = (REPO / "README.md").read_text()
    start = text.index("| folder | package | what | builds on | third-party |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        package, builds_on, third = cells[1].strip("`"), cells[3], cells[4]
        if builds_on == "(C++)":
            continue
        layers = None if builds_on == "all" else {x.strip() for x in builds_on.split(",") if x.strip() != "none"}
        third_party = {x.split("(")[0].strip().strip("`") for x in third.split(",")}  # "`google` (protobuf)"
        rows[package.removeprefix("bouncer.")] = (layers, third_party)
    return rows


def test_layers_meet_only_where_the_readme_table_says():
    """Every module's imports, lazy ones included, against the README's layer table: runtime/ is the camera
    core, devices/ and station/ meet only on the wire, fitting and the simulator stay off the camera."""
    import grimp

    table = _layer_table()
    graph = grimp.build_graph("bouncer", include_external_packages=True, cache_dir=None)
    subpackages = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1 and not m.startswith("bouncer._")}
    subpackages = {p for p in subpackages if graph.find_children(f"bouncer.{p}")}  # packages, not modules
    assert subpackages == set(table), f"README layer table rows {sorted(table)} vs packages {sorted(subpackages)}"
    problems = []
    for layer, (allowed_layers, allowed_third) in table.items():
        modules = graph.find_descendants(f"bouncer.{layer}") | {f"bouncer.{layer}"}
        for module in sorted(modules):
            for imported in graph.find_modules_directly_imported_by(module):
                top = imported.split(".")[0]
                if top == "bouncer":
                    other = imported.split(".")[1] if imported.count(".") else ""
                    if other in ("", layer, "_hotpath") or allowed_layers is None or other in allowed_layers:
                        continue
                    problems.append(f"{module} imports {imported} (layer {other})")
                elif top not in sys.stdlib_module_names and top not in allowed_third and top != "__future__":
                    problems.append(f"{module} imports third-party {top}")
    assert not problems, "\n".join(problems)
