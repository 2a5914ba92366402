"""The runner on a benchmark task end to end: a llava-hf-layout LLaVA-NeXT checkpoint at the real 336-px geometry
(tiny widths, random weights, its tokenizer and processor files) and a POPE snapshot in the lmms-lab layout."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import lmms_fixtures
import model_factories as mf
import runner_helpers
from experiments.benchmarks import registry
from experiments.runner import conversation
from experiments.runner import images
from experiments.runner import plan
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
    header, *preds = [json.loads(line) for line in f]
  assert [set(p) for p in preds] == [{"question_id", "prompt", "prediction", "answer"}] * 4
  # The header names the invocation, the run and every setting its rows were made under.
  tops_hash = next(r["key"] for r in rows if r["run"] == "tops@T=8").split("/")[0]
  assert header["provenance"] == dict(
      invocation=full[0]["process"], task="pope", run="tops@T=8", run_hash=tops_hash, protocol="lmms_eval",
      conv_template="vicuna_v1", resolution="native", limit=4, max_new_tokens=3, backbone="llava_next",
      checkpoint=next_ckpt, checkpoint_fingerprint=plan.fingerprint(next_ckpt), data_dir=root,
      data_path=os.path.join(root, "POPE"),
      data_fingerprint=registry.TASKS["pope"].fingerprint(os.path.join(root, "POPE")),
      split="test", seed=0, batch_size=2)
  with open(os.path.join(out, "summary_pope.md")) as f:
    table = f.read()
  for column in ("f1", "accuracy", "KL", "dNLL", "tops"):
    assert column in table
  record = json.loads(table.splitlines()[-1].removeprefix("provenance: "))    # the summary's provenance line
  hashes = record.pop("run_hashes")
  assert record == {k: v for k, v in header["provenance"].items() if k not in ("run", "run_hash")}
  assert hashes["tops@T=8"] == tops_hash and set(hashes) == runs
  assert "pope (protocol lmms_eval, template vicuna_v1, images native)" in printed
  with open(os.path.join(out, "summary_benchmarks.md")) as f:
    relative = f.read()
  assert "tops@T=8: Rel (a) ratio of means, MME-P/20 (TOPS, CDPruner)" in relative and "over POPE" in relative
  # experiments.score re-scores the stored predictions without the model: the runner's metrics again.
  from experiments import score  # pylint: disable=g-import-not-at-top
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
  task = registry.TASKS["pope"]
  os.makedirs(tmp_path / "POPE")
  assert tasks.task_dir(str(tmp_path), task, single=False) == str(tmp_path / "POPE")
  assert tasks.task_dir(str(tmp_path / "POPE"), task, single=True) == str(tmp_path / "POPE")
  with pytest.raises(ValueError, match="one folder per dataset repository"):
    tasks.task_dir(str(tmp_path / "POPE"), task, single=False)


def test_score_rejects_bad_prediction_files(tmp_path):
  from experiments import score  # pylint: disable=g-import-not-at-top
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


def _score_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.score", *args], cwd=REPO, capture_output=True, text=True)


def test_score_takes_the_protocol_task_and_snapshot_from_the_file(tmp_path):
  """BUILD.md's re-score command on a LLaVA-1.5 run (protocol llava, where `experiments.score` defaulted to lmms_eval
  and printed accuracy 0.0 for the run's 1.0 here): the file's header names its protocol, task and snapshot, a flag
  that disagrees is an error naming both values, and a file without the header is scored with the flags."""
  from experiments import score  # pylint: disable=g-import-not-at-top
  from experiments.runner import outputs  # pylint: disable=g-import-not-at-top
  from experiments.runner import predictions  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "data")
  _pope(root, 2)                                    # 100: "no", 101: "yes"
  snapshot = os.path.join(root, "POPE")
  rows = [dict(question_id="100", prompt="p", prediction="There is no dog.", answer="no"),
          dict(question_id="101", prompt="p", prediction="Yes, there is a dog.", answer="yes")]
  record = dict(invocation="host:1:2026-12-08T10:00:00", task="pope", protocol="llava", conv_template="vicuna_v1",
                resolution="native", limit=2, checkpoint="/ckpt", checkpoint_fingerprint="0123456789", data_dir=root,
                data_path=snapshot, data_fingerprint=registry.TASKS["pope"].fingerprint(snapshot),
                run_hashes={"full": "abcdef0123"})
  (path,) = outputs.write_predictions(str(tmp_path / "out"), "pope", {"full": rows}, record)
  header = predictions.read_header(path)
  assert header == dict({k: v for k, v in record.items() if k != "run_hashes"}, run="full", run_hash="abcdef0123")
  assert score.read_predictions(path) == {"100": "There is no dog.", "101": "Yes, there is a dog."}
  cli = _score_cli(f"--predictions={path}")
  assert cli.returncode == 0, cli.stderr
  assert json.loads(cli.stdout)["accuracy"] == 1.0                   # llava's lenient parser: the run's number
  pope = registry.TASKS["pope"]
  assert score.score(pope, snapshot, score.read_predictions(path), "lmms_eval")["accuracy"] == 0.0
  cli = _score_cli(f"--predictions={path}", "--protocol=lmms_eval")
  assert cli.returncode != 0 and "--protocol=lmms_eval disagrees with" in cli.stderr
  with pytest.raises(ValueError, match=r"--protocol=lmms_eval disagrees with .*full.jsonl, whose provenance header "
                                       r"records protocol 'llava'"):
    score.target(path, header, protocol="lmms_eval")
  with pytest.raises(ValueError, match=r"--task=mme disagrees with .* records task 'pope'"):
    score.target(path, header, task="mme")
  assert score.target(path, header, task="pope", protocol="llava") == score.Target("pope", snapshot, "llava")
  # Another snapshot (re-downloaded: other files) is named with both fingerprints; --nocheck_data takes it anyway.
  other = str(tmp_path / "other")
  _pope(other, 3)
  with pytest.raises(ValueError, match=rf"snapshot in {other}/POPE has fingerprint \w+, but .* fingerprint "
                                       rf"{record['data_fingerprint']} \({snapshot}\)"):
    score.target(path, header, data_dir=os.path.join(other, "POPE"))
  assert score.target(path, header, data_dir=os.path.join(other, "POPE"), check_data=False).data_dir.startswith(other)
  # A file written before the header: the flags, the protocol included, say what it is.
  old = tmp_path / "old.jsonl"
  old.write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"old.jsonl has no provenance header .*: pass --task, --data_dir, --protocol"):
    score.target(str(old), predictions.read_header(str(old)))
  cli = _score_cli(f"--predictions={old}", "--task=pope", f"--data_dir={snapshot}", "--protocol=llava")
  assert cli.returncode == 0 and json.loads(cli.stdout)["accuracy"] == 1.0, cli.stderr


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
  first = _manifest(out)
  assert first["status"] == "complete" and sorted(first["tasks"]) == ["mme", "pope"]
  assert {"summary_benchmarks.md", "summary_mme.md", "predictions/mme/full.jsonl"} <= set(first["files"])
  assert json.loads(relative.splitlines()[-1].removeprefix("provenance: ")) == first["tasks"]
  # The same invocation again, failing on its second task (MME's snapshot gone): POPE's outputs are this
  # invocation's, and nothing of the previous one (MME's summary and predictions, the relative summary) is left
  # beside them; the manifest says the invocation failed and which tasks it finished.
  shutil.rmtree(os.path.join(root, "MME"))
  with pytest.raises(Exception, match="no snapshot folder .*MME"):
    _main("--backbone=llava_next", f"--checkpoint={next_ckpt}", "--tasks=pope,mme", f"--data_dir={root}",
          "--method=divprune", "--budget=8", "--limit=4", "--batch_size=2", "--max_new_tokens=2",
          f"--output_dir={out}", "--pictures=0")
  second = _manifest(out)
  assert second["status"] == "failed" and "no snapshot folder" in second["error"]
  assert second["invocation"] != first["invocation"] and list(second["tasks"]) == ["pope"]
  left = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names)
  assert left == sorted([".lock", "manifest.json", "results.jsonl", "results.jsonl.index", "summary_pope.md",
                         "predictions/pope/full.jsonl", "predictions/pope/divprune@T=8.jsonl"])
  assert second["files"] == sorted(f for f in left if f.startswith(("summary", "predictions")))
  with open(os.path.join(out, "summary_pope.md")) as f:
    assert json.loads(f.read().splitlines()[-1].removeprefix("provenance: "))["invocation"] == second["invocation"]
  for name in ("full", "divprune@T=8"):
    header = json.loads(open(os.path.join(out, "predictions", "pope", f"{name}.jsonl")).readline())["provenance"]
    assert header["invocation"] == second["invocation"] and header["run"] == name


def _manifest(out):
  with open(os.path.join(out, "manifest.json")) as f:
    return json.load(f)


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
