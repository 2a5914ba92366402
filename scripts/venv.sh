#!/usr/bin/env bash
# Creates or updates the project's virtual environment from the lock (exact versions, sha256-checked).
#   bash scripts/venv.sh         runtime set: lock/runtime.txt (the main job)
#   bash scripts/venv.sh test    plus the test/reference extra: lock/test.txt (pytest, CPU torch)
#   bash scripts/venv.sh tpu     plus libtpu: lock/tpu.txt (the test set + the tpu extra; experiments.tpu_compile and
#                                the tests marked tpu; about 0.5 GB more, so not part of the two sets above)
# Installs only when the requested lock changed since the last install, removes packages outside the lock, and
# fails naming every package that still differs from the lock (scripts/env_check.py). A venv set up for tests also
# serves the main job (the test lock pins the runtime set to the same versions), and a tpu venv both (its lock pins
# the test set to the same versions): the smaller sets tolerate the tpu lock's packages instead of removing them.
# VENV=DIR picks another folder (default .venv); PYTHON=... the interpreter that creates it (CPython 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-runtime}"
case "$mode" in
  runtime) lock=lock/runtime.txt; also=(--also lock/tpu.txt) ;;
  test) lock=lock/test.txt; also=(--also lock/tpu.txt) ;;
  tpu) lock=lock/tpu.txt; also=() ;;
  *) echo "scripts/venv.sh: unknown set '$mode' (expected no argument, 'test' or 'tpu')" >&2; exit 2 ;;
esac
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys, platform
ok = sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"
sys.exit(0 if ok else "the lock is for CPython 3.11 on Linux x86-64; this is Python %d.%d on %s %s (set PYTHON=...)"
         % (sys.version_info[0], sys.version_info[1], sys.platform, platform.machine()))'
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
stamp="$venv/.lock-$(sha256sum "$lock" pyproject.toml | sha256sum | cut -c1-16)-$mode"
if [ ! -e "$stamp" ] || ! "$vpy" scripts/env_check.py "$lock" "${also[@]}" 2>/dev/null; then
  log="$venv/install.log"
  # pip's output goes to a log (this machine's pip.conf makes it warn about every local index folder it skips);
  # it is printed when a step fails.
  run() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; echo "scripts/venv.sh: failed: $*" >&2; exit 1; }; }
  : >"$log"
  run "$vpy" -m pip install --require-hashes --no-deps -r "$lock"
  extraneous="$("$vpy" scripts/env_check.py "$lock" "${also[@]}" --extraneous)"
  # shellcheck disable=SC2086  # a list of package names
  [ -z "$extraneous" ] || run "$vpy" -m pip uninstall -y $extraneous
  run "$vpy" -m pip install --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
"$vpy" scripts/env_check.py "$lock" "${also[@]}"
