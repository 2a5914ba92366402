"""experiments.benchmarks.summary: the papers' relative-% summaries, against METHODS.md's per-benchmark rows."""

import pytest

from experiments.benchmarks import summary


def _scores(gqa, sqa, textvqa, pope, mme_p, mmb, mmb_cn, mmvet):
  """A run's task scores as the tasks report them (fractions; MME in points; MM-Vet as a judge's 0-100 score)."""
  return {"gqa": {"accuracy": gqa / 100}, "scienceqa_img": {"accuracy": sqa / 100},
          "textvqa_val_ocr": {"accuracy": textvqa / 100}, "pope": {"mean_f1": pope / 100, "f1": 0.0},
          "mme": {"perception": mme_p}, "mmbench_en_dev": {"circular_accuracy": mmb / 100, "accuracy": 0.0},
          "mmbench_cn_dev": {"circular_accuracy": mmb_cn / 100}, "mmvet": {"questions": 218.0, "score": mmvet}}


# METHODS.md, TOPS Table 1: GQA / SQA-IMG / TextVQA / POPE / MME-P / MMB / MMB-CN / MM-Vet.
LLAVA15_BASE = _scores(61.9, 69.5, 58.2, 85.9, 1506.5, 64.7, 58.1, 31.3)       # -> Acc 63.1
LLAVA15_TOPS128 = _scores(60.5, 68.2, 57.0, 86.8, 1482.7, 62.5, 57.2, 30.0)    # -> 98.3%
NEXT_BASE = _scores(62.5, 67.5, 60.3, 86.8, 1511.8, 65.8, 57.3, 40.0)          # -> Acc 64.5
NEXT_TOPS640 = _scores(62.0, 69.3, 60.0, 87.6, 1527.6, 65.7, 59.0, 36.4)       # -> printed 100.0%


def test_tops_rel_reproduces_the_papers_acc_and_relative_score():
  rel = summary.relative(LLAVA15_BASE, LLAVA15_TOPS128, summary.TOPS_COLUMNS)
  # sums with MME-P / 20: base 61.9+69.5+58.2+85.9+75.325+64.7+58.1+31.3 = 504.925, TOPS 496.335
  assert rel.full_mean == pytest.approx(504.925 / 8) and round(rel.full_mean, 1) == 63.1
  assert rel.ratio_of_means == pytest.approx(100 * 496.335 / 504.925) and round(rel.ratio_of_means, 1) == 98.3
  assert rel.columns_a == summary.TOPS_COLUMNS
  text = summary.format_relative("tops/128", rel)
  assert "Rel (a) ratio of means, MME-P/20 (TOPS, CDPruner) = 98.3% (full Acc 63.1)" in text
  assert "Rel (b) mean of per-benchmark ratios, MME-P+C (VisionZip, DART)" in text


def test_next_rows():
  rel = summary.relative(NEXT_BASE, NEXT_TOPS640, summary.TOPS_COLUMNS)
  assert round(rel.full_mean, 1) == 64.5                                     # 515.79 / 8
  # 516.38 / 515.79 = 100.11%: the paper prints 100.0% for this row (its per-benchmark numbers give 100.1).
  assert rel.ratio_of_means == pytest.approx(100 * 516.38 / 515.79)


def test_mean_of_ratios_with_mme_perception_plus_cognition_by_hand():
  full = {"gqa": {"accuracy": 0.60}, "mme": {"perception": 1500.0, "cognition": 300.0}}
  run = {"gqa": {"accuracy": 0.57}, "mme": {"perception": 1350.0, "cognition": 330.0}}
  rel = summary.relative(full, run)
  assert rel.mean_of_ratios == pytest.approx(100 * (0.57 / 0.60 + 1680 / 1800) / 2)   # 94.17
  assert rel.ratio_of_means == pytest.approx(100 * ((57 + 67.5) / 2) / ((60 + 75) / 2))  # 92.22: MME-P / 20 only
  assert rel.columns_a == ("GQA", "MME-P") and rel.columns_b == ("GQA", "MME-P+C") and rel.missing == ()


def test_without_cognition_mme_leaves_b_and_is_named():
  rel = summary.relative(LLAVA15_BASE, LLAVA15_TOPS128, summary.TOPS_COLUMNS)
  assert "MME-P+C" not in rel.columns_b and len(rel.columns_b) == 7
  assert rel.missing == ("MME (b): not in the full and run scores",)
  ratios = [60.5 / 61.9, 68.2 / 69.5, 57.0 / 58.2, 86.8 / 85.9, 62.5 / 64.7, 57.2 / 58.1, 30.0 / 31.3]
  assert rel.mean_of_ratios == pytest.approx(100 * sum(ratios) / 7)


def test_missing_tasks_are_left_out_and_named():
  run = {k: v for k, v in LLAVA15_TOPS128.items() if k != "mmbench_en_dev"}
  run["mmvet"] = {"questions": 218.0}                       # a judged task without the judge's score
  rel = summary.relative(LLAVA15_BASE, run)
  assert "MMB" not in rel.columns_a and "MM-Vet" not in rel.columns_a and len(rel.columns_a) == 6
  assert "MMB: not in the run scores" in rel.missing
  assert any(m.startswith("MM-Vet: not in the run scores (judged") for m in rel.missing)
  assert not any(m.startswith("VQAv2") for m in rel.missing)        # neither run has it: not asked for
  assert "left out: " in summary.format_relative("x", rel)
  with pytest.raises(ValueError, match="unknown benchmark columns"):
    summary.relative(LLAVA15_BASE, run, ["GQA", "SEED"])


def test_headline_sources():
  splits = {"pope_adversarial": {"f1": 0.80}, "pope_popular": {"f1": 0.85}, "pope_random": {"f1": 0.90},
            "textvqa_val": {"accuracy": 0.46}, "mmbench_en_dev": {"accuracy": 0.7, "circular_accuracy": 0.6}}
  values, sources = summary.headline_values(splits)
  assert values["POPE"] == pytest.approx(85.0)
  assert sources["POPE"] == "pope_adversarial.f1+pope_popular.f1+pope_random.f1"
  assert values["TextVQA"] == pytest.approx(46.0) and values["MMB"] == pytest.approx(60.0)
  assert summary.headline_values(splits, mmbench="accuracy")[0]["MMB"] == pytest.approx(70.0)
  both = dict(splits, textvqa_val_ocr={"accuracy": 0.58})
  assert summary.headline_values(both)[1]["TextVQA"] == "textvqa_val_ocr.accuracy"   # the OCR prompt first


def test_a_zero_full_score_has_no_ratio_and_is_named():
  from experiments.benchmarks import summary as summary_lib  # pylint: disable=g-import-not-at-top
  full = {"pope": {"mean_f1": 0.0}, "gqa": {"accuracy": 0.5}}
  run = {"pope": {"mean_f1": 0.3}, "gqa": {"accuracy": 0.25}}
  rel = summary_lib.relative(full, run)
  assert rel.mean_of_ratios == 50.0 and rel.columns_b == ("GQA",)
  assert any("POPE (b): the full model scores 0" in m for m in rel.missing)
  assert rel.ratio_of_means == 100.0 * (30 + 25) / 2 / ((0 + 50) / 2)


def test_a_llava_protocol_pope_run_says_llavas_file_has_8910_questions():
  from experiments.benchmarks import pope  # pylint: disable=g-import-not-at-top
  rows = [{"question_id": str(i), "prediction": p, "target": t, "meta": {"category": c}}
          for i, (p, t, c) in enumerate([("Yes", "yes", "random"), ("No", "no", "popular"), ("No", "yes", "random")])]
  full, run = ({"pope": pope.TASKS["pope"].score(rows[:k], protocol)} for k, protocol in ((3, "llava"), (2, "llava")))
  text = summary.format_relative("tops/128", summary.relative(full, run))
  assert "note: POPE (llava protocol) is scored on lmms-lab/POPE (9,000 questions" in text
  assert "llava_pope_test.jsonl, behind the LLaVA-1.5 paper's POPE, holds 8,910 (its random split differs" in text
  strict = {"pope": pope.TASKS["pope"].score(rows, "lmms_eval")}
  assert summary.relative(strict, strict).notes == ()
  assert summary.relative(full, {"gqa": {"accuracy": 0.5}}).notes == ()     # no POPE column, no note
