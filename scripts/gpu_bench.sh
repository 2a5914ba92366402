#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one run (BUILD.md "Speed"), for a lent device with a system Python that
# has jax (CUDA), flax, transformers and torch. From the repository root:
#
#   PYTHONPATH=. OUT=/tmp/out bash scripts/gpu_bench.sh            # LLaVA-NeXT-7B, then Qwen2.5-VL-7B; bf16, random
#   PYTHONPATH=. OUT=/tmp/out bash scripts/gpu_bench.sh --qwen     # only the Qwen2.5-VL-7B rows
#   PYTHONPATH=. OUT=/tmp/out bash scripts/gpu_bench.sh --smoke    # tiny shapes on any machine (checks the script)
#
# Writes $OUT/device.txt, $OUT/select.jsonl (selection passes alone), $OUT/e2e.jsonl + $OUT/e2e.md (the pipeline
# beside transformers), $OUT/e2e_qwen.jsonl + $OUT/e2e_qwen.md (Qwen2.5-VL-7B: one 1008 x 1008 image, 1,296 tokens,
# the full model, TOPS and DivPrune at T = 256 / 128; a method without a Qwen protocol is a "skipped" row with its
# reason). Rows are appended as they are measured, so a run cut short keeps what it measured. The cheapest and most
# important rows come first: batch 1, then batch 8.
set -euo pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false     # JAX and PyTorch share the GPU in one process
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
if [[ "${1:-}" == "--smoke" ]]; then
  $PY -m experiments.bench.selection --n=96 --keep=32 --d=64 --methods=tops,divprune --dtypes=float32 --eager= \
      --repeats=1 --output="$OUT/select.jsonl"
  $PY -m experiments.bench.e2e --smoke --output="$OUT/e2e.jsonl" | tee "$OUT/e2e.md"
  $PY -m experiments.bench.e2e --smoke --shape=tiny-qwen --output="$OUT/e2e_qwen.jsonl" | tee "$OUT/e2e_qwen.md"
  exit 0
fi
qwen() {
  $PY -m experiments.bench.e2e --shape=qwen2.5-vl-7b --dtype=bfloat16 --methods=tops,divprune --budgets=256,128 \
      --batch_sizes=1 --repeats=5 --decode_tokens=32 --output="$OUT/e2e_qwen.jsonl" | tee "$OUT/e2e_qwen.md"
}
if [[ "${1:-}" == "--qwen" ]]; then
  qwen
  exit 0
fi
# cuDNN flash attention against the one-call XLA path at NeXT-7B head shapes (bf16, no padding), before using it.
$PY - <<'PYEOF' 2>&1 | tee "$OUT/cudnn_check.txt"
import jax, jax.numpy as jnp
from models import attention
q, k, v = (jax.random.normal(jax.random.key(i), (1, 2954, 32, 128), jnp.bfloat16) for i in range(3))
valid = jnp.ones((1, 2954), bool)
try:
  a = attention.causal(q, k, v, valid, implementation="cudnn")
  b = attention.causal(q, k, v, valid, implementation="xla")
  print("cudnn vs xla max abs diff", float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))))
except Exception as e:  # pylint: disable=broad-except
  print("cudnn unavailable:", type(e).__name__, str(e)[:300])
PYEOF
# TOPS at T=320 on NeXT-7B runs 2880 -> 640, 640 -> 320, 320 -> 80: every pass, bf16 and float32 features.
$PY -m experiments.bench.selection --n=2880,640,320 --keep=640,320,80 --d=4096 --methods=tops,divprune,visionzip \
    --dtypes=bfloat16,float32 --eager= --repeats=5 --output="$OUT/select.jsonl"
$PY -m experiments.bench.e2e --shape=llava-next-7b --dtype=bfloat16 --methods=tops,visionzip --budgets=320 \
    --batch_sizes=1,8 --repeats=5 --decode_tokens=32 --output="$OUT/e2e.jsonl" | tee "$OUT/e2e.md"
# The same at batch 1 with cuDNN flash attention in the prefill (if the check above passed), transformers not rerun.
if grep -q "max abs diff" "$OUT/cudnn_check.txt"; then
  $PY -m experiments.bench.e2e --shape=llava-next-7b --dtype=bfloat16 --methods=tops,visionzip --budgets=320 \
      --batch_sizes=1 --repeats=5 --decode_tokens=32 --attention=cudnn --notorch --output="$OUT/e2e_cudnn.jsonl" \
      | tee "$OUT/e2e_cudnn.md"
fi
# Qwen2.5-VL-7B last (its own process).
qwen
