#!/usr/bin/env bash
# Refreshes the locks from pyproject.toml and lock/*.in: lock/test.txt (runtime + test extra), lock/runtime.txt
# (the runtime set, pinned to the same versions) and lock/tpu.txt (the test set + the tpu extra: libtpu). Exact versions and sha256 hashes of every distribution of each
# pinned version; target CPython 3.11 on Linux x86-64 (the project's machines).
#   bash scripts/lock.sh              keep today's pins, add/drop only what pyproject.toml or lock/*.in changed
#   bash scripts/lock.sh --upgrade    move every package to the newest release the ranges admit
#   bash scripts/lock.sh --upgrade-package transformers   move one package
# The resolver is uv at a fixed version, installed into a cache folder outside .venv (never part of the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
uv_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tops-jax/uv-$uv_version"
[ -x "$uv_dir/bin/uv" ] || "${PYTHON:-python3}" -m pip install -q --target "$uv_dir" "uv==$uv_version"
# The CPU build of torch is not on PyPI; this machine image keeps it in a local wheel folder (pip.conf find-links).
wheels="${WHEELS:-/opt/wheels}"
links=()
[ -d "$wheels" ] && links=(--find-links "$wheels")
common=(--generate-hashes --python-version 3.11 "${links[@]}" --custom-compile-command "bash scripts/lock.sh"
        -c lock/constraints.in)
linux=(--python-platform x86_64-manylinux_2_28)
"$uv_dir/bin/uv" pip compile pyproject.toml lock/tools.in --extra test "${common[@]}" "${linux[@]}" "$@" -o lock/test.txt
"$uv_dir/bin/uv" pip compile pyproject.toml lock/tools.in -c lock/test.txt "${common[@]}" "${linux[@]}" \
  -o lock/runtime.txt
# The tpu set: the test set at its versions plus jax's tpu extra (libtpu, pinned by jax to its build). libtpu's
# wheels are manylinux_2_31, so this lock targets that glibc (the other pins are the test lock's).
"$uv_dir/bin/uv" pip compile pyproject.toml lock/tools.in --extra test --extra tpu -c lock/test.txt \
  "${common[@]}" --python-platform x86_64-manylinux_2_31 -o lock/tpu.txt
