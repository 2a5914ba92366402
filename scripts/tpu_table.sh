#!/usr/bin/env bash
# BUILD.md's TPU table: the runner's programs for LLaVA-NeXT-7B and 13B compiled for v5e-8, v5p-8 and v6e-8 slices on
# this CPU (libtpu; no TPU, no network), then the tables. Resumes from OUT's rows (a killed run loses at most the
# program being compiled). About 80 min on a 2-core VM; `--smoke` compiles tiny-next on one slice (~1 min).
#   bash scripts/venv.sh tpu && OUT=/tmp/tpu bash scripts/tpu_table.sh     (VENV=DIR: another venv with the tpu set)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/tpu_table}"
mkdir -p "$out"
run() { PYTHONPATH=. "${VENV:-.venv}/bin/python" -m experiments.tpu_compile --backbone=llava_next --methods=full,tops,visionzip \
          --budgets=320 --batch_size=8 --output="$out/rows.jsonl" "$@"; }
if [ "${1:-}" = "--smoke" ]; then
  run --shape=tiny-next --topology=v5e:2x2 --mesh=fsdp+tensor --methods=full,tops --budgets=40 --dtype=float32 \
      --overrides=tops.stage2_alpha=0.5,tops.stage2_lam=0.5 --largest_batch_mesh=fsdp+tensor --largest_batch_methods=full \
      --largest_batch_tries=2
  exit 0
fi
# 7B on v5e-8: every mesh kind (data, fsdp, tensor, fsdp x tensor); the largest batch on fsdp.
run --shape=llava-next-7b --topology=v5e:2x4 --mesh=data --mesh=fsdp --mesh=tensor --mesh=fsdp+tensor \
    --largest_batch_mesh=fsdp --largest_batch_methods=full --largest_batch_tries=4
# Both shapes on the three slices: the meshes a user would pick (fsdp, fsdp x tensor); the largest batch on fsdp.
run --shape=llava-next-7b,llava-next-13b --topology=v5e:2x4,v5p:2x2x1,v6e:2x4 --mesh=fsdp --mesh=fsdp+tensor \
    --largest_batch_mesh=fsdp --largest_batch_methods=full --largest_batch_tries=3
