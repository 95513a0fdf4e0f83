"""The type checker runs on the whole package as part of the test command: annotations are checked, not
decoration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.heavy  # mypy over the package
def test_the_package_type_checks(tmp_path):
    # the checkout is the package `bouncer` (pyproject's package-dir): give mypy that layout through a link
    root = tmp_path / "root"
    root.mkdir()
    (root / "bouncer").symlink_to(REPO, target_is_directory=True)
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--cache-dir",
         str(tmp_path / "cache"), "-p", "bouncer"],
        env={**os.environ, "MYPYPATH": str(root)}, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert "Success" in res.stdout
