"""scienceqa_img: fixture snapshots with lmms-lab/ScienceQA's schema, both protocols' prompts and scores."""

import numpy as np
import pyarrow as pa
import pytest

import lmms_fixtures
from experiments.benchmarks import scienceqa

TASK = scienceqa.TASKS["scienceqa_img"]
_S = pa.string()
SCHEMA = pa.schema([("image", lmms_fixtures.IMAGE), ("question", _S), ("choices", pa.list_(_S)),
                    ("answer", pa.int8()), ("hint", _S), ("task", _S), ("grade", _S), ("subject", _S),
                    ("topic", _S), ("category", _S), ("skill", _S), ("lecture", _S), ("solution", _S)])


def _row(i, question, options, answer, hint=""):
  return {"image": lmms_fixtures.image_cell(i), "question": question, "choices": options, "answer": answer,
          "hint": hint, "task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "t",
          "category": "c", "skill": "s", "lecture": "", "solution": ""}


ROWS = [_row(0, "Which is blue?", ["the circle", "the square"], 1, hint="Look at the shapes."),
        _row(1, "Which state is farthest north?", ["Ohio", "Texas", "Iowa"], 0),
        _row(2, "Q2", ["x", "y"], 0),
        _row(3, "Q3", ["x", "y", "z"], 2),
        _row(4, "Q4", ["x", "y"], 1)]


def _write(root, rows=ROWS, shards=2, schema=SCHEMA):
  return lmms_fixtures.write_split(str(root), "ScienceQA-IMG", "test", rows, schema, num_shards=shards)


def test_examples_stream_in_shard_order_with_both_protocols_prompts(tmp_path):
  _write(tmp_path)
  ex = list(TASK.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in ex] == ["0", "1", "2", "3", "4"]
  assert [e.target for e in ex] == ["B", "A", "A", "C", "B"]
  np.testing.assert_array_equal(ex[3].image, lmms_fixtures.decoded(3))
  suffix = "\nAnswer with the option's letter from the given choices directly."
  assert ex[0].text == "Context: Look at the shapes.\nWhich is blue?\nA. the circle\nB. the square" + suffix
  assert ex[1].text == "Which state is farthest north?\nA. Ohio\nB. Texas\nC. Iowa" + suffix
  llava = list(TASK.examples(str(tmp_path), "llava", False))
  assert [e.text for e in llava[:2]] == [ex[0].text, ex[1].text] and llava[0].image is None


def test_lmms_eval_prints_a_null_hint_as_none_llava_drops_it():
  assert scienceqa.prompt("Q", ["x"], None, "lmms_eval").startswith("NoneQ\nA. x")
  assert scienceqa.prompt(" Q", ["x"], None, "llava").startswith("Q\nA. x")      # the question file is stripped
  with pytest.raises(ValueError, match="unknown protocol"):
    scienceqa.prompt("Q", ["x"], "", "vlmevalkit")


def _rows(pairs):
  return [{"question_id": str(i), "generation": g, "target": t, "meta": {"num_choices": n}}
          for i, (g, t, n) in enumerate(pairs)]


def test_scores_of_the_two_parsers_by_hand():
  rows = _rows([("B.", "B", 2),                  # llava: FAILED; lmms-eval: the "X." rule
                ("The answer is A.", "A", 2),    # llava: the regex; lmms-eval: wrong
                ("C", "C", 3),                   # both
                ("D", "B", 3),                   # both wrong (llava: D is beyond 3 choices)
                ("a", "A", 2)])                  # llava: case-sensitive FAILED; lmms-eval: right
  assert TASK.score(rows, "llava") == {"accuracy": 0.4, "unparsed": 2.0}
  assert TASK.score(rows, "lmms_eval") == {"accuracy": 0.6, "unparsed": 1.0}
  assert TASK.parse("  B. the square", {}, "llava") == "B"
  assert TASK.parse("B.", {}, "lmms_eval") == "B"
  assert TASK.parse("B.", {}, "llava") == "FAILED"


def test_task_fields():
  assert TASK.max_new_tokens == {"llava": 1024, "lmms_eval": 16}
  assert TASK.image_aspect == {"llava": "pad", "lmms_eval": "pad"}   # lmms-eval: the checkpoint config's "pad" wins
  assert (TASK.config, TASK.split, TASK.num_rows, TASK.id_source) == ("ScienceQA-IMG", "test", 2017, "position")


def test_bad_data_names_file_row_and_column(tmp_path):
  with pytest.raises(ValueError, match="no config 'ScienceQA-IMG'|no parquet shards"):
    list(TASK.examples(str(tmp_path / "missing"), "llava", True))
  lmms_fixtures.write_split(str(tmp_path / "nosplit"), "ScienceQA-IMG", "validation", ROWS, SCHEMA)
  with pytest.raises(ValueError, match="has no split 'test'"):
    list(TASK.examples(str(tmp_path / "nosplit"), "llava", True))
  no_hint = pa.schema([f for f in SCHEMA if f.name != "hint"])
  files = _write(tmp_path / "nohint", [{k: v for k, v in r.items() if k != "hint"} for r in ROWS], 1, no_hint)
  with pytest.raises(ValueError, match=rf"{files[0]}: missing column\(s\) \['hint'\]"):
    list(TASK.examples(str(tmp_path / "nohint"), "llava", False))
  corrupt = [dict(r) for r in ROWS]
  corrupt[3]["image"] = {"bytes": b"not a png", "path": "3.png"}
  files = _write(tmp_path / "corrupt", corrupt, 1)
  with pytest.raises(ValueError, match=rf"{files[0]} row 3: the image cannot be decoded"):
    list(TASK.examples(str(tmp_path / "corrupt"), "llava", True))
  assert len(list(TASK.examples(str(tmp_path / "corrupt"), "llava", False))) == 5   # no image read, none decoded
  bad = [dict(r) for r in ROWS]
  bad[4]["answer"] = 2
  files = _write(tmp_path / "bad", bad, 1)
  with pytest.raises(ValueError, match=rf"{files[0]} row 4: answer 2 is not an index into its 2 choices"):
    list(TASK.examples(str(tmp_path / "bad"), "llava", False))
  _write(tmp_path / "empty", [], 1)
  with pytest.raises(ValueError, match="empty split"):
    list(TASK.examples(str(tmp_path / "empty"), "llava", False))
  with pytest.raises(ValueError, match="no rows to score"):
    TASK.score([], "llava")
