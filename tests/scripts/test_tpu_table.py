"""scripts/tpu_table.sh --smoke: the BUILD.md TPU table's command end to end on tiny-next (libtpu compiles)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.tpu
def test_the_smoke_sweep_writes_rows_tables_and_a_largest_batch(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), VENV=os.path.dirname(os.path.dirname(sys.executable)))
  done = subprocess.run(["bash", "scripts/tpu_table.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
  runs = [r for r in rows if r.get("kind", "run") == "run" and r["batch"] == 8]
  assert {(r["mesh"], r["method"], r["program"]) for r in runs} == {
      ("fsdp:2,tensor:2", method, p) for method in ("full", "tops") for p in ("prefill", "decode_step")}
  assert all("error" not in r and r["fits"] for r in runs)
  largest = [r for r in rows if r.get("kind") == "largest_batch"]
  assert len(largest) == 1 and largest[0]["largest"] >= 16 and largest[0]["compiles"] <= 2
  assert "tops@40 / full TFLOPs" in done.stdout and "largest batch that fits" in done.stdout
