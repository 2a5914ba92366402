"""experiments.benchmarks.choices against cases worked by hand from the official functions' code."""

import pytest

from experiments.benchmarks import choices


@pytest.mark.parametrize("text, parsed", [
    ("B", "B"),
    ("B. the square", "B"),
    ("B.", "FAILED"),                         # two characters: neither a bare letter nor "X. "
    ("b", "FAILED"),                          # case-sensitive
    ("F", "FAILED"),                          # only A-E count as a bare letter
    ("The answer is C.", "C"),
    ("The answer is Cx", "C"),                # the regex's "." is any character
    ("The answer is C. The answer is D.", "FAILED"),   # two matches
    ("I pick C", "FAILED"),
])
def test_llava_science_qa_parse(text, parsed):
  assert choices.eval_science_qa_answer(text) == parsed


def test_llava_science_qa_letter_beyond_the_choices_is_wrong():
  assert choices.get_pred_idx("B", 2) == 1
  assert choices.get_pred_idx("C", 2) == -1
  assert choices.get_pred_idx("FAILED", 5) == -1


@pytest.mark.parametrize("prediction, score", [
    ("b", 1.0),                  # equal ignoring case
    (" B. the cat ", 1.0),       # "X." prefix after the strip
    ("B.", 1.0),                 # LLaVA's parser fails this one
    ("b. the cat", 0.0),         # the prefix letter must be uppercase
    ("The answer is B.", 0.0),   # LLaVA's parser accepts this one
    ("B cat", 0.0),
    ("C. B", 0.0),
])
def test_lmms_eval_sqa_process_results(prediction, score):
  assert choices.sqa_process_results("B", prediction) == score


@pytest.mark.parametrize("answer, inferred", [
    ("B", "B"),
    ("The answer is B", "B"),          # one bare letter among 4 tokens, none of them "A"
    ("I think A", "A"),                # "A" among 3 tokens counts
    ("A cat is on the mat", False),    # "A" among more than 3 tokens is read as the article
    ("A.", "A"),
    ("(C) dog", "C"),
    ("A or B", False),                 # two bare letters, no wrapped one
    ("E", "E"),                        # A-E whatever the options
    ("answer: (B).", "B"),
    ("Failed to obtain answer via API", False),
])
def test_mmbench_can_infer_option(answer, inferred):
  assert choices.can_infer_option(answer) == inferred


def test_mmbench_can_infer_text_and_can_infer():
  options = {"A": "Teddy bear", "B": "rabbit", "C": "cat"}
  assert choices.can_infer_text("a cute teddy bear", dict(options)) == "A"
  assert choices.can_infer_text("a cat and a rabbit", dict(options)) is False     # two texts found
  assert choices.can_infer_text("a catalog", dict(options)) == "C"                # substring, not word
  assert choices.can_infer("The rabbit.", dict(options)) == "B"                   # no letter: the text decides
  assert choices.can_infer("C. rabbit", dict(options)) == "C"                     # the letter first


@pytest.mark.parametrize("response, letters, extracted", [
    ("The correct answer is (B).", None, "B"),          # a phrase (7) beats "(B)" (6)
    ("B is wrong, the answer is C", None, "B"),         # a standalone leading letter (10) beats the phrase
    ("A", None, "A"),
    ("Dog", "ABCD", "D"),                               # "D" starts a word: only the fallback finds it
    ("none of them", "ABCD", ""),
    ("", None, ""),
    ("I choose: C, not (A)", "ABCD", "A"),              # every letter after the phrase is a candidate: the last wins
    ("(A) or (B)", "ABCD", "B"),                        # within one form (parentheses) the last occurrence wins
])
def test_lmms_eval_extract_mcq_answer(response, letters, extracted):
  assert choices.extract_mcq_answer(response, list(letters) if letters else None) == extracted


def test_mmbench_circular_grouping_one_rotated_copy_wrong():
  items = [dict(index=5, hit=True, category="c1", l2_category="L"),
           dict(index=1_000_005, hit=True, category="c1", l2_category="L"),
           dict(index=2_000_005, hit=False, category="c1", l2_category="L"),   # one rotation wrong
           dict(index=7, hit=True, category="c2", l2_category="L"),
           dict(index=1_000_007, hit=True, category="c2", l2_category="L"),
           dict(index=1_000_009, hit=False, category="c3", l2_category="L")]   # a copy without its question
  out = choices.mmbench_eval_result(items)
  assert out["questions"] == 2 and out["rows"] == 5
  assert out["single"] == 1.0          # both question rows right
  assert out["circular"] == 0.5        # question 5 fails through its third rotation
  assert out["category"] == {"c1": (1.0, 0.0), "c2": (1.0, 1.0)}
  assert out["l2_category"] == {"L": (1.0, 0.5)}
  with pytest.raises(ValueError, match="index 5 occurs twice"):
    choices.mmbench_eval_result(items + [dict(index=5, hit=True, category="c1", l2_category="L")])


def test_ai2d_filter_and_exact_match():
  assert choices.multi_choice_regex_filter("  B. dog") == "B"
  assert choices.multi_choice_regex_filter("B dog") == "B dog"
  assert choices.multi_choice_regex_filter("b. dog") == "b. dog"
  assert choices.exact_match("(B)", "B")          # punctuation deleted
  assert choices.exact_match("b", "B")
  assert not choices.exact_match("B ", "B")       # no whitespace strip in the metric


def test_options_lines():
  assert choices.options_lines(["x", "y"]) == "A. x\nB. y"
