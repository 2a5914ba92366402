"""hallusionbench_image: fixture snapshot with lmms-lab/HallusionBench's schema; VLMEvalKit's yes/no extraction and
aAcc / fAcc / qAcc worked by hand."""

import pyarrow as pa
import pytest

import lmms_fixtures
from experiments.benchmarks import hallusionbench as hb

TASK = hb.TASKS["hallusionbench_image"]
_COLUMNS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note", "question_id",
            "question", "gt_answer_details", "gt_answer", "filename")
SCHEMA = pa.schema([(c, pa.string()) for c in _COLUMNS] + [("image", lmms_fixtures.IMAGE)])


def _row(i, category, sub, set_id, figure, question, answer):
  return dict(category=category, subcategory=sub, visual_input="1" if figure == "0" else "2", set_id=set_id,
              figure_id=figure, sample_note="n", question_id=question, question=f"Is claim {question} true?",
              gt_answer_details="d", gt_answer=answer, filename=f"{i}.png", image=lmms_fixtures.image_cell(i))


ROWS = [_row(0, "VS", "chart", "0", "0", "0", "1"),
        _row(1, "VS", "chart", "0", "1", "0", "1"),
        _row(2, "VS", "chart", "0", "0", "1", "0"),
        _row(3, "VS", "chart", "0", "1", "1", "1"),
        _row(4, "VD", "illusion", "1", "0", "0", "0"),
        _row(5, "VD", "illusion", "1", "1", "0", "1")]


@pytest.mark.parametrize("output, extracted", [
    ("Yes, it is.", "Yes"), ("No, there is none.", "No"), ("Yes and no", "Unknown"), ("I am not sure.", "Unknown"),
    ("yes/no", "Unknown"),          # "/" without spaces around it becomes a space
    ("The answer is NO!", "No"), ("yes-", "Yes"),       # "-" beside no space becomes a space
])
def test_yorn_extraction(output, extracted):
  assert hb.yorn_extraction(output) == extracted


def test_process_punctuation_rules():
  assert hb.process_punctuation("a , b") == "a  b"          # "," beside a space: deleted everywhere
  assert hb.process_punctuation("a,b") == "a b"             # else replaced by a space
  assert hb.process_punctuation("1,000 (x)") == "1000 x"    # a digit,digit comma: every listed mark deleted
  assert hb.process_punctuation("e.g. 3.5") == "eg 3.5"     # periods not between digits deleted
  assert hb.process_punctuation("." * 40) == "." * 8        # at most 32 of them


def test_examples_prompts_and_rating_by_hand(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), None, "image", ROWS, SCHEMA, num_shards=2)
  ex = list(TASK.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in ex] == [str(i) for i in range(6)]
  assert [e.target for e in ex] == ["Yes", "Yes", "No", "Yes", "No", "Yes"]
  assert ex[0].text == "Is claim 0 true?"
  assert [e.text for e in TASK.examples(str(tmp_path), "llava", False)][0] == ("Is claim 0 true?"
                                                                              "\nPlease answer yes or no.")
  generations = ["Yes, it is.",         # VS chart s0 q0 f0: right
                 "Yes and no",          # VS chart s0 q0 f1: Unknown, wrong
                 "No, there is none.",  # VS chart s0 q1 f0: right
                 "yes",                 # VS chart s0 q1 f1: right
                 "no",                  # VD illusion s1 q0 f0: right
                 "Yes."]                # VD illusion s1 q0 f1: right
  rows = [{"question_id": e.question_id, "generation": g, "target": e.target, "meta": e.meta}
          for e, g in zip(ex, generations)]
  # figures (l2, set, figure): chart/0/0 all right, chart/0/1 not, illusion/1/0 and /1/1 right -> 3/4
  # questions (l2, set, question): chart/0/0 not, chart/0/1 right, illusion/1/0 right -> 2/3
  assert TASK.score(rows, "lmms_eval") == pytest.approx({
      "aAcc": 5 / 6, "fAcc": 3 / 4, "qAcc": 2 / 3,
      "VD/aAcc": 1.0, "VD/fAcc": 1.0, "VD/qAcc": 1.0,
      "VS/aAcc": 3 / 4, "VS/fAcc": 1 / 2, "VS/qAcc": 1 / 2, "unknown": 1.0})
  assert TASK.parse("No.", ex[0].meta, "llava") == "No"


def test_groups_key_on_l2_category_not_category():
  """VLMEvalKit's keys hold l2-category, set_id and figure/question id, not VD/VS: equal keys merge."""
  items = [dict(score=True, category="VD", l2_category="ocr", set_id="0", figure_id="0", dataset_question_id="0"),
           dict(score=False, category="VS", l2_category="ocr", set_id="0", figure_id="0", dataset_question_id="1")]
  out = hb.hallusion_rating(items)
  assert (out["fAcc"], out["qAcc"], out["VD/fAcc"]) == (0.0, 0.5, 1.0)


def test_bad_answer(tmp_path):
  rows = [dict(r) for r in ROWS]
  rows[3]["gt_answer"] = "yes"
  files = lmms_fixtures.write_split(str(tmp_path), None, "image", rows, SCHEMA)
  with pytest.raises(ValueError, match=rf"{files[0]} row 3: gt_answer 'yes' is not '1' or '0'"):
    list(TASK.examples(str(tmp_path), "llava", False))
  lmms_fixtures.write_split(str(tmp_path / "n"), None, "non_image", rows, SCHEMA)
  with pytest.raises(ValueError, match="has no split 'image'"):
    list(TASK.examples(str(tmp_path / "n"), "llava", False))
