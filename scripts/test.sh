#!/usr/bin/env bash
# All tests: set-up, then pytest (arguments pass through). Exit code 5 (no tests ran) is a failure.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$PY" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests ran: failing"; exit 1; fi
exit "$rc"
