#!/usr/bin/env bash
# Sourced by main.sh and test.sh: makes .venv (once) and installs the project into it.
# Torch: an interpreter that already has torch (e.g. your own CUDA build) is reused through
# --system-site-packages; otherwise the CPU pin IMFACE_TORCH (default torch==2.13.0) is installed
# before anything else, so that no dependency pulls a multi-GB CUDA torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMFACE_VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PY" -c "import torch" 2>/dev/null; then
    echo "[setup] reusing the torch of $BASE_PY"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${IMFACE_TORCH:-torch==2.13.0}"
  "$PY" -m pip install --quiet "${IMFACE_TORCH:-torch==2.13.0}"
fi
STAMP="$VENV/.imface-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing the project and its dependencies"
  "$PY" -m pip install --quiet -e "$ROOT[test]"
  touch "$STAMP"
fi
# Blender as a Python module, for the extension's build, its tests and the main job (once, ~370 MB).
bash "$ROOT/scripts/setup_blender.sh"
export PATH="$VENV/bin:$PATH"
