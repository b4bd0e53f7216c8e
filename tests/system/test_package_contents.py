"""The built wheel holds every module git tracks under smq/ (a package left out of
pyproject.toml's list would install a server that fails on its first import)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from support import ROOT


def tracked_files() -> list[str]:
    try:
        return subprocess.run(["git", "ls-files", "smq", "pyproject.toml", "README.md"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")


def test_the_wheel_holds_every_tracked_module(tmp_path):
    listed = tracked_files()
    source = tmp_path / "source"  # a copy: the build writes beside its sources
    for name in listed:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    # pyproject.toml's build backend, called as pip would (pip is not everywhere: Bazel).
    build = subprocess.run(
        [sys.executable, "-c", "import sys, setuptools.build_meta as backend; "
                               "backend.build_wheel(sys.argv[1])", str(tmp_path)],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("smq_queue-*.whl")
    tracked = {name for name in listed if name.startswith("smq/") and name.endswith((".py", ".pyi"))}
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("smq/")}
    assert tracked - packed == set()
    assert {"smq/server/app.py", "smq/client/sync.py", "smq/cli/main.py",
            "smq/forward/main.py"} <= packed
