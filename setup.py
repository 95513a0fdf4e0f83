"""Builds the optional C++ hot path (`bouncer._hotpath`); all other metadata lives in pyproject.toml.

pybind11 because it is header-only, builds with plain setuptools (no CMake step), and reads numpy
buffers in place. The extension is optional: where no compiler exists the install still succeeds
and the runtime falls back to the numpy reference (with one warning).
"""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# -ffp-contract=off: no fused multiply-adds the numpy reference does not do (aarch64's GCC fuses by default, and
# x * 0.5 then x - h rounds differently fused: the kernels must match the reference exactly where it is exact)
flags = ["-O3", "-fopenmp-simd", "-fvisibility=hidden", "-ffp-contract=off", "-pthread"]
if os.environ.get("BOUNCER_ASAN"):
    flags = [
        "-O1",
        "-g",
        "-fopenmp-simd",
        "-ffp-contract=off",
        "-pthread",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-DBOUNCER_NO_CLONES",
    ]

if os.environ.get("BOUNCER_PORTABLE"):  # only the portable code paths (scripts/asan_kernels tests them too)
    flags.append("-DBOUNCER_PORTABLE")

ext = Pybind11Extension(
    "bouncer._hotpath",
    ["cpp_ext/hotpath.cpp"],
    cxx_std=17,
    extra_compile_args=flags,
    extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"] if os.environ.get("BOUNCER_ASAN") else []),
    optional=not os.environ.get("BOUNCER_REQUIRE_HOTPATH"),
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
