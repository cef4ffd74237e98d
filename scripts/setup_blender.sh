#!/usr/bin/env bash
# Installs Blender as a Python module (bpy, pinned) into the project's virtual environment, once.
# The Blender tests (tests/blender/) and the extension build (scripts/build_extension.py) need it;
# they run bpy in their own subprocess, never inside the pytest process (which imports torch).
# Override the pin with IMFACE_BPY (e.g. IMFACE_BPY="bpy==4.2.23" in a separate venv for 4.2 LTS).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMFACE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PIN="${IMFACE_BPY:-bpy==5.0.1}"
WANT="${PIN#bpy==}"
if [ ! -x "$PY" ]; then
  echo "[setup_blender] no virtual environment at $VENV (run scripts/setup_env.sh first)" >&2
  exit 1
fi
HAVE="$("$PY" - <<'PY' 2>/dev/null || true
from importlib import metadata
try:
    print(metadata.version("bpy"))
except metadata.PackageNotFoundError:
    pass
PY
)"
if [ "$HAVE" = "$WANT" ]; then
  exit 0
fi
echo "[setup_blender] installing $PIN into $VENV (about 370 MB download, once)"
# bpy 5.0 pins numpy<2, which matches the project's own pin, so this never moves numpy.
"$PY" -m pip install --quiet "$PIN"
