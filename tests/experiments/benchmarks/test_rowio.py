"""experiments.benchmarks.rowio: a bad field is named (file, row, field) when its row is read, for every task that
reads it, and by experiments.score too; never a traceback, never after the split was evaluated."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmms_fixtures
from experiments import score
from experiments.benchmarks import gqa, registry, rowio


def _pope_rows(n=3):
  return [dict(id=str(i), question_id=str(100 + i), question=f"Is there a dog {i}?", answer="yes",
               image_source="", image=lmms_fixtures.image_cell(i), category="adversarial") for i in range(n)]


def _mme_rows(n=3):
  return [dict(question_id=f"existence/{i // 2}.png", image=lmms_fixtures.image_cell(i), question="Is it? Please "
               "answer yes or no.", answer="Yes", category="existence") for i in range(n)]


def _gqa_rows(n=3):
  return [dict(id=f"q{i}", imageId="n1", question="What is it?", answer="cat", fullAnswer="A cat.", isBalanced=True)
          for i in range(n)]


def _textvqa_rows(n=3):
  return [dict(image_id="img", question_id=34602 + i, question="what brand?", question_tokens=["what", "brand"],
               image=lmms_fixtures.image_cell(i), image_width=8, image_height=6, flickr_original_url="",
               flickr_300k_url="", answers=["nikon"] * 10, image_classes=[], set_name="val",
               ocr_tokens=["nikon"]) for i in range(n)]


# task -> (rows, config, split, schema); the snapshot of each is one shard, so the bad row is "row 1" of it.
_LAYOUTS = {
    "pope": (_pope_rows, None, "test", lmms_fixtures.SCHEMAS["POPE"]),
    "mme": (_mme_rows, None, "test", lmms_fixtures.SCHEMAS["MME"]),
    "gqa": (_gqa_rows, gqa.INSTRUCTIONS, "testdev", lmms_fixtures.SCHEMAS["GQA/instructions"]),
    "textvqa_val": (_textvqa_rows, None, "validation", lmms_fixtures.SCHEMAS["textvqa"]),
    "textvqa_val_ocr": (_textvqa_rows, None, "validation", lmms_fixtures.SCHEMAS["textvqa"]),
}


def _snapshot(root, task, **bad):
  """The task's snapshot with row 1's fields replaced by `bad`; returns its one shard."""
  rows_fn, config, split, schema = _LAYOUTS[task]
  rows = rows_fn()
  rows[1].update(bad)
  return lmms_fixtures.write_split(str(root), config, split, rows, schema)[0]


def _read(task, root):
  return list(registry.TASKS[task].examples(str(root), "lmms_eval", False))


@pytest.mark.parametrize("task, bad, message", [
    ("pope", dict(question=None), "field 'question' is null"),
    ("mme", dict(question=None), "field 'question' is null"),
    ("gqa", dict(question=None), "field 'question' is null"),
    ("textvqa_val", dict(question=None), "field 'question' is null"),
    ("gqa", dict(answer=None), "field 'answer' is null"),                      # failed only when scoring
    ("textvqa_val", dict(answers=["nikon", None] + ["nikon"] * 8), r"field 'answers\[1\]' is null"),   # likewise
    ("textvqa_val_ocr", dict(ocr_tokens=["nikon", None]), r"field 'ocr_tokens\[1\]' is null"),
    ("pope", dict(question_id=None), "field 'question_id' is null"),           # was the id "None"
    ("textvqa_val", dict(question_id=None), "field 'question_id' is null"),
    ("pope", dict(question="Is there <image> a dog?"), "field 'question' holds '<image>'"),
    ("mme", dict(question="<image>\nIs it?"), "field 'question' holds '<image>'"),
    ("pope", dict(category=None), "field 'category' is null"),                 # failed only when scoring
    ("pope", dict(category="gqa"), r"category 'gqa' is not one of \('adversarial', 'popular', 'random'\)"),
    ("mme", dict(category="vqa"), "category 'vqa' is not an MME category"),
])
def test_a_bad_field_is_named_with_its_file_and_row(tmp_path, task, bad, message):
  shard = _snapshot(tmp_path, task, **bad)
  with pytest.raises(ValueError, match=rf"{shard} row 1: {message}"):
    _read(task, tmp_path)


@pytest.mark.parametrize("column_type, value, shown", [(pa.int64(), 7, "int 7"),
                                                       (pa.binary(), b"Is there a dog?", "bytes b'Is there")])
def test_a_question_column_of_another_type_is_named(tmp_path, column_type, value, shown):
  schema = lmms_fixtures.SCHEMAS["POPE"]
  schema = schema.set(schema.get_field_index("question"), pa.field("question", column_type))
  rows = [dict(r, question=value) for r in _pope_rows()]
  shard = lmms_fixtures.write_split(str(tmp_path), None, "test", rows, schema)[0]
  with pytest.raises(ValueError, match=rf"{shard} row 0: field 'question' is {shown}.*; expected a string"):
    _read("pope", tmp_path)


def test_invalid_utf8_is_named_with_its_row_and_field(tmp_path):
  shard = _snapshot(tmp_path, "pope")
  table = pq.read_table(shard)
  raw = pa.array([b"Is there a dog?", b"Is there a \xff\xfe dog?", b"Is it?"], pa.binary()).view(pa.string())
  pq.write_table(table.set_column(table.schema.get_field_index("question"), "question", raw), shard)
  with pytest.raises(ValueError, match=rf"{shard} row 1: field 'question' is not valid UTF-8"):
    _read("pope", tmp_path)


def test_an_id_used_twice_is_refused_naming_both_rows(tmp_path):
  shard = _snapshot(tmp_path, "pope", question_id="100")
  with pytest.raises(ValueError, match=rf"{shard} row 1: question_id '100' is also that of {shard} row 0"):
    _read("pope", tmp_path)


def test_score_refuses_the_bad_rows_it_reads(tmp_path):
  """experiments.score reads the split as the runner does: a duplicated id is refused (it used to score with
  `missing: -1`), a null question is named (it used to be a traceback)."""
  _snapshot(tmp_path / "dup", "pope", question_id="100")
  predictions = {"100": "yes", "102": "no"}
  with pytest.raises(ValueError, match="question_id '100' is also that of"):
    score.score(registry.TASKS["pope"], str(tmp_path / "dup"), predictions, "lmms_eval")
  shard = _snapshot(tmp_path / "null", "mme", question=None)
  with pytest.raises(ValueError, match=rf"{shard} row 1: field 'question' is null"):
    score.score(registry.TASKS["mme"], str(tmp_path / "null"), {"0": "yes"}, "lmms_eval")


def test_read_field_kinds():
  where = "f row 3"
  assert rowio.read_field(7, rowio.ID, "id", where) == "7"
  assert rowio.read_field("0007", rowio.INT, "index", where) == 7
  assert rowio.read_field(float("nan"), rowio.OPTIONAL_PROMPT, "A", where) is None    # pandas' NaN is a null
  assert rowio.read_field(None, rowio.Field("texts", nullable=True), "ocr_tokens", where) == []
  assert rowio.read_field([{"answer": "a"}], rowio.Field("texts", item_key="answer"), "answers", where) == ["a"]
  with pytest.raises(ValueError, match=r"f row 3: field 'answers\[0\].answer' is null"):
    rowio.read_field([{"answer": None}], rowio.Field("texts", item_key="answer"), "answers", where)
  with pytest.raises(ValueError, match="f row 3: field 'id' is bool True; expected a string or an integer"):
    rowio.read_field(True, rowio.ID, "id", where)
  with pytest.raises(ValueError, match=r"f row 3: field 'choices\[1\]' holds '<image>'"):
    rowio.read_field(["a", "<image>"], rowio.PROMPT_TEXTS, "choices", where)
  assert rowio.read_field(None, rowio.ANY, "meta", where) is None
