"""The experiment runner end to end on a tiny random testbed-format checkpoint: outputs, resume, bad flags."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags
import numpy as np
from PIL import Image
import pytest

import runner_helpers

from experiments import testbed
from experiments.benchmarks import base
from experiments.runner import evaluate
from experiments.runner import plan
from experiments.runner import results
from experiments.runner import tasks
from experiments.synthvqa import vqa
from models import pruning
from models import saving

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


_main = runner_helpers.run_main
_rows = runner_helpers.read_rows


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--method=topz"], "unknown method(s) topz"),
    (["--budget=10", "--keep_ratio=0.1"], "--budget and --keep_ratio are exclusive"),
    (["--keep_ratio=1.5"], "--keep_ratio values must lie in (0, 1]"),
    (["--method=divprune", "--alpha=0.3"], "--alpha only affect tops"),
    (["--method=divprune", "--ablation"], "--ablation runs the TOPS criteria subsets"),
    (["--tasks=nosuchtask"], "unknown task(s) nosuchtask"),
    (["--tasks="], "--tasks is empty: name at least one task"),
    (["--method=tops", "--alpha=0.3", "--overrides=tops.stage1_alpha=0.7"],
     "--alpha=0.3 and --overrides=tops.stage1_alpha=0.7 set the same tops setting: give one"),
    (["--tasks=pope"], "need a hub checkpoint"),
    (["--protocol=llava"], "--protocol applies to the benchmark tasks only"),
    (["--budget=100000"], "exceeds"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1 (or unset for the backbone's 1), got 0"),
    (["--max_new_tokens=-3"], "--max_new_tokens must be >= 1 (or unset for the backbone's 1), got -3"),
    (["--method=tops", "--alpha=nan"], "tops: alpha must be finite, got nan"),
    (["--method=tops", "--lam=inf"], "tops: lam must be finite, got inf"),
    (["--method=tops", "--stage2_alpha=nan", "--stage2_lam=0.5"], "tops: alpha must be finite, got nan"),
])
def test_inconsistent_flags_fail_at_start(checkpoint, tmp_path, args, message):
  with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
    _main(f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}", "--limit=2", *args)
  assert not os.path.exists(os.path.join(tmp_path, "results.jsonl"))


@pytest.mark.slow
def test_unknown_flag_and_missing_checkpoint_exit_with_a_message(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  unknown = subprocess.run([sys.executable, "-m", "experiments.run", "--bugdet=10"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert unknown.returncode != 0 and "bugdet" in unknown.stderr
  missing = subprocess.run([sys.executable, "-m", "experiments.run", f"--checkpoint={tmp_path}/nothing"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "is not a directory" in missing.stderr


# --- results are never lost, mixed or stale ---------------------------------------------------------------------------

def _table(printed, task="synthvqa"):
  """The printed summary of `task`: {method: its table line's cells}, and the footnote lines."""
  block = printed[printed.rindex(f"\n{task} ("):].split("\n\n")[0].splitlines()[3:]
  body = [ln for ln in block if not ln.startswith("*") and not ln.startswith("results:")]
  return {ln.split()[0]: ln.split() for ln in body}, [ln for ln in block if ln.startswith("*")]


@pytest.mark.slow
def test_table_holds_only_this_invocations_rows_and_flags_mixed_timings(checkpoint, tmp_path, capsys):
  out = str(tmp_path / "out")
  common = [f"--checkpoint={checkpoint}", "--method=divprune", "--budget=12", "--batch_size=2", f"--output_dir={out}",
            "--pictures=0"]
  _main(*common, "--limit=2")
  table, notes = _table(capsys.readouterr().out)
  assert table["full"][2] == "2" and table["divprune"][2] == "2" and notes == []
  _main(*common, "--limit=4")  # resumes: 2 rows per run from the first process, 2 from this one
  printed = capsys.readouterr().out
  table, notes = _table(printed)
  assert "(4 examples;" in printed and table["divprune"][2] == "4"
  assert table["divprune"][-1].endswith("*") and notes == [
      "* time mixes prefill timings from 2 runner processes (a resumed run); for comparable times, run into a fresh "
      "--output_dir."]
  assert len({r["process"] for r in _rows(out)}) == 2
  _main(*common, "--limit=2")  # a smaller limit: the 2-example table again, timed by one process
  printed = capsys.readouterr().out
  table, notes = _table(printed)
  assert "(2 examples;" in printed and table["full"][2] == "2" and table["divprune"][2] == "2" and notes == []
  with open(os.path.join(out, "summary_synthvqa.md")) as f:
    assert [ln.split("|")[3].strip() for ln in f if ln.startswith("| divprune")] == ["2"]
  assert len(_rows(out)) == 2 * 4


@pytest.mark.slow
def test_rows_are_not_reused_across_settings_that_change_them(checkpoint, tmp_path):
  out = str(tmp_path / "out")
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(checkpoint, ckpt)
  common = [f"--checkpoint={ckpt}", "--method=divprune", "--budget=12", "--limit=2", f"--output_dir={out}",
            "--pictures=0"]
  _main(*common, "--batch_size=2")
  _main(*common, "--batch_size=2")  # identical: every row reused
  assert len(_rows(out)) == 2 * 2
  _main(*common, "--batch_size=1")
  assert len(_rows(out)) == 2 * 4
  _main(*common, "--batch_size=1", "--max_new_tokens=2")
  assert len(_rows(out)) == 2 * 6
  weights = os.path.join(ckpt, "model.safetensors")  # retrained in place: same path, new file
  os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
  _main(*common, "--batch_size=1")
  rows = _rows(out)
  assert len(rows) == 2 * 8 and len({r["key"] for r in rows}) == 16
  assert len({r["key"].split("/", 1)[0] for r in rows}) == 4 * 2   # 4 settings x (full, divprune)


def test_random_rows_follow_the_examples_order_and_the_rest_do_not():
  resolved = dict(backbone="testbed", checkpoint="c", checkpoint_fingerprint="f", data_dir=None, split="test", seed=0,
                  max_new_tokens=1, batch_size=2)
  items = [f"e{i}" for i in range(3)]      # the in-memory task's example ids, in order
  # random draws fold_in(fold_in(seed, batch), row): an example's draw follows its position.
  random = plan.RunSpec("random", 12, None, pruning.PruningConfig.flat("random", stage1_budget=12), "random")
  divprune = plan.RunSpec("divprune", 12, None, pruning.PruningConfig.flat("divprune", stage1_budget=12), "divprune")
  assert evaluate.run_hash(resolved, random, "t", items) != evaluate.run_hash(resolved, random, "t", items[::-1])
  assert evaluate.run_hash(resolved, divprune, "t", items) == evaluate.run_hash(resolved, divprune, "t", items[::-1])
  for field, value in (("max_new_tokens", 2), ("batch_size", 3), ("checkpoint_fingerprint", "g")):
    assert evaluate.run_hash(dict(resolved, **{field: value}), divprune, "t", items) != evaluate.run_hash(
        resolved, divprune, "t", items), field


@pytest.mark.slow
def test_a_second_run_into_a_locked_output_dir_fails_at_once_naming_the_holder(tmp_path, monkeypatch):
  """Before anything is loaded (the checkpoint here does not even exist), with the holder's pid and no traceback."""
  out = str(tmp_path / "out")
  monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("the model was loaded before the lock"))
  with results.DirectoryLock(out):
    with pytest.raises(SystemExit, match=rf"{out} is in use by pid {os.getpid()} on "):
      _main(f"--checkpoint={tmp_path}/nothing", "--method=divprune", "--budget=12", "--limit=2",
            f"--output_dir={out}")
    cli = subprocess.run([sys.executable, "-m", "experiments.run", f"--checkpoint={tmp_path}/nothing",
                          f"--output_dir={out}"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
  assert cli.returncode == 1 and f"{out} is in use by pid {os.getpid()} on " in cli.stderr, cli.stderr
  assert "Traceback" not in cli.stderr
  assert sorted(os.listdir(out)) == [results.LOCK_NAME]


def _questions(tmp_path, rows, n_images=3):
  """A vqa_jsonl data_dir: PNGs of the synthetic benchmark and questions.jsonl holding `rows` (dicts or raw lines)."""
  data = tmp_path / "data"
  data.mkdir()
  for i, ex in enumerate(vqa.make_split("test", n_images)):
    Image.fromarray(ex.image).save(data / f"{i}.png")
  with open(data / "questions.jsonl", "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(data)


def _q(i, **fields):
  return dict(dict(id=f"q{i}", image=f"{i}.png", question="What color is the circle?", answer="red"), **fields)


@pytest.mark.slow
def test_duplicate_ids_fail_naming_both_lines(checkpoint, tmp_path):
  data = _questions(tmp_path, [_q(0), _q(1), _q(2, id="q0")])
  with pytest.raises(ValueError, match=r"questions.jsonl:3: id 'q0' is also on line 1"):
    _main(f"--checkpoint={checkpoint}", "--tasks=vqa_jsonl", f"--data_dir={data}", "--method=divprune",
          "--budget=12", f"--output_dir={tmp_path / 'out'}", "--pictures=0")
  assert not os.path.exists(tmp_path / "out" / "results.jsonl") or _rows(str(tmp_path / "out")) == []
  split = vqa.write_split(vqa.make_split("test", 2) * 2, str(tmp_path / "synth"), "test")
  with pytest.raises(ValueError, match=rf"{split}: example id 'test/test-0-.*' is used by examples 0 and 2"):
    tasks.synthvqa(str(tmp_path / "synth"), "test", 0, 0)


@pytest.mark.slow
def test_vqa_jsonl_skips_blank_lines_and_an_edited_example_gets_new_rows(checkpoint, tmp_path, capsys):
  data = _questions(tmp_path, [_q(0), "", "   ", _q(1, answer=3)])
  items = tasks.vqa_jsonl(data, "test", 0, 0)
  assert [(it.question_id, it.target) for it in items] == [("q0", "red"), ("q1", "3")]
  out = str(tmp_path / "out")
  common = [f"--checkpoint={checkpoint}", "--tasks=vqa_jsonl", f"--data_dir={data}", "--method=divprune",
            "--budget=12", "--batch_size=2", f"--output_dir={out}", "--pictures=0"]
  _main(*common)
  with open(os.path.join(data, "questions.jsonl"), "w") as f:  # the answer of q1 corrected, same id
    f.write(json.dumps(_q(0)) + "\n" + json.dumps(_q(1, answer="blue")) + "\n")
  _main(*common)
  rows = _rows(out)
  assert len(rows) == 2 * 2 + 2  # q1 evaluated again (full, divprune); q0 unchanged, reused
  assert [(r["example_id"], r["answer"]) for r in rows[-2:]] == [("q1", "blue")] * 2
  table, _ = _table(capsys.readouterr().out, "vqa_jsonl")
  assert table["divprune"][2] == "2"


@pytest.mark.parametrize("lines, match", [
    (['{"id": "q0", "image": "0.png",'], r"questions.jsonl:1: not valid JSON"),
    ([_q(0), "[1, 2]"], r"questions.jsonl:2: expected a JSON object, got list"),
    ([_q(0), "", _q(1, answer=None)], r"questions.jsonl:3: field 'answer' is null; expected a string or an integer"),
    ([_q(0, answer=True)], r"questions.jsonl:1: field 'answer' is true; expected a string or an integer"),
    ([_q(0, question=None)], r"questions.jsonl:1: field 'question' is null; expected a string"),
    ([_q(0, id=None)], r"questions.jsonl:1: field 'id' is null"),
    ([{"id": "q0", "image": "0.png"}], r"questions.jsonl:1: missing field\(s\) question, answer"),
    ([_q(0), _q(1, image="nothing.png")], r"questions.jsonl:2: image .*nothing.png cannot be read"),
    ([_q(0, image="questions.jsonl")], r"questions.jsonl:1: image .*questions.jsonl cannot be read"),
])
def test_bad_questions_name_the_file_line_and_field(tmp_path, lines, match):
  data = _questions(tmp_path, lines, n_images=1)
  with pytest.raises(ValueError, match=match):
    tasks.vqa_jsonl(data, "test", 0, 0)


def test_truncated_image_is_named(tmp_path):
  data = _questions(tmp_path, [_q(0), _q(1)], n_images=2)
  image = os.path.join(data, "1.png")
  with open(image, "rb") as f:
    head = f.read()
  with open(image, "wb") as f:
    f.write(head[:len(head) // 2])
  with pytest.raises(ValueError, match=rf"questions.jsonl:2: image {image} cannot be read: .*truncated"):
    tasks.vqa_jsonl(data, "test", 0, 0)


def test_a_malformed_synthvqa_split_names_file_and_line(tmp_path):
  split = vqa.write_split(vqa.make_split("test", 3), str(tmp_path), "test")
  questions = os.path.join(split, "questions.jsonl")
  with open(questions) as f:
    lines = f.readlines()
  with open(questions, "w") as f:
    f.writelines([lines[0], "\n", lines[1][:30] + "\n", lines[2]])
  with pytest.raises(ValueError, match=rf"{questions}:3: not valid JSON"):
    tasks.synthvqa(str(tmp_path), "test", 0, 0)


def test_run_hash_covers_the_settings_and_the_keep_ratio():
  """The row-key hash is sha1 of the settings, the task, the pruning config and the run's keep_ratio (so a run's
  rows always agree on it: the exact 2/9 default and a rounded 0.222 are different runs)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  settings = dict(backbone="testbed", checkpoint="c", checkpoint_fingerprint="f", data_dir=None, split="test", seed=0,
                  max_new_tokens=1, batch_size=25)
  config = pruning.PruningConfig.flat("divprune", stage1_budget=40)
  spec = plan.RunSpec("divprune", 40, 2 / 9, config, "divprune")
  items = ["e0"]
  want = hashlib.sha1(json.dumps(dict(settings, task="synthvqa", config=repr(config), keep_ratio=2 / 9),
                                 sort_keys=True).encode()).hexdigest()[:10]
  assert evaluate.run_hash(settings, spec, "synthvqa", items) == want
  rounded = plan.RunSpec("divprune", 40, 0.222, config, "divprune")
  assert evaluate.run_hash(settings, rounded, "synthvqa", items) != want


def test_only_the_runs_that_read_clip_hash_its_files():
  """The CLIP checkpoint's file fingerprint goes into the CDPruner rows' keys only: every other run's key is the one
  it had before the fingerprint was recorded (the pinned formula of the test above, path included), so its rows
  resume."""
  import hashlib  # pylint: disable=g-import-not-at-top
  settings = dict(backbone="llava_next", checkpoint="c", checkpoint_fingerprint="f", data_dir=None, split="test",
                  seed=0, max_new_tokens=1, batch_size=25, clip_checkpoint="/clip")
  divprune = plan.RunSpec("divprune", 40, None, pruning.PruningConfig.flat("divprune", stage1_budget=40), "divprune")
  clip = pruning.PruningConfig.flat("cdpruner", stage1_budget=40, stage1_relevance="clip_text")
  cdpruner = plan.RunSpec("cdpruner", 40, None, clip, "cdpruner")
  assert plan.reads_clip(cdpruner.config) and not plan.reads_clip(divprune.config)
  want = hashlib.sha1(json.dumps(dict(settings, task="pope", config=repr(divprune.config), keep_ratio=None),
                                 sort_keys=True).encode()).hexdigest()[:10]
  for fp in ("1111111111", "2222222222"):
    assert evaluate.run_hash(dict(settings, clip_checkpoint_fingerprint=fp), divprune, "pope") == want
  assert evaluate.run_hash(dict(settings, clip_checkpoint_fingerprint="1111111111"), cdpruner, "pope") != (
      evaluate.run_hash(dict(settings, clip_checkpoint_fingerprint="2222222222"), cdpruner, "pope"))


def test_in_memory_rows_keep_their_keys():
  """An in-memory task's row key is <run hash>/<run>/<example id>/<digest>, the digest sha1 of the question, answer,
  family, subtype and image shape, then the image bytes: the keys rows were written under before the two
  evaluation pipelines became one, so those rows resume."""
  import hashlib  # pylint: disable=g-import-not-at-top
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  example = base.Example("test/x-1", image, "what color is the star?", "red",
                         {"family": "attribute", "subtype": "color"})
  h = hashlib.sha1(json.dumps(["what color is the star?", "red", "attribute", "color", [4, 5, 3]]).encode())
  h.update(image.tobytes())
  assert tasks.digest(example) == h.hexdigest()[:10]
  spec = plan.RunSpec("divprune", 40, 2 / 9, pruning.PruningConfig.flat("divprune", stage1_budget=40), "divprune")
  assert evaluate.row_key("0123456789", spec, f"test/x-1/{tasks.digest(example)}") == (
      f"0123456789/divprune@T=40/test/x-1/{h.hexdigest()[:10]}")


def test_default_ratios_give_the_papers_budgets():
  """2/9, 1/9, 1/18 of the nominal tokens: LLaVA-NeXT 640/320/160, LLaVA-1.5 128/64/32, testbed 40/20/10."""
  from experiments import testbed  # pylint: disable=g-import-not-at-top
  from models import backbones, loading  # pylint: disable=g-import-not-at-top
  configs = {"llava_next": backbones.get("llava_next").config.from_hf({"model_type": "llava_next",
                                                                         "image_token_index": 0}),
             "llava_1_5": backbones.get("llava").config.from_hf({"model_type": "llava", "image_token_index": 0}),
             "testbed": backbones.get("llava_next").config.from_hf(loading.read_config(testbed.DEFAULT_CKPT))}
  want = {"llava_next": [640, 320, 160], "llava_1_5": [128, 64, 32], "testbed": [40, 20, 10]}
  for name, budgets in want.items():
    nominal = backbones.get(plan.BACKBONES[name].model_type).nominal_tokens(configs[name])
    got = plan._targets(plan.RunConfig(backbone=name), nominal)  # pylint: disable=protected-access
    assert [t for t, _ in got] == budgets, name


def test_run_config_reads_every_flag_once_and_tops_flags_are_listed_once():
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["run", "--alpha=0.3", "--budget=4,8", "--tasks=synthvqa", "--pictures=0"])
  try:
    config = plan.RunConfig.from_flags(flags.FLAGS)
  finally:
    flags.FLAGS.unparse_flags()
  assert config.tops == plan.TopsOptions(alpha=0.3) and config.tops.given() == ["alpha"]
  assert config.budgets == ("4", "8") and config.pictures == 0
  with pytest.raises(AttributeError):
    config.limit = 3                                   # frozen
  tops_flags = {f.name for f in __import__("dataclasses").fields(plan.TopsOptions)}
  assert tops_flags <= set(flags.FLAGS) and tops_flags == {"alpha", "lam", "stage2_alpha", "stage2_lam", "normalize"}
