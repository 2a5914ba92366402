"""The runner's CDPruner end to end: a llava-hf LLaVA-NeXT checkpoint (tiny widths, 56 px crops of 16 tokens, its
tokenizer and processor files), a POPE snapshot in the lmms-lab layout and a tiny CLIP checkpoint whose vision width
is the LLaVA tower's (CDPruner's image head reads that tower's layer -2 features)."""

import os

import numpy as np
import pytest

import clip_factories
import lmms_fixtures
import model_factories as mf
import runner_helpers

BUDGET = 10                    # 10 // 5 = 2 tokens per crop


def _pope(root, n):
  rows = [dict(id=str(i), question_id=str(100 + i), question=f"Is there a dog in the image {i}?",
               answer="yes" if i % 2 else "no", image_source=f"COCO_val2014_{i:012d}",
               image=lmms_fixtures.image_cell(i, (80, 106)), category="random") for i in range(n)]
  lmms_fixtures.write_split(os.path.join(root, "POPE"), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(llava-hf checkpoint, CLIP checkpoint, data root)."""
  base = tmp_path_factory.mktemp("cdpruner")
  ckpt = mf.tiny_llava_hf(base, "llava_next", crop=56)
  clip = clip_factories.tiny_clip(base / "clip", vision_hidden_size=32)   # tiny_llava_hf's vision width
  root = str(base / "data")
  _pope(root, 3)
  return str(ckpt), str(clip), root


def _args(setup, out):
  ckpt, _, root = setup
  return ["--backbone=llava_next", f"--checkpoint={ckpt}", "--tasks=pope", f"--data_dir={root}", "--method=cdpruner",
          f"--budget={BUDGET}", "--limit=2", "--batch_size=2", "--max_new_tokens=2", f"--output_dir={out}",
          "--pictures=0"]


@pytest.mark.slow
def test_cdpruner_with_clip_checkpoint_writes_rows_under_its_name(setup, tmp_path, capsys):
  _, clip, _ = setup
  out = str(tmp_path / "out")
  runner_helpers.run_main(*_args(setup, out), f"--clip_checkpoint={clip}")
  assert clip in capsys.readouterr().out                     # the resolved configuration records the checkpoint
  rows = runner_helpers.read_rows(out)
  assert sorted((r["run"], r["method"]) for r in rows) == [
      (f"cdpruner@T={BUDGET}", "cdpruner")] * 2 + [("full", "full")] * 2
  assert {r["question_id"] for r in rows} == {"100", "101"}
  pruned = [r for r in rows if r["run"] != "full"]
  assert all(np.isfinite(r["nll_increase"]) and r["kl"] >= -1e-6 for r in pruned)
  assert all(r["kept_per_layer"][0] < 0.5 * r_full["kept_per_layer"][0]
             for r, r_full in zip(sorted(pruned, key=lambda r: r["question_id"]),
                                  sorted([r for r in rows if r["run"] == "full"], key=lambda r: r["question_id"])))
  assert os.path.exists(os.path.join(out, "predictions", "pope", f"cdpruner@T={BUDGET}.jsonl"))
  assert not os.path.exists(os.path.join(out, "predictions", "pope", f"cdpruner-text@T={BUDGET}.jsonl"))
  # A CLIP checkpoint replaced at the same path (here: its weights file rewritten, a new mtime) is a new setting of
  # the CDPruner rows, which are evaluated again; the full model's rows do not read CLIP and keep their keys.
  weights = os.path.join(clip, "model.safetensors")
  os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
  runner_helpers.run_main(*_args(setup, out), f"--clip_checkpoint={clip}")
  again = runner_helpers.read_rows(out)
  assert again[:4] == rows and len(again) == 6
  assert sorted(r["run"] for r in again[4:]) == [f"cdpruner@T={BUDGET}"] * 2
  assert {r["key"].split("/")[0] for r in again[4:]}.isdisjoint(r["key"].split("/")[0] for r in rows)


def test_cdpruner_without_clip_checkpoint_fails_at_start(setup, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(Exception, match="--clip_checkpoint"):
    runner_helpers.run_main(*_args(setup, str(out)))
  assert not os.path.exists(out / "results.jsonl")


def test_a_clip_checkpoint_of_another_width_fails_at_start(setup, tmp_path):
  out = tmp_path / "out"
  clip = clip_factories.tiny_clip(tmp_path / "clip48", vision_hidden_size=48)     # the LLaVA tower is 32 wide
  with pytest.raises(Exception, match=rf"--clip_checkpoint {clip}: its image head .* reads 48-wide vision features, "
                                      r"and the checkpoint's vision tower gives 32-wide ones"):
    runner_helpers.run_main(*_args(setup, str(out)), f"--clip_checkpoint={clip}")
  assert not os.path.exists(out / "results.jsonl")


@pytest.mark.slow
def test_the_default_all_without_clip_checkpoint_runs_the_rest_and_lists_cdpruner(setup, tmp_path, capsys):
  out = str(tmp_path / "out")
  args = [a for a in _args(setup, out) if not a.startswith("--method=")]
  runner_helpers.run_main(*args, "--limit=1", "--stage2_alpha=0.5", "--stage2_lam=0.5")   # 4 layers: no paper pair
  printed = capsys.readouterr().out
  assert f'"cdpruner@T={BUDGET}: cdpruner\'s relevance is CLIP\'s text tower' in printed     # the resolved skipped runs
  runs = {r["run"] for r in runner_helpers.read_rows(out)}
  assert {"full", f"tops@T={BUDGET}", f"divprune@T={BUDGET}"} <= runs and not any("cdpruner" in r for r in runs)
