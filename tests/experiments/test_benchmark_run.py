"""The runner on a benchmark task end to end: a llava-hf-layout LLaVA-NeXT checkpoint at the real 336-px geometry
(tiny widths, random weights, its tokenizer and processor files) and a POPE snapshot in the lmms-lab layout."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lmms_fixtures
import model_factories as mf
import runner_helpers
from experiments.runner import conversation
from experiments.runner import images
from experiments.runner import tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pope(root, n, size=(80, 106), config=None, split="test"):
  rows = [dict(id=str(i), question_id=str(100 + i), question=f" Is there a dog in the image {i}? ",
               answer="yes" if i % 2 else "no", image_source=f"COCO_val2014_{i:012d}",
               image=lmms_fixtures.image_cell(i, size), category=("adversarial", "popular", "random")[i % 3])
          for i in range(n)]
  lmms_fixtures.write_split(os.path.join(root, "POPE"), config, split, rows, lmms_fixtures.SCHEMAS["POPE"],
                            num_shards=2)
  return rows


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
  # 56-px crops (16 tokens each, the pinpoints scaled alike) keep the test fast; scripts/llava_next_pope.py runs the
  # real 336-px geometry.
  return str(mf.tiny_llava_hf(tmp_path_factory.mktemp("ckpt"), "llava_next", crop=56))


_main = runner_helpers.run_main
_rows = runner_helpers.read_rows


@pytest.mark.slow
def test_pope_on_llava_next_end_to_end_and_resume(next_ckpt, tmp_path, capsys):
  root = str(tmp_path / "data")
  _pope(root, 5)
  out = str(tmp_path / "out")
  args = [f"--backbone=llava_next", f"--checkpoint={next_ckpt}", "--tasks=pope", f"--data_dir={root}",
          "--method=divprune,tops", "--budget=8", "--limit=4", "--batch_size=2",
          "--max_new_tokens=3", f"--output_dir={out}", "--pictures=0", "--stage2_alpha=0.5", "--stage2_lam=0.5",
          "--overrides=divprune.scope=global"]       # exactly T per image (the official layout keeps a ratio)
  _main(*args)
  printed = capsys.readouterr().out
  rows = _rows(out)
  runs = {r["run"] for r in rows}
  assert runs == {"full", "divprune@T=8", "tops@T=8"}
  assert len(rows) == 3 * 4
  full = [r for r in rows if r["run"] == "full"]
  assert {r["question_id"] for r in full} == {"100", "101", "102", "103"}
  assert all(r["kl"] == 0 and r["nll_increase"] == 0 for r in full)
  pruned = [r for r in rows if r["run"] != "full"]
  assert all(r["kl"] >= -1e-6 and np.isfinite(r["nll_increase"]) for r in pruned)
  assert all(r["prompt"].startswith(conversation.VICUNA_SYSTEM + " USER: <image>\n") for r in rows)
  assert all(r["prompt"].endswith("Answer the question using a single word or phrase. ASSISTANT:") for r in rows)
  assert all(r["kept_per_layer"][0] == 16 and r["kept_per_layer"][-1] == 2 for r in pruned if "tops" in r["run"])
  assert all(r["kept_per_layer"] == [8.0] * 4 for r in pruned if "divprune" in r["run"])
  # Predictions per run, the task's table with POPE's metrics and the fidelity columns.
  with open(os.path.join(out, "predictions", "pope", "tops@T=8.jsonl")) as f:
    preds = [json.loads(line) for line in f]
  assert [set(p) for p in preds] == [{"question_id", "prompt", "prediction", "answer"}] * 4
  with open(os.path.join(out, "summary_pope.md")) as f:
    table = f.read()
  for column in ("f1", "accuracy", "KL", "dNLL", "tops"):
    assert column in table
  assert "pope (protocol lmms_eval, template vicuna_v1, images native)" in printed
  with open(os.path.join(out, "summary_benchmarks.md")) as f:
    relative = f.read()
  assert "tops@T=8: Rel (a) ratio of means, MME-P/20 (TOPS, CDPruner)" in relative and "over POPE" in relative
  # experiments.score re-scores the stored predictions without the model: the runner's metrics again.
  from experiments import score  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  pred_path = os.path.join(out, "predictions", "pope", "tops@T=8.jsonl")
  rescored = score.score(registry.TASKS["pope"], os.path.join(root, "POPE"), score.read_predictions(pred_path),
                         "lmms_eval")
  want = registry.TASKS["pope"].score([r for r in rows if r["run"] == "tops@T=8"], "lmms_eval")
  assert {k: v for k, v in rescored.items() if k not in ("scored", "missing")} == want
  assert rescored["scored"] == 4 and rescored["missing"] == 1          # the fifth question was past --limit
  cli = subprocess.run([sys.executable, "-m", "experiments.score", "--task=pope", f"--data_dir={root}/POPE",
                        f"--predictions={pred_path}"], cwd=REPO, capture_output=True, text=True, check=True)
  assert json.loads(cli.stdout) == rescored
  # A rerun computes nothing and writes the same table.
  mtime = os.path.getmtime(os.path.join(out, "results.jsonl"))
  _main(*args)
  assert len(_rows(out)) == 12 and os.path.getmtime(os.path.join(out, "results.jsonl")) == mtime
  # A re-downloaded snapshot (a shard with a new mtime) is evaluated afresh, never mixed with the old rows.
  shard = sorted(os.listdir(os.path.join(root, "POPE", "data")))[0]
  os.utime(os.path.join(root, "POPE", "data", shard), ns=(1, 1))
  _main(*args)
  assert len(_rows(out)) == 24


def test_benchmark_inputs_fail_clearly(next_ckpt, tmp_path):
  root = str(tmp_path / "data")
  os.makedirs(os.path.join(root, "MME"))
  common = [f"--backbone=llava_next", f"--checkpoint={next_ckpt}", f"--output_dir={tmp_path / 'o'}", "--limit=2",
            "--budget=8", "--method=divprune"]
  with pytest.raises(Exception, match="need --data_dir"):
    _main(*common, "--tasks=pope")
  with pytest.raises(Exception, match="no snapshot folder .*POPE"):
    _main(*common, "--tasks=pope,mme", f"--data_dir={root}")
  with pytest.raises(Exception, match="--conv_template must be one of"):
    _main(*common, "--tasks=pope", f"--data_dir={root}", "--conv_template=nonesuch")
  with pytest.raises(Exception, match="POPE.*test"):        # the folder exists, the split does not
    os.makedirs(os.path.join(root, "POPE"))
    _main(*common, "--tasks=pope", f"--data_dir={root}")
  assert not os.path.exists(os.path.join(tmp_path, "o", "results.jsonl")) or not _rows(str(tmp_path / "o"))


def test_fixed_672_and_pad_to_square():
  image = np.zeros((30, 50, 3), np.uint8) + 200
  square = images.expand2square(image, (10, 20, 30))
  assert square.shape == (50, 50, 3)
  assert (square[:10] == (10, 20, 30)).all() and (square[10:40] == 200).all() and (square[40:] == (10, 20, 30)).all()
  tall = images.expand2square(image.transpose(1, 0, 2), (1, 2, 3))
  assert tall.shape == (50, 50, 3) and (tall[:, :10] == (1, 2, 3)).all() and (tall[:, 10:40] == 200).all()
  assert images.prepare(image, "fixed_672").shape == (672, 672, 3)
  assert images.prepare(image, "pad", (0.5, 0.25, 1.0))[0, 0].tolist() == [127, 63, 255]


def test_task_dir_prefers_the_repository_folder(tmp_path):
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  task = registry.TASKS["pope"]
  os.makedirs(tmp_path / "POPE")
  assert tasks.task_dir(str(tmp_path), task, single=False) == str(tmp_path / "POPE")
  assert tasks.task_dir(str(tmp_path / "POPE"), task, single=True) == str(tmp_path / "POPE")
  with pytest.raises(ValueError, match="one folder per dataset repository"):
    tasks.task_dir(str(tmp_path / "POPE"), task, single=False)


def test_score_rejects_bad_prediction_files(tmp_path):
  from experiments import score  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "data")
  _pope(root, 3)
  bad = tmp_path / "p.jsonl"
  cases = [('{"question_id": "100"}\n', "p.jsonl:1: missing field 'prediction'"),
           ('{"question_id": "100", "prediction": "yes"}\n{"question_id": "100", "prediction": "no"}\n',
            "p.jsonl:2: question_id '100' is also on line 1"),
           ('not json\n', "p.jsonl:1")]
  for text, message in cases:
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
      score.read_predictions(str(bad))
  with pytest.raises(ValueError, match="not in pope's split"):
    score.score(registry.TASKS["pope"], os.path.join(root, "POPE"), {"999": "yes"}, "lmms_eval")


@pytest.mark.slow
def test_several_benchmarks_from_one_root_and_their_relative_summary(next_ckpt, tmp_path):
  """--data_dir=ROOT with ROOT/POPE and ROOT/MME: both tasks run, the relative summary covers POPE and MME."""
  root = str(tmp_path / "data")
  _pope(root, 2)
  mme = [dict(question_id=f"existence/{i // 2}.png", image=lmms_fixtures.image_cell(50 + i // 2, (80, 106)),
              question=f"Is there a dog? Please answer yes or no.", answer=("Yes", "No")[i % 2],
              category=("existence", "code_reasoning")[i // 2 % 2]) for i in range(4)]
  lmms_fixtures.write_split(os.path.join(root, "MME"), None, "test", mme, lmms_fixtures.SCHEMAS["MME"])
  out = str(tmp_path / "out")
  _main("--backbone=llava_next", f"--checkpoint={next_ckpt}", "--tasks=pope,mme", f"--data_dir={root}",
        "--method=divprune", "--budget=8", "--limit=4", "--batch_size=2", "--max_new_tokens=2",
        f"--output_dir={out}", "--pictures=0")
  rows = _rows(out)
  assert sorted({(r["task"], r["run"]) for r in rows}) == [("mme", "divprune@T=8"), ("mme", "full"),
                                                          ("pope", "divprune@T=8"), ("pope", "full")]
  mme_rows = [r for r in rows if r["task"] == "mme" and r["run"] == "full"]
  assert [r["question_id"] for r in sorted(mme_rows, key=lambda r: int(r["question_id"]))] == ["0", "1", "2", "3"]
  assert all(r["prompt"].endswith("Is there a dog?\nAnswer the question using a single word or phrase. ASSISTANT:")
             for r in mme_rows)      # lmms-eval deletes " Please answer yes or no." and adds the suffix
  with open(os.path.join(out, "summary_mme.md")) as f:
    assert "perception" in f.read()
  with open(os.path.join(out, "summary_benchmarks.md")) as f:
    relative = f.read()
  assert "divprune@T=8: Rel (b) mean of per-benchmark ratios, MME-P+C (VisionZip, DART)" in relative


@pytest.mark.slow
def test_pope_on_a_mesh_writes_the_one_device_rows(next_ckpt, tmp_path):
  """Benchmark tasks under a mesh (8 simulated devices: rows over data x fsdp, heads, MLP and vocabulary over
  tensor): the same rows (predictions, parsed answers, kept tokens, KL and NLL fidelity), hence the same task
  scores, as one device; only the timing fields differ."""
  root = str(tmp_path / "data")
  _pope(root, 8)
  args = [f"--backbone=llava_next", f"--checkpoint={next_ckpt}", "--tasks=pope", f"--data_dir={root}",
          "--method=tops", "--budget=8", "--limit=8", "--batch_size=8", "--max_new_tokens=2", "--pictures=0",
          "--stage2_alpha=0.5", "--stage2_lam=0.5"]
  _main(*args, f"--output_dir={tmp_path / 'one'}")
  _main(*args, f"--output_dir={tmp_path / 'mesh'}", "--mesh=data:2,fsdp:2,tensor:2")
  strip = lambda rows: [{k: (round(v, 4) if k in ("kl", "nll_increase") else v) for k, v in r.items()
                         if k not in ("prefill_ms", "process")} for r in rows]
  one, mesh = strip(_rows(str(tmp_path / "one"))), strip(_rows(str(tmp_path / "mesh")))
  assert len(one) == 16 and mesh == one
