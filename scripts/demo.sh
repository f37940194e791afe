#!/usr/bin/env bash
# The main job on the built-in phantom: sets up .venv on first use, then runs `recokd demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
exec "${RECOKD_VENV:-$root/.venv}/bin/recokd" demo "$@"
