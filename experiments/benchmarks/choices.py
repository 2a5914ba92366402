"""Option-letter prompts and answer parsing of the multiple-choice benchmarks, each mirroring one official function.

Read at haotian-liu/LLaVA c121f04, EvolvingLMMs-Lab/lmms-eval 75571cf (our own code; the behaviour, quirks included,
is theirs):

- `eval_science_qa_answer`, `get_pred_idx`: LLaVA's `llava/eval/eval_science_qa.py` (its `__main__` parse and
  `get_pred_idx`): exactly a letter of A-E, or "X. ..." (a letter then ". "), or exactly one match of the regex
  `The answer is ([A-Z]).` (its "." matches any character); else "FAILED". A letter beyond the choices scores wrong.
- `sqa_process_results`: lmms-eval `tasks/scienceqa/utils.py`: the stripped prediction equals the target letter
  ignoring case, or starts with an uppercase character and "." and that character matches.
- `can_infer_option`, `can_infer_text`, `can_infer`: lmms-eval `tasks/mmbench/mmbench_evals.py`
  (`MMBench_Evaluator`), the heuristic pass before any GPT call.
- `extract_mcq_answer`: lmms-eval `tasks/_task_utils/mcq_extract.py` (MMStar; MMBench's `static` fallback).
- `mmbench_eval_result`: `MMBench_Evaluator.eval_result` / `eval_sub_data` without the judge: the rows whose index
  is below 1e6 are the questions; every row whose index mod 1e6 equals a question's index is one of its rotated
  copies, and the question scores 1 only when every copy is right.
- `multi_choice_regex_filter`, `exact_match`, `exact_match_form`: lmms-eval `tasks/ai2d/utils.py`
  (`MultiChoiceRegexFilter.apply`: "X." at the start after optional whitespace, else the whole response) and
  `api/metrics.py` (`exact_match_hf_evaluate`: lowercase, delete `string.punctuation`, no whitespace strip; the
  prediction reaching it is already stripped by `api/task.py` `ConfigurableTask.process_results`, the reference
  is not).
"""

import re
import string
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["LETTERS", "MC_SUFFIX", "CIRCULAR_BASE", "letters", "options_lines", "eval_science_qa_answer", "get_pred_idx",
           "sqa_process_results", "can_infer_option", "can_infer_text", "can_infer", "extract_mcq_answer",
           "mmbench_eval_result", "multi_choice_regex_filter", "exact_match", "exact_match_form"]

LETTERS = string.ascii_uppercase
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."  # LLaVA and lmms-eval alike


def letters(n: int) -> str:
  """The first n option letters."""
  return LETTERS[:n]


def options_lines(options: Sequence[str]) -> str:
  """"A. o0\\nB. o1..." (ScienceQA, AI2D and LLaVA's MMBench format)."""
  return "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))


# --- ScienceQA ----------------------------------------------------------------------------------------------------

_SQA_OPTIONS = ("A", "B", "C", "D", "E")   # eval_science_qa.py's --options default (list membership)
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def eval_science_qa_answer(text: str) -> str:
  """LLaVA's parsed answer of a (stripped) generation: a letter, or "FAILED"."""
  if text in _SQA_OPTIONS:
    return text
  if len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
    return text[0]
  found = _ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 else "FAILED"


def get_pred_idx(answer: str, num_choices: int) -> int:
  """The choice index of a parsed letter; -1 for "FAILED" or a letter beyond the choices."""
  allowed = _SQA_OPTIONS[:num_choices]
  return allowed.index(answer) if answer in allowed else -1


def sqa_process_results(target_letter: str, prediction: str) -> float:
  """lmms-eval's ScienceQA score of one prediction (1.0 or 0.0)."""
  target = target_letter.strip().lower()
  pred = prediction.strip()
  if pred.lower() == target:
    return 1.0
  if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
    return 1.0 if pred[0].lower() == target else 0.0
  return 0.0


# --- MMBench's heuristic extraction ---------------------------------------------------------------------------------

_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
             (":", "."), (":", ")"), (":", ")."))


def can_infer_option(answer: str, num_choice: int = 5) -> str | bool:
  """The letter named by exactly one whitespace token (bare, or wrapped as in "A." "(A)" ":A"), else False.

  A bare letter is skipped when "A" is a token of a reply of more than 3 tokens (the article, not the option);
  the wrapped forms are tried then. The letters are A-E whatever the question's options (the default num_choice).
  """
  if "Failed to obtain answer via API" in answer:
    return False
  choices = LETTERS[:num_choice]
  tokens = [t.strip() for t in answer.split()]
  count = lambda prefix, suffix: sum(prefix + c + suffix in tokens for c in choices)
  if count("", "") == 1 and not ("A" in tokens and len(tokens) > 3):
    return next(c for c in choices if c in tokens)
  for prefix, suffix in _WRAPPERS:
    if count(prefix, suffix) == 1:
      return next(c for c in choices if prefix + c + suffix in tokens)
  return False


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> str | bool:
  """The letter whose option text (lowercased) is a substring of the lowercased answer, when exactly one is."""
  answer = answer.lower()
  found = [k for k, text in choices.items() if str(text).lower() in answer]
  return found[0] if len(found) == 1 else False


def can_infer(answer: str, choices: Mapping[str, Any]) -> str | bool:
  """`can_infer_option`, else `can_infer_text`. choices: the options that are not null, {letter: text} of A-D."""
  return can_infer_option(answer) or can_infer_text(answer, choices)


# --- lmms-eval's mcq_extract ----------------------------------------------------------------------------------------

_DEFAULT_CHOICES = tuple("ABCDEFGH")
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
  """The choice letter of the highest-priority form found (the last occurrence within a form), "" when none.

  Forms, by priority: the stripped text starts with a standalone letter (10), ends with one (9), a letter after an
  answer phrase (7), "(X)" (6), "X." (5), "X:" (4), "X)" (3), "X " (2); only when none matched, any occurrence (0).
  The text is stripped of , . ! ? ; : ' " at both ends (one character kind after another) and padded with spaces.
  """
  if not response or not response.strip():
    return ""
  choices = tuple(choices or _DEFAULT_CHOICES)
  text = response.strip()
  for char in ",.!?;:'\"":
    text = text.strip(char)
  text = f" {text} "
  found = []                                   # (letter, position, form), in the official order of appends
  for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                        ("space", "{} ")):
    found += [(c, text.rfind(pattern.format(c)), form) for c in choices if pattern.format(c) in text]
  lower = text.lower()
  for phrase in _ANSWER_PHRASES:
    at = lower.find(phrase)
    if at != -1:
      found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                if text.find(c, at + len(phrase)) != -1]
  stripped = text.strip()
  found += [(c, 0, "start") for c in choices
            if stripped.startswith(c) and (len(stripped) == 1 or not stripped[1].isalpha())]
  found += [(c, len(text) - 1, "end") for c in choices
            if stripped.endswith(c) and (len(stripped) == 1 or not stripped[-2].isalpha())]
  if not found:
    found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
  if not found:
    return ""
  # A stable sort, descending: ties keep the order of appends, as the official `list.sort(reverse=True)` does.
  found.sort(key=lambda f: (_PRIORITY[f[2]], f[1]), reverse=True)
  return found[0][0]


# --- MMBench's circular evaluation ----------------------------------------------------------------------------------

CIRCULAR_BASE = 1_000_000


def mmbench_eval_result(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Single-pass and circular accuracy of MMBench rows (fractions in [0, 1]).

  items: {"index": int, "hit": bool (this row's extracted letter equals its answer), "category": str,
  "l2_category": str or None}. The questions are the rows with index < 1e6; a question's group is every row with
  index % 1e6 == its index (the question and its rotated copies); its single-pass hit is its own row's, its circular
  hit requires every row of the group. Rows of a group whose question row is absent are not scored (as the official
  loop, which runs over the question rows). Category and l2-category come from the question row.
  Returns {"questions", "rows", "single", "circular", "category": {c: (single, circular)}, "l2_category": ...}.
  Raises ValueError for a repeated index.
  """
  rows: dict[int, Mapping[str, Any]] = {}
  for item in items:
    index = int(item["index"])
    if index in rows:
      raise ValueError(f"MMBench: index {index} occurs twice")
    rows[index] = item
  groups: dict[int, list[bool]] = {i: [] for i in rows if i < CIRCULAR_BASE}
  for index, item in rows.items():
    if index % CIRCULAR_BASE in groups:
      groups[index % CIRCULAR_BASE].append(bool(item["hit"]))
  single = {i: bool(rows[i]["hit"]) for i in groups}
  circular = {i: all(hits) for i, hits in groups.items()}

  def by(field):
    out = {}
    for name in sorted({rows[i].get(field) for i in groups if rows[i].get(field) is not None}):
      members = [i for i in groups if rows[i].get(field) == name]
      out[name] = (sum(single[i] for i in members) / len(members), sum(circular[i] for i in members) / len(members))
    return out

  n = len(groups)
  return {"questions": n, "rows": sum(len(h) for h in groups.values()),
          "single": sum(single.values()) / n if n else float("nan"),
          "circular": sum(circular.values()) / n if n else float("nan"),
          "category": by("category"), "l2_category": by("l2_category")}


# --- AI2D -----------------------------------------------------------------------------------------------------------

_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def multi_choice_regex_filter(response: str) -> str:
  """"X" when the raw response starts (after whitespace) with an uppercase letter and ".", else the response."""
  match = _LEADING_LETTER.match(response)
  return match.group(1) if match else response


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match_form(text: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> str:
  """What lmms-eval's exact_match compares of one side: lowercased, `string.punctuation` deleted (no strip)."""
  text = text.lower() if ignore_case else text
  return text.translate(_NO_PUNCTUATION) if ignore_punctuation else text


def exact_match(prediction: str, reference: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> bool:
  """lmms-eval's exact_match of one pair (the callers strip the prediction first, as the task does)."""
  return (exact_match_form(prediction, ignore_case, ignore_punctuation)
          == exact_match_form(reference, ignore_case, ignore_punctuation))
