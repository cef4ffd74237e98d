#!/usr/bin/env bash
# The training-quality report (docs/training-quality.md): held-out tables for the cpu and quality presets
# trained on 12 ict-faces people (and quality on 100 generated people), expression capture per expression
# on training scans and held-out fits, the fitting-schedule comparison, the detail field at the wrinkles.
# Report only: hours on a CPU. Every run and folder stays in WORK (outside the repository).
#
#   bash benchmarks/quality_report.sh WORK [STEP...]
#   steps: cpu quality capture schedule people100 detail   (default: all, in that order)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
ICT="$ROOT/../shared/datasets/ict-faces"
WORK="${1:?usage: quality_report.sh WORK [cpu|quality|capture|schedule|people100|detail ...]}"
shift
if [ $# -gt 0 ]; then STEPS=("$@"); else STEPS=(cpu quality capture schedule people100 detail); fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
case "$WORK/" in "$ROOT"/*) echo "WORK must be outside the repository" >&2; exit 2;; esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Every table is measured with the pinned evaluation settings (backend.evaluate.EVAL_SETTINGS: marching
# cubes 256³, 200,000 points per mesh, the 80 mm ball around the nose tip) and the default fast schedule.
EVAL=(--threads 1 --quiet)
# Schedule comparison on the most-moving expression only: plain's 1,500 steps cost ~40x the fast fit per scan.
SCHEDULE_EXPRESSIONS=(jaw_open)

split() {  # split ICT-like folder $1 into $2/train_scans (identities < $3) and $2/heldout_scans (the rest, < $4)
  "$PY" - "$1" "$2" "$3" "$4" <<'PY'
import json, sys
from pathlib import Path
src, work, n_train, n_all = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = json.loads((src / "manifest.json").read_text())
for name, keep in (("train_scans", lambda i: i < n_train), ("heldout_scans", lambda i: n_train <= i < n_all)):
    (work / name).mkdir(parents=True, exist_ok=True)
    sub = dict(m, scans=[dict(s, path=str(src / s["path"])) for s in m["scans"] if keep(int(s["identity"][2:]))])
    (work / name / "manifest.json").write_text(json.dumps(sub, indent=1))
PY
}

train_eval() {  # preset, work dir [, preprocess options]
  local preset="$1" dir="$2"; shift 2
  "$PY" -m backend.cli preprocess "$dir/train_scans" --out "$dir/train_samples" "$@"   # cached per scan
  "$PY" -m training.train --preset "$preset" --data "$dir/train_samples" --out "$dir/run_$preset" --no-progress \
      --resume 2>/dev/null \
    || "$PY" -m training.train --preset "$preset" --data "$dir/train_samples" --out "$dir/run_$preset" --no-progress
  "$PY" -m backend.cli evaluate "$dir/run_$preset/model.safetensors" "$dir/heldout_scans" \
      --out "$dir/heldout_$preset.md" "${EVAL[@]}"
  echo "## held-out, $preset preset ($dir)"; cat "$dir/heldout_$preset.md"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    cpu|quality)
      split "$ICT" "$WORK/ict12" 12 16
      train_eval "$step" "$WORK/ict12" ;;
    capture)
      for preset in cpu quality; do
        [ -f "$WORK/ict12/run_$preset/model.safetensors" ] || continue
        echo "## expression capture, $preset preset"
        "$PY" benchmarks/bench_capture.py --model "$WORK/ict12/run_$preset/model.safetensors" \
          --train-scans "$WORK/ict12/train_scans" --people id00 id01 id02 id03 \
          --json "$WORK/capture_$preset.json"
        # held-out capture per expression: the "mean: expression ..." rows of heldout_$preset.md (fits with pose)
      done ;;
    schedule)
      # cpu preset trained on id00-id09; choose on id10-id11, report on id12-id15
      split "$ICT" "$WORK/ict10" 10 16
      "$PY" -m backend.cli preprocess "$WORK/ict10/train_scans" --out "$WORK/ict10/train_samples"
      [ -f "$WORK/ict10/run_cpu/model.safetensors" ] || "$PY" -m training.train --preset cpu \
          --data "$WORK/ict10/train_samples" --out "$WORK/ict10/run_cpu" --no-progress --overwrite
      "$PY" benchmarks/bench_fit_schedule.py --model "$WORK/ict10/run_cpu/model.safetensors" --scans "$ICT" \
          --validation id10 id11 --test id12 id13 id14 id15 --expressions "${SCHEDULE_EXPRESSIONS[@]}" ;;
    people100)
      # 100 + 4 people generated with another seed than ict-faces' 7 (outside the repository)
      [ -f "$WORK/ict104/manifest.json" ] || "$PY" "$ROOT/../shared/tools/make_ict_faces.py" \
          --out "$WORK/ict104" --identities 104 --seed 11
      split "$WORK/ict104" "$WORK/people100" 100 104
      train_eval quality "$WORK/people100" --samples 100000   # 1,200 scans: 100k samples each keep it in RAM
      "$PY" -m backend.cli evaluate "$WORK/people100/run_quality/model.safetensors" "$WORK/ict12/heldout_scans" \
          --out "$WORK/people100/heldout_ict.md" "${EVAL[@]}"
      echo "## quality preset trained on 100 people, held-out ict-faces id12-id15"; cat "$WORK/people100/heldout_ict.md" ;;
    detail)
      "$PY" benchmarks/bench_detail.py --stage-two 300 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
