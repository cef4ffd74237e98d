#!/usr/bin/env bash
# The main job on the embedded default data, the whole product headless: set-up; `imface main` (default
# scans -> samples -> the trained cpu-preset model, reused when already there; arguments pass through);
# then the backend serves that model and Blender (bpy) installs the built extension, animates a face,
# bakes it and renders frames plus a contact sheet into OUT/blender.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$PY" -m backend.cli main "$@"
OUT="runs/default"
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --out) OUT="${args[$((i + 1))]}" ;;
    --out=*) OUT="${args[$i]#--out=}" ;;
  esac
done
MODEL="$OUT/train/model.safetensors"
if [ ! -f "$MODEL" ]; then
  echo "[main] no trained model at $MODEL (training skipped): not starting the backend and Blender"
  exit 0
fi
exec "$PY" scripts/blender_main_job.py --model "$MODEL" --out "$OUT/blender"
