"""Fixtures of the Blender tests: the built extension zip (once per session) and the runner."""
from __future__ import annotations

import json
import subprocess

import pytest

from blender_runner import REPO, blender_python, has_bpy


@pytest.fixture(scope="session")
def bpy_python() -> str:
    py = blender_python()
    if not has_bpy(py):
        pytest.skip("bpy is not installed (bash scripts/setup_blender.sh)")
    return py


@pytest.fixture(scope="session")
def built_zip(bpy_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """scripts/build_extension.py --host-only: wheels from build/wheel-cache (downloaded once),
    Blender's validate + build; the zip lands in a temporary folder."""
    out = tmp_path_factory.mktemp("extension")
    proc = subprocess.run([bpy_python, str(REPO / "scripts" / "build_extension.py"), "--host-only", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stderr
    return result
