"""What this machine has and what Bouncer will use: the facts behind `bouncer doctor`."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bouncer.runtime import home


def cpu_features() -> dict[str, bool]:
    """SIMD features that decide which int8 path is fast (VNNI on x86, dot-product NEON on ARM)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    machine = platform.machine().lower()
    return {
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "neon": "asimd" in flags or "neon" in flags or machine in ("aarch64", "arm64"),
        "neon_dotprod": "asimddp" in flags,
    }


def package_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def hotpath_status() -> str:
    from bouncer.runtime import kernels

    if kernels.ACTIVE == "c++":
        return f"c++ ({Path(str(kernels._impl.__file__)).name})"
    return kernels.ACTIVE


def collect() -> dict[str, Any]:
    import onnxruntime as ort

    from bouncer.runtime.backends.litert import runtime_version

    models = home.models_dir()
    cached = sorted(p.name for p in models.glob("*") if p.suffix in (".onnx", ".tflite")) if models.exists() else []
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_features": cpu_features(),
        "onnxruntime": {"version": ort.__version__, "providers": ort.get_available_providers()},
        "litert": runtime_version(),
        "numpy": package_version("numpy"),
        "opencv": package_version("opencv-python-headless") or package_version("opencv-python"),
        "paho-mqtt": package_version("paho-mqtt"),
        "build_extra": {"torch": package_version("torch"), "onnx": package_version("onnx")},
        "tflite_export_extra": {"onnx2tf": package_version("onnx2tf"), "tensorflow": package_version("tensorflow")},
        "hot_path": hotpath_status(),
        "bouncer_home": str(home.home()),
        "cached_models": cached,
    }
