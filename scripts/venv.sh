#!/usr/bin/env bash
# Creates or updates the project's virtual environment in .venv.
#   bash scripts/venv.sh         runtime dependencies (the main job)
#   bash scripts/venv.sh test    plus the test/reference extra (pytest, CPU torch)
# Re-installs only when pyproject.toml or the requested extra changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extra:-base}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "$spec"
  touch "$stamp"
fi
