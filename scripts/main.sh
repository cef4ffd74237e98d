#!/usr/bin/env bash
# The main job on the embedded default data: set-up, then `imface main` (arguments pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m backend.cli main "$@"
