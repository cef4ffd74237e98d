#!/usr/bin/env bash
# Train on 12 ict-faces identities and evaluate fits on the 4 held-out ones (ImFace++ §4.3 metrics).
# Usage: bash benchmarks/ict_heldout.sh [WORK_DIR] [TRAIN_STEPS]   (needs ../shared/datasets/ict-faces)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ICT="$ROOT/../shared/datasets/ict-faces"
WORK="${1:-$ROOT/runs/ict-heldout}"
STEPS="${2:-1600}"
PY="${PY:-$ROOT/.venv/bin/python}"
mkdir -p "$WORK/train_scans" "$WORK/heldout_scans"
# Two scan folders that point at the same meshes (absolute paths), split by identity.
"$PY" - "$ICT" "$WORK" <<'PY'
import json, sys
from pathlib import Path
ict, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
m = json.loads((ict / "manifest.json").read_text())
for name, keep in (("train_scans", lambda i: i < 12), ("heldout_scans", lambda i: i >= 12)):
    sub = dict(m, scans=[dict(s, path=str(ict / s["path"])) for s in m["scans"] if keep(int(s["identity"][2:]))])
    (work / name / "manifest.json").write_text(json.dumps(sub, indent=1))
PY
"$PY" -m backend.cli preprocess "$WORK/train_scans" --out "$WORK/train_samples"
"$PY" -m training.train --preset cpu --data "$WORK/train_samples" --out "$WORK/run" --steps "$STEPS" \
    --threads 1 --no-progress --resume 2>/dev/null \
  || "$PY" -m training.train --preset cpu --data "$WORK/train_samples" --out "$WORK/run" --steps "$STEPS" \
    --threads 1 --no-progress
"$PY" -m backend.cli evaluate "$WORK/run/model.safetensors" "$WORK/heldout_scans" --out "$WORK/heldout_table.md" \
    --threads 1 --resolution 128 --quiet
cat "$WORK/heldout_table.md"
