"""mmbench_en_dev / mmbench_cn_dev: fixture snapshots with lmms-lab/MMBench's schema, prompts of both protocols,
the heuristic extraction and circular scoring worked by hand."""

import pyarrow as pa
import pytest

import lmms_fixtures
from experiments.benchmarks import mmbench

EN, CN = mmbench.TASKS["mmbench_en_dev"], mmbench.TASKS["mmbench_cn_dev"]
_S = pa.string()


def _schema(index_type):
  return pa.schema([("index", index_type), ("question", _S), ("hint", _S), ("answer", _S), ("A", _S), ("B", _S),
                    ("C", _S), ("D", _S), ("category", _S), ("image", lmms_fixtures.IMAGE), ("source", _S),
                    ("L2-category", _S), ("comment", _S), ("split", _S)])


def _row(index, question, hint, options, answer, category):
  opts = dict(zip("ABCD", list(options) + [None] * (4 - len(options))))
  return dict(index=index, question=question, hint=hint, answer=answer, **opts, category=category,
              image=lmms_fixtures.image_cell(index % 97), source="s", **{"L2-category": "perception"}, comment=None,
              split="dev")


# Question 0 and its two rotations (the answer letter moves with "blue"); question 1 (two options) and its rotation.
ROWS = [_row(0, "What color is the sky?", "Look up.", ["blue", "green", "red"], "A", "attribute"),
        _row(1, "Is it day?", None, ["yes", "no"], "A", "scene"),
        _row(1_000_000, "What color is the sky?", "Look up.", ["green", "red", "blue"], "C", "attribute"),
        _row(1_000_001, "Is it day?", None, ["no", "yes"], "B", "scene"),
        _row(2_000_000, "What color is the sky?", "Look up.", ["red", "blue", "green"], "B", "attribute")]


def _write(root, lang, rows=ROWS, index_type=pa.int64()):
  return lmms_fixtures.write_split(str(root), lang, "dev", rows, _schema(index_type), num_shards=2)


def test_prompts_of_both_protocols_en_and_cn(tmp_path):
  _write(tmp_path, "en", [dict(r, index=str(r["index"])) for r in ROWS], pa.string())   # en's index as string
  _write(tmp_path, "cn")
  en = list(EN.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in en] == ["0", "1", "1000000", "1000001", "2000000"]
  assert [e.target for e in en] == ["A", "A", "C", "B", "B"]
  assert en[1].meta == {"index": 1, "options": {"A": "yes", "B": "no"}, "category": "scene",
                        "l2_category": "perception"}
  assert en[0].image.shape == (6, 8, 3)
  en_post = "\nAnswer with the option's letter from the given choices directly."
  assert en[0].text == ("Look up. What color is the sky? There are several options:\nA. blue\nB. green\nC. red\n"
                        + en_post)
  assert en[1].text == "Is it day? There are several options:\nA. yes\nB. no\n" + en_post
  cn = list(CN.examples(str(tmp_path), "lmms_eval", False))
  assert cn[0].text == ("Look up. What color is the sky? There are several options:\nA. blue\nB. green\nC. red\n"
                        "\n请直接使用所提供的选项字母作为答案回答。")
  llava_en = list(EN.examples(str(tmp_path), "llava", False))
  assert llava_en[0].text == ("Look up.\nWhat color is the sky?\nA. blue\nB. green\nC. red\n"
                              "Answer with the option's letter from the given choices directly.")
  assert list(CN.examples(str(tmp_path), "llava", False))[1].text == "Is it day?\nA. yes\nB. no\n请直接回答选项字母。"


def test_hint_and_option_nulls_as_each_official_prompt_reads_them():
  row = dict(question="Q", hint="nan", A="x", B="nan", C="", D=None)
  assert mmbench.prompt(row, "en", "lmms_eval") == (
      "Q There are several options:\nA. x\n\nAnswer with the option's letter from the given choices directly.")
  assert mmbench.prompt(row, "cn", "lmms_eval").startswith("nan Q There")     # cn checks only for null
  assert mmbench.prompt(row, "en", "llava").startswith("Q\nA. x\nAnswer")     # "nan" ends LLaVA's options
  assert mmbench.prompt(dict(row, hint=None, B="y", C="z"), "en", "llava").startswith("Q\nA. x\nB. y\nC. z\nAnswer")


def test_answer_extraction_letter_then_text_then_static():
  options = {"A": "red", "B": "blue", "C": "green"}
  assert mmbench.answer("The answer is C", options) == "C"
  assert mmbench.answer("blue", options) == "B"                    # the option text
  assert mmbench.answer("Option (B) or maybe (A)", options) == "A"  # static extraction: the last "(X)"
  assert mmbench.answer("I cannot tell", options) == ""
  assert EN.parse("  blue  ", {"options": options}, "llava") == "B"


def _scored_rows(tmp_path, generations):
  _write(tmp_path, "en")
  return [{"question_id": e.question_id, "generation": generations[e.question_id], "target": e.target,
           "meta": e.meta} for e in EN.examples(str(tmp_path), "llava", False)]


def test_single_pass_and_circular_accuracy_by_hand(tmp_path):
  rows = _scored_rows(tmp_path, {
      "0": "A",                       # right
      "1000000": "The answer is C",   # right (one bare letter)
      "2000000": "blue",              # right (the text of B in this rotation)
      "1": "yes",                     # right (text of A)
      "1000001": "No, it is night."})  # wrong: the text "no" is option A in this rotation, the answer is B
  for protocol in ("llava", "lmms_eval"):
    assert EN.score(rows, protocol) == {
        "accuracy": 1.0, "circular_accuracy": 0.5, "questions": 2.0,
        "accuracy/attribute": 1.0, "circular_accuracy/attribute": 1.0,
        "accuracy/scene": 1.0, "circular_accuracy/scene": 0.0}
  rows[0]["generation"] = "B"        # question 0's own row wrong: both of its scores drop
  assert EN.score(rows, "llava")["accuracy"] == 0.5 and EN.score(rows, "llava")["circular_accuracy"] == 0.0


def test_task_fields():
  assert EN.max_new_tokens == {"llava": 1024, "lmms_eval": 1024} and CN.max_new_tokens["lmms_eval"] == 256
  assert EN.image_aspect == {"llava": "pad", "lmms_eval": "pad"}   # lmms-eval: the checkpoint config's "pad" wins
  assert (EN.config, CN.config, EN.split, EN.id_source, EN.num_rows) == ("en", "cn", "dev", "index", 4329)


def test_bad_data(tmp_path):
  bad = [dict(r) for r in ROWS]
  bad[1]["answer"] = "C"                        # question 1 has only A and B
  files = _write(tmp_path / "a", "en", bad)
  with pytest.raises(ValueError, match=rf"{files[0]} row 1: answer 'C' is not one of the options \['A', 'B'\]"):
    list(EN.examples(str(tmp_path / "a"), "llava", False))
  files = _write(tmp_path / "b", "en", [dict(r, index="x" if r["index"] == 1 else str(r["index"])) for r in ROWS],
                 pa.string())
  with pytest.raises(ValueError, match=rf"{files[0]} row 1: field 'index' is str 'x'; expected an integer"):
    list(EN.examples(str(tmp_path / "b"), "llava", False))
  _write(tmp_path / "c", "cn")
  with pytest.raises(ValueError, match="no config 'en'"):
    list(EN.examples(str(tmp_path / "c"), "llava", False))
  copies_only = [{"question_id": "1000000", "generation": "A", "target": "C",
                  "meta": {"index": 1_000_000, "options": {"A": "x"}, "category": "c", "l2_category": None}}]
  with pytest.raises(ValueError, match="no question rows"):
    EN.score(copies_only, "llava")
