"""mmvet: fixture snapshot with lmms-lab/MMVet's schema, the prompts, and the judge file MM-Vet's evaluator reads."""

import json

import pyarrow as pa
import pytest

import lmms_fixtures
from experiments.benchmarks import mmvet

TASK = mmvet.TASKS["mmvet"]
_S = pa.string()
SCHEMA = pa.schema([("question_id", _S), ("image", lmms_fixtures.IMAGE), ("question", _S), ("answer", _S),
                    ("image_source", _S), ("capability", _S)])


def _rows(ids):
  return [dict(question_id=q, image=lmms_fixtures.image_cell(i), question=f"What is x in equation {i}?",
               answer="-1 <AND> -5", image_source="s", capability="ocr,math") for i, q in enumerate(ids)]


def test_examples_prompts_and_counts(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), None, "test", _rows(["v1_0", "v1_1", "v1_2"]), SCHEMA, num_shards=2)
  ex = list(TASK.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in ex] == ["v1_0", "v1_1", "v1_2"] and ex[1].meta == {"capability": "ocr,math"}
  assert ex[0].text == ("First please perform reasoning, and think step by step to provide best answer to the "
                        "following question: \n\nWhat is x in equation 0?")
  assert next(TASK.examples(str(tmp_path), "llava", False)).text == "What is x in equation 0?"
  rows = [{"question_id": e.question_id, "generation": g, "target": e.target, "meta": e.meta}
          for e, g in zip(ex, ["x = -1", " ", "x = -5"])]
  assert TASK.judged and TASK.score(rows, "llava") == {"questions": 3.0, "empty": 1.0}


def test_judge_file_is_mm_vets_results_object(tmp_path):
  rows = [{"question_id": q, "generation": g} for q, g in [("0", "a"), ("v1_1", "b"), ("2", "c")]]
  path = mmvet.write_judge_file(rows, str(tmp_path / "results" / "run.json"), expected=3)
  with open(path, encoding="utf-8") as f:
    assert json.load(f) == {"v1_0": "a", "v1_1": "b", "v1_2": "c"}     # LLaVA's convert_mmvet_for_eval keys
  with pytest.raises(ValueError, match="2 predictions, the judge reads all 218"):
    mmvet.judge_predictions(rows[:2])
  assert mmvet.judge_predictions(rows[:2], expected=None) == {"v1_0": "a", "v1_1": "b"}
  with pytest.raises(ValueError, match="question v1_0 occurs twice"):
    mmvet.judge_predictions(rows + [{"question_id": "v1_0", "generation": "d"}], expected=None)


def test_bad_question_id(tmp_path):
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", _rows(["v1_0", "q7"]), SCHEMA)
  with pytest.raises(ValueError, match=rf"{files[0]} row 1: MM-Vet question_id 'q7' is neither"):
    list(TASK.examples(str(tmp_path), "llava", False))
