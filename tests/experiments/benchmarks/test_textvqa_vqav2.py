"""experiments.benchmarks.textvqa and .vqav2: prompts with and without the OCR hint, layouts, VQA accuracy."""

import numpy as np
import pytest

import lmms_fixtures
from experiments.benchmarks import textvqa, vqav2

SUFFIX = "\nAnswer the question using a single word or phrase."


def _textvqa_rows():
  return [{"image_id": f"img{i}", "question_id": 34602 + i, "question": q, "question_tokens": q.split(),
           "image": lmms_fixtures.image_cell(i), "image_width": 8, "image_height": 6, "flickr_original_url": "",
           "flickr_300k_url": "", "answers": answers, "image_classes": ["Camera"], "set_name": "val",
           "ocr_tokens": ocr}
          for i, (q, answers, ocr) in enumerate([
              ("what brand is this CAMERA?", ["Nikon"] * 3 + ["nikon camera"] * 7, ["nikon", "D3"]),
              ("how many?", ["two"] * 2 + ["3"] * 8, [])])]


def test_prompts_by_protocol_and_hint():
  assert textvqa.prompt("what brand is this CAMERA?", None, "lmms_eval") == "What brand is this camera?" + SUFFIX
  # LLaVA's question file: the first character upper-cased, the rest as stored (not str.capitalize).
  assert textvqa.prompt("what brand is this CAMERA?", None, "llava") == "What brand is this CAMERA?" + SUFFIX
  assert textvqa.prompt("what brand?", ["nikon", "D3"], "llava") == (
      "What brand?\nReference OCR token: nikon, D3" + SUFFIX)
  assert textvqa.prompt("7up or pepsi?", None, "llava") == "7up or pepsi?" + SUFFIX


def test_textvqa_examples_with_and_without_the_hint(tmp_path):
  lmms_fixtures.write_split(str(tmp_path), None, "validation", _textvqa_rows(), lmms_fixtures.SCHEMAS["textvqa"],
                            num_shards=2)
  plain = list(textvqa.TASKS["textvqa_val"].examples(str(tmp_path), "lmms_eval", True))
  hinted = list(textvqa.TASKS["textvqa_val_ocr"].examples(str(tmp_path), "lmms_eval", False))
  assert [e.question_id for e in plain] == ["34602", "34603"]
  assert plain[0].text == "What brand is this camera?" + SUFFIX
  assert hinted[0].text == "What brand is this camera?\nReference OCR token: nikon, D3" + SUFFIX
  assert hinted[1].text == "How many?\nReference OCR token: " + SUFFIX  # an empty token list keeps the line
  assert plain[1].target == ["two", "two"] + ["3"] * 8
  np.testing.assert_array_equal(plain[1].image, lmms_fixtures.decoded(1))
  assert hinted[0].image is None


def test_textvqa_accuracy_normalises_both_sides():
  rows = [{"question_id": "1", "prediction": "Nikon.", "target": ["Nikon"] * 3 + ["nikon camera"] * 7, "meta": {}},
          {"question_id": "2", "prediction": "Two", "target": ["two"] * 2 + ["3"] * 8, "meta": {}}]
  # "nikon" matches 3 of 10 answers: 0.9; "2" matches the 2 answers "two" -> "2": 0.6
  for protocol in ("llava", "lmms_eval"):
    assert textvqa.TASKS["textvqa_val"].score(rows, protocol) == {"accuracy": pytest.approx((0.9 + 0.6) / 2)}


def _vqav2_rows(answer_lists):
  return [{"question_type": "what", "multiple_choice_answer": (answers or [""])[0],
           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
           "image_id": 42 + i, "answer_type": "other", "question_id": 420000 + i, "question": f"What is {i}?",
           "image": lmms_fixtures.image_cell(i)} for i, answers in enumerate(answer_lists)]


def test_vqav2_and_lite_layouts(tmp_path):
  full, lite = str(tmp_path / "VQAv2"), str(tmp_path / "LMMs-Eval-Lite")
  lmms_fixtures.write_split(full, None, "validation", _vqav2_rows([["red"] * 10, ["2"] * 10, ["a"] * 10]),
                            lmms_fixtures.SCHEMAS["VQAv2"], num_shards=3)
  lite_files = lmms_fixtures.write_split(lite, "vqav2_val", "lite", _vqav2_rows([["yes"] * 10]),
                                         lmms_fixtures.SCHEMAS["VQAv2"])
  assert lite_files[0].endswith("vqav2_val/lite-00000-of-00001.parquet")
  examples = list(vqav2.TASKS["vqav2_val"].examples(full, "llava", True))
  assert [e.question_id for e in examples] == ["420000", "420001", "420002"]
  assert examples[0].text == "What is 0?" + SUFFIX and examples[0].target == ["red"] * 10
  assert examples[1].meta == {"image_id": 43, "answer_type": "other"}
  np.testing.assert_array_equal(examples[2].image, lmms_fixtures.decoded(2))
  assert [e.target for e in vqav2.TASKS["vqav2_val_lite"].examples(lite, "lmms_eval", False)] == [["yes"] * 10]


def test_vqav2_protocols_differ_where_the_first_normalisation_step_matters():
  rows = [{"question_id": "1", "prediction": "What's?", "target": ["what's"] * 4 + ["what"] * 6, "meta": {}}]
  # lmms-eval: "What's?" -> "what's", 4 matches: 1.0; LLaVA's EvalAI processing gives "what 's": 0 matches
  assert vqav2.TASKS["vqav2_val"].score(rows, "lmms_eval") == {"accuracy": 1.0}
  assert vqav2.TASKS["vqav2_val"].score(rows, "llava") == {"accuracy": 0.0}
  rows = [{"question_id": "2", "prediction": "Two.", "target": ["2"] * 3 + ["3"] * 7, "meta": {}}]
  for protocol in ("llava", "lmms_eval"):  # "2" matches 3 answers: 0.9
    assert vqav2.TASKS["vqav2_val"].score(rows, protocol) == {"accuracy": pytest.approx(0.9)}


def test_bad_rows_are_named(tmp_path):
  rows = _vqav2_rows([["red"] * 10, []])
  files = lmms_fixtures.write_split(str(tmp_path), None, "validation", rows, lmms_fixtures.SCHEMAS["VQAv2"])
  with pytest.raises(ValueError, match=rf"{files[0]} row 1: no ground-truth answers"):
    list(vqav2.TASKS["vqav2_val"].examples(str(tmp_path), "llava", False))
  with pytest.raises(ValueError, match="split .validation.*no parquet shards.*does not exist"):
    list(textvqa.TASKS["textvqa_val"].examples(str(tmp_path / "missing"), "llava", False))


def test_task_facts():
  facts = {n: (t.repo, t.config, t.split, t.num_rows, t.max_new_tokens["lmms_eval"], t.max_new_tokens["llava"])
           for n, t in {**textvqa.TASKS, **vqav2.TASKS}.items()}
  assert facts == {
      "textvqa_val": ("lmms-lab/textvqa", None, "validation", 5000, 1024, 128),
      "textvqa_val_ocr": ("lmms-lab/textvqa", None, "validation", 5000, 1024, 128),
      "vqav2_val": ("lmms-lab/VQAv2", None, "validation", 214354, 16, 128),
      "vqav2_val_lite": ("lmms-lab/LMMs-Eval-Lite", "vqav2_val", "lite", 500, 16, 128)}
  assert vqav2.TASKS["vqav2_val_lite"].folder == "LMMs-Eval-Lite"
