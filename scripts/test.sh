#!/usr/bin/env bash
# The test suite: sets up .venv on first use, then runs pytest on Testing/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${RECOKD_VENV:-$root/.venv}/bin/python" -m pytest Testing "$@"
