"""experiments.benchmarks.mme: position ids, the prompt edit, both parsers, hand-computed acc / acc+ / totals."""

import numpy as np
import pytest

import lmms_fixtures
from experiments.benchmarks import mme

TASK = mme.TASKS["mme"]


@pytest.mark.parametrize("generation, lmms_eval, llava", [
    ("Yes", "yes", "yes"),
    ("No.", "no", "no"),          # lmms-eval deletes "."; MME's tool: "no." starts with "no"
    (" No", "no", "no"),          # lmms-eval strips; MME's tool finds "no" in " no"
    ("Y", "yes", "other"),        # the single-letter rule is lmms-eval's only
    ("n", "no", "other"),
    ("x", "other", "other"),
    ("Yes, it is.", "yes", "yes"),
    ("Nope", "no", "no"),          # "no" within the first four characters
    ("The answer is no", "other", "other"),
    ("   yes", "yes", "other"),    # MME's tool does not strip: "   y" has no "yes"
])
def test_parsers(generation, lmms_eval, llava):
  assert mme.parse_lmms_eval(generation) == lmms_eval
  assert mme.parse_llava(generation) == llava


def test_scores_on_hand_counted_pairs():
  answers = [("existence", "a.png", True), ("existence", "a.png", True),      # both right
             ("existence", "b.png", True), ("existence", "b.png", False),     # one right
             ("code_reasoning", "c.png", False), ("code_reasoning", "c.png", False),
             ("code_reasoning", "d.png", True), ("code_reasoning", "d.png", True),
             ("OCR", "e.png", True)]                                          # a lone question: left out
  s = mme.mme_scores(answers)
  assert (s["existence/acc"], s["existence/acc_plus"], s["existence/score"]) == (75.0, 50.0, 125.0)
  assert (s["code_reasoning/acc"], s["code_reasoning/acc_plus"], s["code_reasoning/score"]) == (50.0, 50.0, 100.0)
  assert (s["perception"], s["cognition"], s["incomplete_images"]) == (125.0, 100.0, 1.0)
  assert "OCR/score" not in s
  with pytest.raises(ValueError, match="unknown category 'vqa'"):
    mme.mme_scores([("vqa", "f.png", True)])


def test_score_parses_by_protocol():
  rows = [{"question_id": str(i), "prediction": p, "target": t, "meta": {"category": "count", "image": "x.png"}}
          for i, (p, t) in enumerate([("Y", "yes"), ("No", "no")])]
  assert TASK.score(rows, "lmms_eval")["count/score"] == 200.0  # both right: 100 + 100
  assert TASK.score(rows, "llava")["count/score"] == 50.0        # "y" is other: acc 50, acc+ 0


def _rows():
  return [{"question_id": image, "image": lmms_fixtures.image_cell(k // 2),
           "question": f"Is there a {word} in this image? Please answer yes or no.", "answer": answer,
           "category": category}
          for k, (image, word, answer, category) in enumerate([
              ("existence/1.png", "dog", "Yes", "existence"), ("existence/1.png", "cat", "No", "existence"),
              ("count/2.png", "cow", "Yes", "count"), ("count/2.png", "pig", "No", "count")])]


def test_examples_use_row_positions_and_drop_the_yes_no_instruction(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), None, "test", _rows(), lmms_fixtures.SCHEMAS["MME"], num_shards=2)
  examples = list(TASK.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in examples] == ["0", "1", "2", "3"]
  assert [e.meta["image"] for e in examples] == ["existence/1.png"] * 2 + ["count/2.png"] * 2
  assert [e.target for e in examples] == ["yes", "no", "yes", "no"]
  assert examples[1].text == "Is there a cat in this image?\nAnswer the question using a single word or phrase."
  np.testing.assert_array_equal(examples[3].image, lmms_fixtures.decoded(1))


def test_two_spaces_before_the_instruction_leave_a_space_under_lmms_eval_only():
  question = "Is this photo taken in a place of worship?  Please answer yes or no."
  assert mme.prompt(question, "lmms_eval") == "Is this photo taken in a place of worship? " + mme.SUFFIX
  assert mme.prompt(question, "llava") == "Is this photo taken in a place of worship?" + mme.SUFFIX
  one = "Is there a dog? Please answer yes or no."
  assert mme.prompt(one, "lmms_eval") == mme.prompt(one, "llava") == "Is there a dog?" + mme.SUFFIX


def test_bad_rows_are_named(tmp_path):
  rows = _rows()
  rows[2]["image"] = {"bytes": b"\x89PNG\r\n", "path": "2.png"}
  rows[3]["answer"] = "Maybe"
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", rows, lmms_fixtures.SCHEMAS["MME"], num_shards=2)
  with pytest.raises(ValueError, match=rf"{files[1]} row 0: the image cannot be decoded"):
    list(TASK.examples(str(tmp_path), "llava", True))
  with pytest.raises(ValueError, match=rf"{files[1]} row 1: answer 'Maybe' is not yes/no"):
    list(TASK.examples(str(tmp_path), "llava", False))


def test_task_facts():
  assert (TASK.config, TASK.split, TASK.num_rows, TASK.id_source) == (None, "test", 2374, "position")
  assert TASK.max_new_tokens == {"llava": 128, "lmms_eval": 16}
  assert len(mme.PERCEPTION) == 10 and len(mme.COGNITION) == 4
