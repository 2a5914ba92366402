"""HallusionBench, image split (951 questions): lmms-lab/HallusionBench, default config, split image.

Columns (the card's dataset_info, all strings but the image): category (VD visual dependent / VS visual
supplement), subcategory, visual_input, set_id, figure_id, sample_note, question_id, question, gt_answer_details,
gt_answer ("1" yes / "0" no), filename, image. The dataset's question_id repeats across figures and sets, so
question_id here is the row's position in the split.

Prompts:
- lmms_eval (`tasks/hallusion_bench/hallusion_bench_image.yaml`, `evaluate_hb.py`, 75571cf): the question alone
  (empty pre- and post-prompt), max_new_tokens 128, greedy, no aspect override. lmms-eval scores it with a GPT-4
  judge (correct / incorrect / unclear); that judge is not offline, so the offline scoring below replaces it.
- llava: the LLaVA repository has no HallusionBench script. This protocol follows issue 16's table: the question,
  then "\\nPlease answer yes or no." (the suffix VLMEvalKit's image_yorn.py appends for AMBER; its Qwen2-VL prompt
  appends " Please answer yes or no.", its LLaVA wrapper nothing). max_new_tokens 128, pad-to-square.
Scoring (both protocols): VLMEvalKit's offline path (`vlmeval/dataset/image_yorn.py` with judge model
"exact_matching", `utils/yorn.py` `YOrN_Extraction` and `Hallusion_rating`, `smp/misc.py` `process_punctuation`, at
e8e78f0): the prediction, lowercased, punctuation-processed and split on whitespace, is "Yes" when the word "yes"
is in it and "no" is not, "No" the other way round, else "Unknown" (wrong); right when it equals the answer.
  aAcc: the mean over questions.
  fAcc: over the groups (l2-category, set_id, figure_id), the fraction with every question right.
  qAcc: over the groups (l2-category, set_id, question_id), the fraction with every question right.
VLMEvalKit reads set_id, figure_id and question_id from its TSV's index and the l2-category column; here they are
the lmms-lab columns, l2-category = subcategory [the TSV's l2-category values are unverified: where a subcategory
name occurs in both VD and VS, their groups merge, as they would in VLMEvalKit's Overall row if its l2-category is
the subcategory]. Each metric also per category (VD/, VS/), as VLMEvalKit's split rows. Fractions (VLMEvalKit
prints %); "unknown" counts the Unknown extractions.
"""

import re
from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio

__all__ = ["TASKS", "process_punctuation", "yorn_extraction", "hallusion_rating"]

SPLIT = "image"
COLUMNS = {"category": rowio.TEXT, "subcategory": rowio.TEXT, "set_id": rowio.TEXT, "figure_id": rowio.TEXT,
           "question_id": rowio.TEXT, "question": rowio.PROMPT, "gt_answer": rowio.ANY}
LLAVA_SUFFIX = "\nPlease answer yes or no."
ANSWERS = {"1": "Yes", "0": "No"}

_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str) -> str:
  """VLMEvalKit's process_punctuation: each listed mark is deleted when the input has it beside a space or holds a
  digit,digit comma, else replaced by a space; then at most 32 periods not between digits are deleted (the official
  call passes re.UNICODE, 32, as the count of Pattern.sub)."""
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def yorn_extraction(output: str) -> str:
  """VLMEvalKit's YOrN_Extraction: "Yes", "No" or "Unknown"."""
  words = process_punctuation(output.lower()).split()
  if "yes" in words and "no" not in words:
    return "Yes"
  if "yes" not in words and "no" in words:
    return "No"
  return "Unknown"


def hallusion_rating(items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """VLMEvalKit's Hallusion_rating, overall and per category: items {"score": bool, "category", "l2_category",
  "set_id", "figure_id", "dataset_question_id"} -> {"aAcc", "fAcc", "qAcc", "VD/aAcc", ...}, fractions."""
  def rating(subset):
    figures, questions = defaultdict(list), defaultdict(list)
    for it in subset:
      figures[(it["l2_category"], it["set_id"], it["figure_id"])].append(it["score"])
      questions[(it["l2_category"], it["set_id"], it["dataset_question_id"])].append(it["score"])
    mean_all = lambda groups: sum(all(v) for v in groups.values()) / len(groups)
    return {"aAcc": sum(it["score"] for it in subset) / len(subset), "fAcc": mean_all(figures),
            "qAcc": mean_all(questions)}

  out = rating(items)
  for category in sorted({it["category"] for it in items}):
    for name, value in rating([it for it in items if it["category"] == category]).items():
      out[f"{category}/{name}"] = value
  return out


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for position, where, row, image in rowio.split_rows(data_dir, None, SPLIT, COLUMNS, with_images):
    if row["gt_answer"] not in ANSWERS:
      raise ValueError(f"{where}: gt_answer {row['gt_answer']!r} is not '1' or '0'")
    text = row["question"] + (LLAVA_SUFFIX if protocol == "llava" else "")
    yield base.Example(question_id=str(position), image=image, text=text, target=ANSWERS[row["gt_answer"]],
                       meta={"category": row["category"], "l2_category": row["subcategory"],
                             "set_id": row["set_id"], "figure_id": row["figure_id"],
                             "dataset_question_id": row["question_id"]}, source=where)


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  rowio.check_protocol(protocol)
  return yorn_extraction(generation)


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  rowio.check_protocol(protocol)
  if not rows:
    raise ValueError("hallusionbench_image: no rows to score")
  extracted = [yorn_extraction(rowio.generation(r)) for r in rows]
  out = hallusion_rating([dict(r["meta"], score=e == r["target"]) for r, e in zip(rows, extracted)])
  out["unknown"] = float(sum(e == "Unknown" for e in extracted))
  return out


TASKS = {
    "hallusionbench_image": base.Task(
        name="hallusionbench_image", repo="lmms-lab/HallusionBench", folder="HallusionBench", config=None,
        split=SPLIT, num_rows=951, id_source="position", max_new_tokens={"llava": 128, "lmms_eval": 128}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score),
}
