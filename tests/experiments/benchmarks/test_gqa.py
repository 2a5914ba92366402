"""experiments.benchmarks.gqa: the instructions/images join on imageId, streaming lookups, both exact matches."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmms_fixtures
from experiments.benchmarks import gqa

TASK = gqa.TASKS["gqa"]


def _snapshot(root, image_ids=("n1", "n2", "n3"), questions=(("q1", "n2"), ("q2", "n1"), ("q3", "n2"), ("q4", "n3"))):
  images = [{"id": image_id, "image": lmms_fixtures.image_cell(10 + k)} for k, image_id in enumerate(image_ids)]
  image_files = lmms_fixtures.write_split(root, gqa.IMAGES, "testdev", images, lmms_fixtures.SCHEMAS["GQA/images"],
                                          num_shards=2, row_group_size=1)
  instructions = [{"id": q, "imageId": image_id, "question": f"What is on image {image_id}?", "answer": "cat",
                   "fullAnswer": "A cat.", "isBalanced": True} for q, image_id in questions]
  files = lmms_fixtures.write_split(root, gqa.INSTRUCTIONS, "testdev", instructions,
                                    lmms_fixtures.SCHEMAS["GQA/instructions"], num_shards=2)
  return files, image_files


def test_examples_join_images_on_image_id(tmp_path):
  _snapshot(str(tmp_path))
  examples = list(TASK.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in examples] == ["q1", "q2", "q3", "q4"]
  assert [e.meta["image_id"] for e in examples] == ["n2", "n1", "n2", "n3"]
  seeds = {"n1": 10, "n2": 11, "n3": 12}
  for e in examples:
    np.testing.assert_array_equal(e.image, lmms_fixtures.decoded(seeds[e.meta["image_id"]]))
  assert examples[0].text == "What is on image n2?\nAnswer the question using a single word or phrase."
  assert examples[0].target == "cat"


def test_the_lookup_reads_one_row_group_per_miss_and_bounds_its_cache(tmp_path, monkeypatch):
  _, image_files = _snapshot(str(tmp_path))
  reads = []
  original = pq.ParquetFile.read_row_group

  def spy(self, i, *args, **kwargs):
    reads.append((i, tuple(kwargs.get("columns") or ())))
    return original(self, i, *args, **kwargs)

  lookup = gqa.ImageLookup(image_files, max_bytes=1)
  monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
  assert lookup("n3", "test") == lmms_fixtures.png(12)
  assert lookup("n3", "test") == lmms_fixtures.png(12)  # cached: the one entry the bound keeps
  assert lookup("n1", "test") == lmms_fixtures.png(10)
  assert reads == [(0, ("id", "image")), (0, ("id", "image"))]  # one group of one row per miss
  assert len(lookup._cache) == 1  # pylint: disable=protected-access


def test_rescoring_needs_no_images_config(tmp_path):
  root = str(tmp_path)
  lmms_fixtures.write_split(root, gqa.INSTRUCTIONS, "testdev",
                            [{"id": "q1", "imageId": "n9", "question": "Q?", "answer": "no", "fullAnswer": "No.",
                              "isBalanced": True}], lmms_fixtures.SCHEMAS["GQA/instructions"])
  assert [e.image for e in TASK.examples(root, "llava", False)] == [None]
  with pytest.raises(ValueError, match="config 'testdev_balanced_images'"):
    list(TASK.examples(root, "llava", True))


def test_bad_images_are_named(tmp_path):
  root = str(tmp_path)
  files, image_files = _snapshot(root, questions=(("q1", "n1"), ("q2", "n7")))
  examples = TASK.examples(root, "llava", True)
  assert next(examples).question_id == "q1"
  with pytest.raises(ValueError, match=rf"{files[1]} row 0: imageId 'n7' is not in the images config"):
    next(examples)
  rows = [{"id": "n1", "image": {"bytes": None, "path": "n1.jpg"}}, {"id": "n2", "image": lmms_fixtures.image_cell(1)}]
  pq.write_table(pa.Table.from_pylist(rows, schema=lmms_fixtures.SCHEMAS["GQA/images"]), image_files[0])
  with pytest.raises(ValueError, match=rf"{image_files[0]} row 0 \(image 'n1'\): the image cell has no bytes"):
    list(TASK.examples(root, "llava", True))


def _rows(pairs):
  return [{"question_id": str(i), "prediction": p, "target": t, "meta": {}} for i, (p, t) in enumerate(pairs)]


def test_lmms_eval_strips_then_lowercases_and_deletes_punctuation():
  # The task strips the generation (`ConfigurableTask.process_results`), then exact_match lowercases and deletes
  # punctuation on both sides without stripping again.
  rows = _rows([("Yes.", "yes"), ("T-shirt", "t-shirt"), (" yes", "yes"), ("t-shirt", "t shirt"), ("Yes!", "yes"),
                (" right ", "right"), ("Yes\n", "yes"), ("right .", "right")])
  # right: "yes", "tshirt", "yes", "yes", "right", "yes"; wrong: "tshirt" vs "t shirt", "right " (stripped first)
  assert TASK.score(rows, "lmms_eval") == {"accuracy": pytest.approx(6 / 8)}
  assert gqa.parse_lmms_eval(" Right \n") == "right"


def test_llava_strips_trailing_periods_and_compares_with_the_raw_gold():
  rows = _rows([("Yes.", "yes"), (" Yes. ", "yes"), ("T-shirt.", "t-shirt"), ("Yes!", "yes"), ("t shirt", "t-shirt")])
  # right: "yes", "yes", "t-shirt"; wrong: "yes!", "t shirt"
  assert TASK.score(rows, "llava") == {"accuracy": pytest.approx(3 / 5)}
  assert gqa.parse_llava("Left..") == "left"  # rstrip removes every trailing period


def test_task_facts():
  assert (TASK.config, TASK.split, TASK.num_rows, TASK.id_source) == (gqa.INSTRUCTIONS, "testdev", 12578, "id")
  assert TASK.max_new_tokens == {"llava": 128, "lmms_eval": 16}
