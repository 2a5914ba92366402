"""mmstar and ai2d: fixture snapshots in the cards' layouts and schemas; metrics worked by hand."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmms_fixtures
from experiments.benchmarks import ai2d, mmstar

MMSTAR, AI2D = mmstar.TASKS["mmstar"], ai2d.TASKS["ai2d"]
_S = pa.string()
MMSTAR_SCHEMA = pa.schema([("index", pa.int64()), ("question", _S), ("image", lmms_fixtures.IMAGE), ("answer", _S),
                           ("category", _S), ("l2_category", _S),
                           ("meta_info", pa.struct([("source", _S), ("split", _S), ("image_path", _S)]))])
AI2D_SCHEMA = pa.schema([("question", _S), ("options", pa.list_(_S)), ("answer", _S),
                         ("image", lmms_fixtures.IMAGE)])


def _mmstar_snapshot(root, rows):
  """The card's own layout: one root file mmstar.parquet, config "mmstar", split "val"."""
  root.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=MMSTAR_SCHEMA), root / "mmstar.parquet", row_group_size=2)
  (root / "README.md").write_text("---\nconfigs:\n- config_name: mmstar\n  data_files:\n  - split: val\n"
                                  "    path: \"mmstar.parquet\"\n---\n")


def _mmstar_row(index, answer, category, l2, question="Q?\nOptions: A: x, B: y, C: z, D: w"):
  return dict(index=index, question=question, image=lmms_fixtures.image_cell(index), answer=answer,
              category=category, l2_category=l2, meta_info=dict(source="s", split="val", image_path="p"))


CP, SCENE, EMOTION = "coarse perception", "image scene and topic", "image emotion"
MMSTAR_ROWS = [_mmstar_row(10, "A", CP, SCENE, "Which is larger?\nOptions: A: 1, B: 2 Please answer yes or no. "),
               _mmstar_row(11, "A", CP, SCENE), _mmstar_row(12, "B", CP, SCENE), _mmstar_row(13, "B", CP, EMOTION),
               _mmstar_row(14, "C", "math", "geometry")]


def test_mmstar_examples_prompt_and_mean_of_l2_means(tmp_path):
  _mmstar_snapshot(tmp_path, MMSTAR_ROWS)
  ex = list(MMSTAR.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in ex] == ["10", "11", "12", "13", "14"]
  assert ex[0].text == ("Which is larger?\nOptions: A: 1, B: 2"
                        "\nAnswer with the option's letter from the given choices directly")   # no final period
  assert ex[4].meta == {"category": "math", "l2_category": "geometry"} and ex[2].image.shape == (6, 8, 3)
  generations = {"10": "(A)",           # right
                 "11": "C",             # wrong
                 "12": "D",             # wrong
                 "13": "The answer is B",   # right
                 "14": "A. 5"}          # wrong (a leading standalone A)
  rows = [{"question_id": e.question_id, "generation": generations[e.question_id], "target": e.target,
           "meta": e.meta} for e in ex]
  out = MMSTAR.score(rows, "lmms_eval")
  # l2 means: scene 1/3, emotion 1, geometry 0. average = 4/9 (the question mean would be 2/5).
  assert out == pytest.approx({"average": 4 / 9, CP: 2 / 3, "math": 0.0})
  assert MMSTAR.parse("The answer is B", {}, "llava") == "B"


def test_mmstar_bad_answer_and_missing_config(tmp_path):
  _mmstar_snapshot(tmp_path, MMSTAR_ROWS[:2] + [_mmstar_row(15, "E", CP, SCENE)])
  with pytest.raises(ValueError, match=r"mmstar.parquet row 2: answer 'E' is not a letter A-D"):
    list(MMSTAR.examples(str(tmp_path), "llava", False))
  (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: val\n"
                                      "    path: mmstar.parquet\n---\n")
  with pytest.raises(ValueError, match=r"no config 'mmstar' in the dataset card \(configs: \['default'\]\)"):
    list(MMSTAR.examples(str(tmp_path), "llava", False))


def _ai2d_rows():
  return [dict(question=f"q{i}", options=["cat", "dog", "bird"], answer="1", image=lmms_fixtures.image_cell(i))
          for i in range(4)]


def test_ai2d_examples_prompt_filter_and_exact_match(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), None, "test", _ai2d_rows(), AI2D_SCHEMA, num_shards=2)
  ex = list(AI2D.examples(str(tmp_path), "lmms_eval", True))
  assert [e.question_id for e in ex] == ["0", "1", "2", "3"] and {e.target for e in ex} == {"B"}
  assert ex[0].text == "q0\nA. cat\nB. dog\nC. bird\nAnswer with the option's letter from the given choices directly."
  generations = ["B. dog",      # the filter keeps B
                 " (B)",        # no filter match; stripped "(B)" loses its punctuation: "b" == "b"
                 "B dog",       # no filter match; "b dog" != "b"
                 "b"]           # lowercase matches
  rows = [{"question_id": e.question_id, "generation": g, "target": e.target, "meta": e.meta}
          for e, g in zip(ex, generations)]
  assert AI2D.score(rows, "lmms_eval") == {"accuracy": 0.75}
  assert AI2D.score(rows, "llava") == {"accuracy": 0.75}
  assert AI2D.parse("  C. bird", {}, "lmms_eval") == "C"
  assert (AI2D.max_new_tokens, AI2D.image_aspect["lmms_eval"], AI2D.num_rows) == (
      {"llava": 16, "lmms_eval": 16}, "pad", 3088)


@pytest.mark.parametrize("answer, message", [("3", "answer 3 is not an index into its 3 options"),
                                             ("x", "field 'answer' is str 'x'; expected an integer"),
                                             (None, "field 'answer' is null")])
def test_ai2d_answer_not_an_option_index(tmp_path, answer, message):
  rows = _ai2d_rows()
  rows[2]["answer"] = answer
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", rows, AI2D_SCHEMA)
  with pytest.raises(ValueError, match=rf"{files[0]} row 2: {message}"):
    list(AI2D.examples(str(tmp_path), "llava", False))
