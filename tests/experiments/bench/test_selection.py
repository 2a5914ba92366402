"""The selection benchmark runs at tiny sizes and times TOPS' two coverage engines side by side on the same picks."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_engines_side_by_side(tmp_path):
  out = tmp_path / "rows.jsonl"
  subprocess.run([sys.executable, "-m", "experiments.bench.selection", "--n=64", "--keep=16", "--d=16",
                  "--methods=tops,scope,divprune", "--dtypes=float32", "--eager=numpy", "--engines=incremental,dense",
                  "--repeats=1", f"--output={out}"], check=True, capture_output=True, text=True)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["method"], r.get("engine")) for r in rows] == [("tops", "incremental"), ("tops", "dense"),
                                                           ("scope", "incremental"), ("scope", "dense"),
                                                           ("divprune", None)]
  assert all(r["same_picks"] for r in rows if r.get("engine") == "dense")
  assert rows[0]["numpy_overlap"] == 1.0      # the eager peer-style loop keeps the same tokens
