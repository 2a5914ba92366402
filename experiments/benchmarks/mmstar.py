"""MMStar (1,500 questions): Lin-Chen/MMStar, config mmstar (the card's only config; file mmstar.parquet), split val.

Columns (the card's dataset_info): index (int64), question (holds the options already), image, answer (a letter),
category, l2_category, meta_info (struct source, split, image_path). question_id is `index`.

lmms-eval (`tasks/mmstar/mmstar.yaml`, `_default_template_yaml`, `utils.py`, 75571cf): the question, stripped, with
" Please answer yes or no." deleted (the code does so whenever a post-prompt is set), then the post-prompt
"\\nAnswer with the option's letter from the given choices directly" (no final period). No generation_kwargs: the
llava model's default max_new_tokens, 1024, greedy. No aspect override (pad). The LLaVA repository has no MMStar
script, so the llava protocol is the same task with LLaVA-1.5's pad-to-square (the same).
Scoring: `extract_mcq_answer(prediction, ["A", "B", "C", "D"])` against the answer stripped and uppercased. Each of
the six categories reports the mean of its l2-category means; "average" is the mean of all l2-category means (not
the mean over questions). Fractions, as lmms-eval prints them.
"""

from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, choices, rowio

__all__ = ["TASKS", "prompt", "mean_of_l2_means"]

CONFIG, SPLIT = "mmstar", "val"
COLUMNS = {"index": rowio.ID, "question": rowio.PROMPT, "answer": rowio.TEXT, "category": rowio.TEXT,
           "l2_category": rowio.TEXT}
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
LETTERS = ["A", "B", "C", "D"]


def prompt(question: str) -> str:
  return question.strip().replace(" Please answer yes or no.", "") + POST_PROMPT


def mean_of_l2_means(items: Sequence[tuple[str, float]]) -> float:
  """mmstar_aggregate_results: (l2_category, score) pairs -> the mean over l2-categories of their mean score."""
  by_l2 = defaultdict(list)
  for l2, score in items:
    by_l2[l2].append(score)
  return sum(sum(v) / len(v) for v in by_l2.values()) / len(by_l2)


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for _, where, row, image in rowio.split_rows(data_dir, CONFIG, SPLIT, COLUMNS, with_images, "index"):
    if row["answer"].strip().upper() not in LETTERS:
      raise ValueError(f"{where}: answer {row['answer']!r} is not a letter A-D")
    yield base.Example(question_id=row["index"], image=image, text=prompt(row["question"]),
                       target=row["answer"].strip().upper(),
                       meta={"category": row["category"], "l2_category": row["l2_category"]}, source=where)


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  rowio.check_protocol(protocol)
  return choices.extract_mcq_answer(generation, LETTERS)


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  rowio.check_protocol(protocol)
  if not rows:
    raise ValueError("mmstar: no rows to score")
  scored = [(r["meta"]["category"], r["meta"]["l2_category"],
             float(choices.extract_mcq_answer(rowio.generation(r), LETTERS) == r["target"])) for r in rows]
  out = {"average": mean_of_l2_means([(l2, s) for _, l2, s in scored])}
  for category in sorted({c for c, _, _ in scored}):
    out[category] = mean_of_l2_means([(l2, s) for c, l2, s in scored if c == category])
  return out


TASKS = {
    "mmstar": base.Task(
        name="mmstar", repo="Lin-Chen/MMStar", folder="MMStar", config=CONFIG, split=SPLIT, num_rows=1500,
        id_source="index", max_new_tokens={"llava": 1024, "lmms_eval": 1024}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score,
        length_from_wrapper=True),
}
