"""The experiment runner end to end on a tiny random testbed-format checkpoint: outputs, resume, bad flags."""

import json
import os
import subprocess
import sys
import tempfile

from absl import flags
import pytest

from experiments import run
from experiments import testbed
from models import saving

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint():
  hf = testbed.hf_config(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                         text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1))
  model = testbed.make_model(hf, seed=0)
  processor = testbed.make_processor(hf)
  with tempfile.TemporaryDirectory() as tmp:
    files, path = os.path.join(tmp, "files"), os.path.join(tmp, "ckpt")
    processor.save_pretrained(files)
    saving.save_pretrained(model, hf, path, tokenizer_dir=files)
    yield path


def _main(*args):
  argv = ["run"] + list(args)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    run.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()


def _rows(out):
  with open(os.path.join(out, "results.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_end_to_end_outputs(checkpoint, tmp_path, capsys):
  out = str(tmp_path / "out")
  _main(f"--checkpoint={checkpoint}", "--method=tops,random", "--keep_ratio=0.111", "--limit=10", "--batch_size=5",
        f"--output_dir={out}", "--pictures=2")
  printed = capsys.readouterr().out
  assert printed.index("resolved configuration") < printed.index("tops")  # the configuration is logged first
  rows = _rows(out)
  assert len(rows) == 3 * 10 and len({r["key"] for r in rows}) == 30
  by_run = {r["run"] for r in rows}
  assert by_run == {"full", "tops@T=20", "random@T=20"}
  tops_rows = [r for r in rows if r["method"] == "tops"]
  # TOPS schedule on a 4-layer decoder: Stage I keeps 2T = 40, layer 2 (12/32 * 4 rounds to 2) -> T, layer 3 -> T/4.
  assert all(r["kept_per_layer"] == [40.0, 40.0, 20.0, 5.0] for r in tops_rows), tops_rows[0]["kept_per_layer"]
  full = [r for r in rows if r["method"] == "full"]
  # The unpruned LLaVA-NeXT feeds every packed token, image_newline rows included, to each layer.
  assert all(len(set(r["kept_per_layer"])) == 1 and r["kept_per_layer"][0] > r["visual_tokens"] for r in full)
  assert all(t["prefill_flops"] < f["prefill_flops"] for t, f in zip(tops_rows, full))
  for name in ("summary_synthvqa.md", "relative_accuracy_synthvqa.png", "kept_tokens.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert "tops" in printed and "random" in printed


def test_resume_skips_finished_rows_and_repairs_a_torn_line(checkpoint, tmp_path):
  out = str(tmp_path / "out")
  common = [f"--checkpoint={checkpoint}", "--method=divprune", "--budget=12", "--batch_size=5", f"--output_dir={out}",
            "--pictures=0"]
  _main(*common, "--limit=5")
  first = _rows(out)
  assert len(first) == 2 * 5
  path = os.path.join(out, "results.jsonl")
  with open(path, "a") as f:
    f.write('{"key": "torn')  # a run killed mid-write
  _main(*common, "--limit=10")
  rows = _rows(out)
  assert len(rows) == 2 * 10 and len({r["key"] for r in rows}) == 20
  assert rows[:10] == first  # nothing recomputed or rewritten
  mtime = os.path.getmtime(path)
  _main(*common, "--limit=10")  # everything done: nothing appended
  assert len(_rows(out)) == 20 and os.path.getmtime(path) == mtime


@pytest.mark.parametrize("args,message", [
    (["--method=topz"], "unknown method(s) topz"),
    (["--budget=10", "--keep_ratio=0.1"], "--budget and --keep_ratio are exclusive"),
    (["--keep_ratio=1.5"], "--keep_ratio values must lie in (0, 1]"),
    (["--method=divprune", "--alpha=0.3"], "--alpha only affect tops"),
    (["--method=divprune", "--ablation"], "--ablation runs the TOPS criteria subsets"),
    (["--tasks=gqa"], "unknown task(s) gqa"),
    (["--budget=100000"], "exceeds"),
])
def test_inconsistent_flags_fail_at_start(checkpoint, tmp_path, args, message):
  with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
    _main(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", "--limit=2", *args)
  assert not os.path.exists(os.path.join(tmp_path, "results.jsonl"))


def test_unknown_flag_and_missing_checkpoint_exit_with_a_message(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  unknown = subprocess.run([sys.executable, "-m", "experiments.run", "--bugdet=10"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert unknown.returncode != 0 and "bugdet" in unknown.stderr
  missing = subprocess.run([sys.executable, "-m", "experiments.run", f"--checkpoint={tmp_path}/nothing"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "is not a directory" in missing.stderr
