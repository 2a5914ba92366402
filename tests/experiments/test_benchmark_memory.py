"""The runner streams a benchmark split: its peak RSS does not grow with the number of examples.

Every question has the same length, so both runs compile the same programs: each new (sequence, text) length
bucket compiles one more program, which costs memory too (bounded by the buckets, not by the split), and would
blur what this test measures, the data."""

import os
import resource
import subprocess
import sys

import pytest

import lmms_fixtures
import model_factories as mf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = """
import resource, sys
from absl import app
from experiments import run
sys.argv = ["run"] + sys.argv[1:]
try:
  app.run(run.main)
except SystemExit as e:
  if e.code:
    raise
finally:
  print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def _peak_rss_kb(args, cwd) -> int:
  out = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=cwd, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return int(out.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0])


@pytest.mark.slow
def test_peak_rss_does_not_grow_from_20_to_200_examples(tmp_path):
  ckpt = mf.tiny_llava_hf(tmp_path / "ckpt", "llava", crop=56, text_layers=2)
  size = (320, 320)                 # 200 decoded images hold 61 MB, their PNGs about as much again
  rows = [dict(id=str(i), question_id=str(i), question="Is there a cat?", answer="yes" if i % 2 else "no",
               image_source="", image=lmms_fixtures.image_cell(i, size),
               category=("adversarial", "popular", "random")[i % 3]) for i in range(200)]
  root = tmp_path / "data"
  lmms_fixtures.write_split(str(root / "POPE"), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"], num_shards=4,
                            row_group_size=16)
  common = ["--backbone=llava_1_5", f"--checkpoint={ckpt}", "--tasks=pope", f"--data_dir={root}",
            "--method=divprune", "--budget=8", "--batch_size=4", "--max_new_tokens=1", "--pictures=0"]
  small = _peak_rss_kb(common + ["--limit=20", f"--output_dir={tmp_path / 'o20'}"], REPO)
  large = _peak_rss_kb(common + ["--limit=200", f"--output_dir={tmp_path / 'o200'}"], REPO)
  grown_mb = (large - small) / 1024
  assert grown_mb < 25, f"peak RSS grew by {grown_mb:.1f} MB from 20 to 200 examples ({small} -> {large} kB)"
