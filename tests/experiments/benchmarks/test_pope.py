"""experiments.benchmarks.pope: fixture snapshots in lmms-lab/POPE's layout, both parsers, hand-computed metrics."""

import inspect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmms_fixtures
from experiments.benchmarks import pope

SCHEMA = lmms_fixtures.SCHEMAS["POPE"]


def _rows(categories, answers, start=0):
  return [{"id": str(start + i), "question_id": str(100 + start + i), "question": f"  Is there a dog {i}? ",
           "answer": a, "image_source": f"COCO_val2014_{i}", "image": lmms_fixtures.image_cell(start + i),
           "category": c} for i, (c, a) in enumerate(zip(categories, answers))]


def _row(prediction, target, category="adversarial"):
  return {"question_id": "0", "prediction": prediction, "target": target, "meta": {"category": category}}


@pytest.mark.parametrize("generation, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),             # "No," loses its comma
    ("There is not a dog.", "no"),
    ("Yes. There is no cat.", "yes"),           # only the first sentence counts
    ("NO", "yes"),                              # only "No", "no", "not" are negative
    ("Not really", "yes"),                      # "Not" is not among them
    ("I cannot tell", "yes"),
    ("", "yes"),
])
def test_llava_parser(generation, expected):
  assert pope.parse_llava(generation) == expected


def test_lmms_eval_parser_is_strict():
  assert pope.parse_lmms_eval(" Yes\n") == "yes"
  assert pope.parse_lmms_eval("Yes, there is") == "yes, there is"


def test_confusion_metrics_on_a_hand_counted_table():
  labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
  preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no"]  # TP 3, FN 1, FP 2, TN 2
  m = pope.confusion_metrics(preds, labels)
  assert m["accuracy"] == pytest.approx(5 / 8)
  assert m["precision"] == pytest.approx(3 / 5)
  assert m["recall"] == pytest.approx(3 / 4)
  assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)  # 2/3
  assert m["yes_ratio"] == pytest.approx(5 / 8)          # of the predictions, not the labels (1/2)


def test_no_positive_prediction_gives_zero_precision_and_f1():
  m = pope.confusion_metrics(["no", "no"], ["yes", "no"])
  assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_protocols_score_an_unparseable_reply_differently():
  rows = [_row("Yes, there is a dog.", "yes"), _row("No", "no"), _row("Yes", "yes")]
  llava = pope.TASKS["pope_adversarial"].score(rows, "llava")
  assert llava["accuracy"] == 1.0 and llava["f1"] == 1.0 and llava["yes_ratio"] == pytest.approx(2 / 3)
  strict = pope.TASKS["pope_adversarial"].score(rows, "lmms_eval")
  # the long reply is wrong and neither TP nor FN: TP 1, TN 1, FP 0, FN 0
  assert strict["accuracy"] == pytest.approx(2 / 3)
  assert (strict["precision"], strict["recall"], strict["f1"]) == (1.0, 1.0, 1.0)
  assert strict["yes_ratio"] == pytest.approx(1 / 3)
  assert strict["label_yes_ratio"] == pytest.approx(2 / 3)  # what lmms-eval prints as pope_yes_ratio
  assert strict["unparsed"] == 1.0
  assert "label_yes_ratio" not in llava
  # LLaVA's question file is not lmms-lab's: the llava protocol's metrics carry its size (a note for the summary).
  assert llava["llava_file_questions"] == 8910.0 and "llava_file_questions" not in strict


def test_pooled_pope_reports_each_split_and_the_mean_f1():
  rows = ([_row(p, l, "adversarial") for p, l in [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no")]]
          + [_row(p, l, "popular") for p, l in [("yes", "yes"), ("no", "no")]]
          + [_row(p, l, "random") for p, l in [("no", "yes"), ("no", "no")]])
  m = pope.TASKS["pope"].score(rows, "llava")
  assert m["adversarial/f1"] == pytest.approx(0.5)  # P 1/2, R 1/2
  assert m["popular/f1"] == 1.0
  assert m["random/f1"] == 0.0                     # no positive prediction
  assert m["mean_f1"] == pytest.approx(0.5)         # (0.5 + 1 + 0) / 3
  assert m["splits"] == 3.0
  # the pooled numbers are lmms-eval's: TP 2, FP 1, FN 2, TN 3 over 8 rows
  assert m["accuracy"] == pytest.approx(5 / 8)
  assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
  with pytest.raises(ValueError, match="unknown category"):
    pope.TASKS["pope"].score(rows + [_row("yes", "yes", "gqa")], "llava")


def test_pooled_examples_stream_the_three_shards(tmp_path):
  categories = ["adversarial", "popular", "random"] * 2
  rows = _rows(categories, ["Yes", "no", "yes", "No", "yes", "no"])
  lmms_fixtures.write_split(str(tmp_path), None, "test", rows, SCHEMA, num_shards=3)
  examples = pope.TASKS["pope"].examples(str(tmp_path), "llava", True)
  assert inspect.isgenerator(examples)
  examples = list(examples)
  assert [e.question_id for e in examples] == [str(100 + i) for i in range(6)]
  assert [e.target for e in examples] == ["yes", "no", "yes", "no", "yes", "no"]
  assert examples[0].text == "Is there a dog 0?\nAnswer the question using a single word or phrase."
  assert [e.meta["category"] for e in examples] == categories
  for i, e in enumerate(examples):
    np.testing.assert_array_equal(e.image, lmms_fixtures.decoded(i))
  assert all(e.image is None for e in pope.TASKS["pope"].examples(str(tmp_path), "lmms_eval", False))


def test_split_tasks_read_the_full_config(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), "Full", "random", _rows(["random"] * 2, ["yes", "no"]), SCHEMA)
  assert [e.target for e in pope.TASKS["pope_random"].examples(str(tmp_path), "llava", False)] == ["yes", "no"]
  with pytest.raises(ValueError, match="config 'Full' has no split 'popular'"):
    list(pope.TASKS["pope_popular"].examples(str(tmp_path), "llava", False))


def test_bad_data_is_named(tmp_path):
  root = str(tmp_path)
  rows = _rows(["random"] * 4, ["yes", "no", "yes", "no"])
  rows[3]["image"] = {"bytes": b"not a png", "path": "3.png"}
  files = lmms_fixtures.write_split(root, None, "test", rows, SCHEMA, num_shards=2)
  with pytest.raises(ValueError, match=rf"{files[1]} row 1: the image cannot be decoded"):
    list(pope.TASKS["pope"].examples(root, "llava", True))
  assert len(list(pope.TASKS["pope"].examples(root, "llava", False))) == 4  # re-scoring reads no image
  no_category = pa.Table.from_pylist(rows[:1], schema=SCHEMA).drop_columns(["category"])
  pq.write_table(no_category, files[0])
  with pytest.raises(ValueError, match=rf"{files[0]}: missing column\(s\) \['category'\]"):
    list(pope.TASKS["pope"].examples(root, "llava", False))
  lmms_fixtures.write_split(root, "Full", "adversarial", [], SCHEMA)
  with pytest.raises(ValueError, match="empty split"):
    list(pope.TASKS["pope_adversarial"].examples(root, "llava", False))
  lmms_fixtures.write_split(root, "Full", "popular", _rows(["popular"], ["maybe"]), SCHEMA)
  with pytest.raises(ValueError, match="row 0: answer 'maybe' is not yes/no"):
    list(pope.TASKS["pope_popular"].examples(root, "llava", False))
  with pytest.raises(ValueError, match="unknown protocol"):
    list(pope.TASKS["pope_popular"].examples(root, "vlmevalkit", False))


def test_task_facts():
  assert {n: (t.config, t.split, t.num_rows) for n, t in pope.TASKS.items()} == {
      "pope": (None, "test", 9000), "pope_adversarial": ("Full", "adversarial", 3000),
      "pope_popular": ("Full", "popular", 3000), "pope_random": ("Full", "random", 3000)}
  assert all(t.max_new_tokens == {"llava": 128, "lmms_eval": 128} and t.id_source == "question_id"
             for t in pope.TASKS.values())
