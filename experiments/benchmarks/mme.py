"""MME (perception and cognition, yes/no, two questions per image) on lmms-lab/MME.

Layout (card): the default config, `data/test-*.parquet`, 2,374 rows. Columns: question_id (the image's path, e.g.
"code_reasoning/0020.png", shared by the image's two questions), image, question (ending in " Please answer yes or
no."), answer ('Yes'/'No'), category. Since question_id is not unique, an example's id is its row position in shard
order; the dataset's question_id is kept in `meta["image"]`, the key of the image pairs.

Protocols (read at lmms-eval 75571cf `tasks/mme/utils.py` + mme.yaml; LLaVA c121f04 `scripts/v1_5/eval/mme.sh`):
  prompt: lmms-eval strips the question, deletes " Please answer yes or no." and appends "\\nAnswer the question
    using a single word or phrase."; a question with two spaces before the instruction keeps one trailing space
    ("...?  Please answer yes or no." -> "...? " + suffix). LLaVA's `llava_mme.jsonl` (eval.zip, with its
    `convert_answer_to_mme.py`) has the same text without that trailing space (compared in issue 27): the "llava"
    protocol strips the question again after the deletion.
  max_new_tokens: lmms_eval 16 (yaml); llava 128 (`model_vqa_loader.py` default). Stop strings: none.
  parser "lmms_eval" (`parse_pred_ans`, "from Otter"): lowercase, strip, delete every "."; "yes"/"no" as is; a single
    character "y"/"n" -> yes/no, any other single character -> other; else "yes" if the first 4 characters contain
    "yes", then "no" likewise, else other.
  parser "llava": MME's own `eval_tool/calculation.py`, which LLaVA's script runs: lowercase; "yes"/"no" as is;
    else the same first-4-characters rule (no strip, no "." removal, no single-letter rule). Read from copies of
    calculation.py in other repositories (the tool ships with MME's data release) [unverified against the release].
  score, per category: acc = percent of the questions right, acc+ = percent of the images with both questions right,
    score = acc + acc+ (max 200); perception = the sum over the 10 perception categories (max 2000), cognition over
    the 4 cognition ones (max 800). lmms-eval averages (acc + acc+) per image, the same number when every image has
    two questions. Both official scorers assert two questions per image; here an image with any other count (a
    partial run) is left out of its category and counted in `incomplete_images`, never dropped silently.
"""

import collections
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio

__all__ = ["SUFFIX", "PERCEPTION", "COGNITION", "TASKS", "prompt", "parse_llava", "parse_lmms_eval", "mme_scores"]

SUFFIX = "\nAnswer the question using a single word or phrase."
_DROPPED = " Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_COLUMNS = {"question_id": rowio.TEXT, "question": rowio.PROMPT, "answer": rowio.TEXT, "category": rowio.TEXT}


def prompt(question: str, protocol: str) -> str:
  """The user text: the instruction deleted, the short-answer suffix appended (LLaVA's file: stripped again)."""
  text = question.strip().replace(_DROPPED, "")
  return (text.strip() if protocol == "llava" else text) + SUFFIX


def _first_four(text: str) -> str:
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def parse_lmms_eval(generation: str) -> str:
  text = generation.lower().strip().replace(".", "")
  if text in ("yes", "no"):
    return text
  if len(text) == 1:
    return {"y": "yes", "n": "no"}.get(text, "other")
  return _first_four(text)


def parse_llava(generation: str) -> str:
  text = generation.lower()
  return text if text in ("yes", "no") else _first_four(text)


_parse = base.parser_by_protocol(llava=parse_llava, lmms_eval=parse_lmms_eval)


def mme_scores(answers: Sequence[tuple[str, str, bool]]) -> dict[str, float]:
  """MME's scores from (category, image, correct) triples: per category acc, acc_plus and score, perception,
  cognition and incomplete_images (images without exactly two questions, left out)."""
  by_image = collections.defaultdict(list)
  for category, image, correct in answers:
    if category not in PERCEPTION and category not in COGNITION:
      raise ValueError(f"MME: unknown category {category!r} (image {image!r})")
    by_image[(category, image)].append(correct)
  out, incomplete = {}, 0
  totals = {"perception": 0.0, "cognition": 0.0}
  for category in PERCEPTION + COGNITION:
    pairs = [v for (c, _), v in by_image.items() if c == category and len(v) == 2]
    incomplete += sum(1 for (c, _), v in by_image.items() if c == category and len(v) != 2)
    if not pairs:
      continue
    acc = 100.0 * sum(sum(v) for v in pairs) / (2 * len(pairs))
    acc_plus = 100.0 * sum(all(v) for v in pairs) / len(pairs)
    out.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus, f"{category}/score": acc + acc_plus})
    totals["perception" if category in PERCEPTION else "cognition"] += acc + acc_plus
  return {**totals, **out, "incomplete_images": float(incomplete)}


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  if not rows:
    raise ValueError("MME: no rows to score")
  return mme_scores([(r["meta"]["category"], r["meta"]["image"],
                      _parse(r["prediction"], r["meta"], protocol) == r["target"]) for r in rows])


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for position, where, row, image in rowio.split_rows(data_dir, None, "test", _COLUMNS, with_images):
    answer = row["answer"].lower().strip().replace(".", "")
    if answer not in ("yes", "no"):
      raise ValueError(f"{where}: answer {row['answer']!r} is not yes/no")
    if row["category"] not in PERCEPTION + COGNITION:   # the scores group by it: named now, not after the split ran
      raise ValueError(f"{where}: category {row['category']!r} is not an MME category")
    yield base.Example(question_id=str(position), image=image, text=prompt(row["question"], protocol), target=answer,
                       meta={"category": row["category"], "image": row["question_id"]}, source=where)


TASKS = {
    "mme": base.Task(
        name="mme", repo="lmms-lab/MME", folder="MME", config=None, split="test", num_rows=2374, id_source="position",
        max_new_tokens={"llava": 128, "lmms_eval": 16}, stop=(), image_aspect={"llava": "pad", "lmms_eval": "pad"},
        examples=_examples, parse=_parse, score=_score),
}
