"""The VQA answer normalisation of EvalAI (MMF's `EvalAIAnswerProcessor`) and the leave-one-out VQA accuracy.

Both official evaluations carry the same processor: LLaVA's `llava/eval/m4c_evaluator.py` (TextVQA, and VQAv2's
submission file via `scripts/convert_vqav2_for_submission.py`) and lmms-eval's `tasks/_task_utils/vqa_eval_metric.py`
(identical tables and steps; read at LLaVA c121f04 and lmms-eval 75571cf). `normalize` is its `__call__`:

  1. lowercase; delete "," and "?"; "'s" -> " 's"; strip;            (`word_tokenize`)
  2. newlines and tabs -> spaces; strip;
  3. punctuation (`process_punctuation`): each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the
     *input* has it next to a space or contains a digit,digit comma, else replaced by a space; then every "." not
     followed by a digit is deleted, at most 32 of them (the official code passes `re.UNICODE`, which is 32, as the
     `count` argument of `Pattern.sub`);
  4. words (`process_digit_article`): split on whitespace, number words zero..ten (and "none") -> digits, drop the
     articles a/an/the, then fix the contractions of the table below; join with single spaces.

The original PERIOD_STRIP regex `(?!<=\\d)(\\.)(?!\\d)` meant a look-behind but is a look-ahead for the text "<=d";
it never fires at a ".", so it is `\\.(?!\\d)`: "3.5" keeps its point, "a.m." loses both.

lmms-eval's VQAv2 scorer (`tasks/vqav2/utils.py`) skips step 1 and applies steps 2-4 to both the prediction and the
ten ground truths (`normalize_vqav2`); its TextVQA scorer and LLaVA's TextVQA evaluator apply all four steps.
"""

import re
from typing import Sequence

__all__ = ["CONTRACTIONS", "NUMBER_MAP", "ARTICLES", "PUNCTUATIONS", "process_punctuation", "process_digit_article",
           "normalize", "normalize_vqav2", "vqa_accuracy"]

# The processor's contraction table as (written form -> fixed form) pairs. It is data, kept exactly, including its
# oddities ("somebody'd" -> "somebodyd", "let's" -> "let's").
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've |
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've |
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's |
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd |
itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've |
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't | notve not've |
oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at | 'ow'sat 'ow's'at | shant shan't |
shed've she'd've | she'dve she'd've | she's she's | shouldve should've | shouldnt shouldn't |
shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd | somebodyd've somebody'd've |
somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's | someoned someone'd |
someoned've someone'd've | someone'dve someone'd've | someonell someone'll | someones someone's |
somethingd something'd | somethingd've something'd've | something'dve something'd've | somethingll something'll |
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're | theres there's |
theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll | theyre they're | theyve they've |
twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've | werent weren't | whatll what'll |
whatre what're | whats what's | whatve what've | whens when's | whered where'd | wheres where's | whereve where've |
whod who'd | whod've who'd've | who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll |
whyre why're | whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've |
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've |
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've | youll you'll |
youre you're | youve you've
"""
CONTRACTIONS = dict(pair.split() for pair in _CONTRACTION_PAIRS.split("|"))

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")

_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_MAX_PERIODS = 32  # re.UNICODE, passed as Pattern.sub's count by the official code


def process_punctuation(text: str) -> str:
  """Step 3 of the module docstring (the official `process_punctuation`)."""
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for p in PUNCTUATIONS:
    # the test reads the input text, the replacement the text so far, as in the official loop
    if delete_all or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
  """Step 4 of the module docstring (the official `process_digit_article`)."""
  words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize(answer: str) -> str:
  """EvalAI's answer processor (`EvalAIAnswerProcessor.__call__`): steps 1-4."""
  answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def normalize_vqav2(answer: str) -> str:
  """lmms-eval's VQAv2 normalisation (`vqav2_process_results`): steps 2-4, no lowercasing before step 3."""
  return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy of an already normalised prediction against already normalised human answers.

  The mean, over the leave-one-out subsets (each answer left out in turn), of min(1, #matches among the others / 3).
  With 10 answers: 4 or more matching answers score 1, 3 score 0.9, 2 score 0.6, 1 scores 0.3, none 0.
  """
  if not answers:
    raise ValueError("vqa_accuracy: no ground-truth answers")
  matches = sum(a == prediction for a in answers)
  # leaving out answer i leaves matches - [answer i matches] matching others
  return sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers) / len(answers)
