"""experiments.benchmarks.vqa_eval: EvalAI's answer normalisation rule by rule, and the leave-one-out accuracy.

Every expected value is worked out by hand from the official processor's steps (module docstring of vqa_eval).
"""

import pytest

from experiments.benchmarks import vqa_eval


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),                      # lowercase
    ("dont", "don't"),                   # contraction table
    ("Whats", "what's"),                 # lowercased, then the table
    ("isnt it", "isn't it"),
    ("somebody'd", "somebodyd"),         # the table's odd entry, kept
    ("Two", "2"),                        # number words
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("eleven", "eleven"),                # only zero..ten
    ("a dog", "dog"),                    # articles
    ("The cat and an apple", "cat and apple"),
    ("John's", "john 's"),               # "'s" split off
    ("what?", "what"),                   # "?" and "," deleted first
    ("1,000", "1000"),
    ("hot-dog", "hot dog"),              # punctuation without a space beside it: a space
    ("hot - dog", "hot dog"),            # beside a space: deleted (then whitespace collapses)
    ("(a) cat", "cat"),                  # ")" is beside a space: deleted; "(" is not: a space; "a" dropped
    ("3.5", "3.5"),                      # a period before a digit stays
    ("a.m.", "am"),                      # other periods go
    ("yes.", "yes"),
    ("  red\tand\nblue ", "red and blue"),  # tabs and newlines are spaces
    ("50%", "50%"),                      # "%" is not in the list
])
def test_normalize_rules(raw, expected):
  assert vqa_eval.normalize(raw) == expected


def test_at_most_32_periods_are_deleted():
  # the official code passes re.UNICODE (32) as Pattern.sub's count: 40 periods leave 8
  assert vqa_eval.normalize("." * 40 + "x") == "." * 8 + "x"


def test_a_digit_comma_digit_makes_every_listed_punctuation_vanish():
  # lmms-eval's VQAv2 path keeps commas until step 3, where "1,000" triggers deletion of all listed marks
  assert vqa_eval.normalize_vqav2("1,000 hot-dogs") == "1000 hotdogs"
  assert vqa_eval.normalize_vqav2("hot-dogs") == "hot dogs"


def test_vqav2_normalisation_skips_the_first_step():
  assert vqa_eval.normalize("What's?") == "what 's"       # "?" deleted, "'s" split
  assert vqa_eval.normalize_vqav2("What's?") == "what's"  # "?" becomes a space; lowercased in step 4
  assert vqa_eval.normalize_vqav2("Two Dogs") == "2 dogs"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_on_ten_answers(matches, expected):
  # with m matching answers of 10: m subsets lose a match (min(1, (m-1)/3)), 10-m keep all (min(1, m/3))
  answers = ["2"] * matches + ["3"] * (10 - matches)
  assert vqa_eval.vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_accuracy_compares_exact_strings_and_needs_answers():
  assert vqa_eval.vqa_accuracy("two", ["2"] * 10) == 0.0  # normalisation is the caller's
  with pytest.raises(ValueError, match="no ground-truth answers"):
    vqa_eval.vqa_accuracy("2", [])
