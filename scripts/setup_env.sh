#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv: torch==2.13.0 first, pinned, so that no
# newer CUDA build is pulled in; then this package with its test extras. Safe to re-run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RECOKD_VENV:-$root/.venv}"
stamp="$venv/.recokd-installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    # the constraint keeps a dependency (nnunetv2 -> timm -> torchvision) from pulling another torch
    echo "torch==2.13.0" > "$venv/torch-constraint.txt"
    "$venv/bin/python" -m pip install --quiet -c "$venv/torch-constraint.txt" -e "$root[test]"
    touch "$stamp"
fi
