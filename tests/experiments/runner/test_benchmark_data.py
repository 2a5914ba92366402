"""The runner on a benchmark snapshot's data: what it reads is exactly the data it names, and a bad row is named
(file and row) before any batch is evaluated. A llava-hf-layout LLaVA-NeXT checkpoint with tiny widths (56-px crops)
and lmms-lab-layout snapshots."""

import os

import numpy as np
import pytest
from PIL import Image

import lmms_fixtures
import model_factories as mf
import runner_helpers
from experiments.benchmarks import gqa
from experiments.runner import evaluate
from experiments.runner import plan


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
  return str(mf.tiny_llava_hf(tmp_path_factory.mktemp("ckpt"), "llava_next", crop=56))


def _pope(folder, n, **bad_row_1):
  rows = [dict(id=str(i), question_id=str(100 + i), question=f"Is there a dog {i}?", answer="yes" if i % 2 else "no",
               image_source="", image=lmms_fixtures.image_cell(i, (80, 106)),
               category=("adversarial", "popular", "random")[i % 3]) for i in range(n)]
  rows[1].update(bad_row_1)
  return lmms_fixtures.write_split(str(folder), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"])


def _args(ckpt, task, data_dir, out, *more):
  return [f"--backbone=llava_next", f"--checkpoint={ckpt}", f"--tasks={task}", f"--data_dir={data_dir}",
          "--method=divprune", "--budget=8", "--max_new_tokens=2", f"--output_dir={out}", "--pictures=0", *more]


@pytest.mark.slow
def test_an_output_dir_inside_the_snapshot_reuses_every_row(next_ckpt, tmp_path):
  """results.jsonl and .lock written inside the snapshot are not its data: a rerun recomputes nothing."""
  snapshot = tmp_path / "POPE"
  _pope(snapshot, 2)
  out = str(snapshot / "runs")
  args = _args(next_ckpt, "pope", snapshot, out, "--limit=2", "--batch_size=2")
  runner_helpers.run_main(*args)
  mtime = os.path.getmtime(os.path.join(out, "results.jsonl"))
  runner_helpers.run_main(*args)
  assert len(runner_helpers.read_rows(out)) == 4 and os.path.getmtime(os.path.join(out, "results.jsonl")) == mtime


def test_a_bad_row_is_named_before_any_batch_is_evaluated(next_ckpt, tmp_path):
  """A GQA answer that is null passed the reader and failed only when the whole split had run and was scored; the
  row is past the first length-sorted buffer (batch_size 1: 8 examples), so streaming alone would evaluate 8 first."""
  root = tmp_path / "GQA"
  lmms_fixtures.write_split(str(root), gqa.IMAGES, "testdev", [{"id": "n1", "image": lmms_fixtures.image_cell(1)}],
                            lmms_fixtures.SCHEMAS["GQA/images"])
  questions = [{"id": f"q{i}", "imageId": "n1", "question": "What is it?", "answer": None if i == 9 else "cat",
                "fullAnswer": "A cat.", "isBalanced": True} for i in range(10)]
  shard = lmms_fixtures.write_split(str(root), gqa.INSTRUCTIONS, "testdev", questions,
                                    lmms_fixtures.SCHEMAS["GQA/instructions"])[0]
  out = tmp_path / "out"
  with pytest.raises(Exception, match=rf"{shard} row 9: field 'answer' is null"):
    runner_helpers.run_main(*_args(next_ckpt, "gqa", root, out, "--limit=0", "--batch_size=1"))
  assert not os.path.exists(out / "results.jsonl") or not runner_helpers.read_rows(str(out))


def test_an_over_long_question_is_named_with_its_file_and_row(next_ckpt, tmp_path):
  """The model's own check (prompt + max_new_tokens > max_position_embeddings, 8192 here) names no example."""
  shard = _pope(tmp_path / "POPE", 3, question="Is there " + "x" * 9000 + "?")[0]
  with pytest.raises(Exception, match=rf"{shard} row 1: question '101' is too long: its prompt holds \d+ tokens "
                                      r"\(\d+ of them the image's\), and \d+ \+ max_new_tokens 2 > "
                                      r"max_position_embeddings 8192"):
    runner_helpers.run_main(*_args(next_ckpt, "pope", tmp_path / "POPE", tmp_path / "out", "--limit=3"))


def test_images_three_pixels_or_fewer_on_a_side_keep_their_geometry(next_ckpt):
  """A uint8[3, 100, 3] image was read channels-first by the processor, i.e. as 100 x 3."""
  evaluator = evaluate.load(plan.BACKBONES["llava_next"], "llava_next", next_ckpt)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((3, 100, 3), (100, 3, 3), (1, 40, 3))]
  texts = ["USER: <image>\nWhat is it? ASSISTANT:"] * 3
  arrays = evaluator.encode(texts, images, ["What is it?"] * 3)
  assert arrays["image_sizes"].tolist() == [[3, 100], [100, 3], [1, 40]]
  as_pil = evaluator.processor(images=[Image.fromarray(im) for im in images], text=texts, return_tensors="np",
                               padding=True)
  np.testing.assert_array_equal(arrays["pixel_values"][:, :as_pil["pixel_values"].shape[1]],
                                as_pil["pixel_values"].astype(np.float32))
