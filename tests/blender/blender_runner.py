"""Run Blender code in its own process (never in the pytest process, which imports torch).

`run_blender(script, args)` starts the project's Python (which has `bpy`, installed by
scripts/setup_blender.sh) on `bl_scripts/harness.py`: it points BLENDER_USER_RESOURCES at a temporary
folder, imports bpy, installs the BUILT extension zip offline into the "user_default" repository,
enables it, runs `bl_scripts/<script>` with `ARGS` and a `RESULT` dict in its globals, disables the
extension (which unregisters every handler and timer), checks `torch` is not in `sys.modules` and
prints RESULT as one JSON line. The pytest side asserts on the values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "bl_scripts"
MARK = "@@IMFACE_RESULT@@"


def blender_python() -> str:
    """The interpreter with bpy: IMFACE_BLENDER_PYTHON, else the project's .venv, else this one."""
    env = os.environ.get("IMFACE_BLENDER_PYTHON")
    if env:
        return env
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def has_bpy(python: str | None = None) -> bool:
    code = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('bpy') else 1)"
    return subprocess.run([python or blender_python(), "-c", code]).returncode == 0


class BlenderError(AssertionError):
    pass


def run_blender(script: str, args: dict | None = None, *, zip_path: str | Path, user_dir: str | Path | None = None,
                timeout: float = 600, env: dict | None = None) -> dict:
    """Run bl_scripts/<script> inside Blender (module mode) and return its RESULT dict."""
    with tempfile.TemporaryDirectory(prefix="imface_bl_") as tmp:
        user = Path(user_dir) if user_dir else Path(tmp) / "user"
        user.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update({
            "BLENDER_USER_RESOURCES": str(user),
            "IMFACE_TEST_ARGS": json.dumps({"zip": str(zip_path), "script": str(SCRIPTS / script),
                                            "tmp": tmp, **(args or {})}),
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        # The repository must not be importable from the Blender process: the add-on is loaded only
        # from the installed zip, as bl_ext.user_default.imface.
        full_env.pop("PYTHONPATH", None)
        full_env.update(env or {})
        proc = subprocess.run([blender_python(), str(SCRIPTS / "harness.py")], cwd=tmp, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    out = proc.stdout
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(MARK)), None)
    if line is None:
        raise BlenderError(f"Blender script {script} gave no result (exit {proc.returncode})\n"
                           f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    result = json.loads(line[len(MARK):])
    result["_stdout"] = out[-4000:]
    result["_stderr"] = proc.stderr[-4000:]
    result["_returncode"] = proc.returncode
    if result.get("error"):
        raise BlenderError(f"Blender script {script} failed:\n{result['error']}\n"
                           f"--- stderr ---\n{proc.stderr[-4000:]}")
    return result
