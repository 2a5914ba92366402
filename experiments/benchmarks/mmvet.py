"""MM-Vet test (218 questions): lmms-lab/MMVet, default config, split test. Judged: no local metric exists.

Columns (the card's dataset_info): question_id (string), image, question, answer, image_source, capability.
question_id is the dataset's.

Prompts:
- lmms_eval (`tasks/mmvet/mmvet.yaml`, `utils.py` `doc_to_text`, 75571cf): "First please perform reasoning, and
  think step by step to provide best answer to the following question: \\n\\n" then the question; max_new_tokens
  1024, greedy (temperature 0.2 with do_sample false); no aspect override. Its score is a GPT judge's 0-1 grade per
  question (gpt-4o-2024-11-20 by default), mean x 100.
- llava (`scripts/v1_5/eval/mmvet.sh`: `llava/eval/model_vqa.py` on `llava-mm-vet.jsonl`, c121f04): the question
  file's text alone [that it equals the dataset's question is unverified: the file is in LLaVA's eval.zip];
  max_new_tokens 1024, greedy, pad-to-square.
Judging: LLaVA's `scripts/convert_mmvet_for_eval.py` writes one JSON object {"v1_<question_id>": answer} (indent 2),
and MM-Vet's `mm-vet_evaluator.py` (yuweihao/MM-Vet) reads `results/<model>.json` as that object, looking up every
id of its `mm-vet.json` ("v1_0" ... "v1_217"): a missing id stops it. `judge_predictions` / `write_judge_file`
produce that file from a run's rows; `score` reports counts only.
"""

import json
import os
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio

__all__ = ["TASKS", "PRE_PROMPT", "judge_key", "judge_predictions", "write_judge_file"]

SPLIT = "test"
COLUMNS = {"question_id": rowio.ID, "question": rowio.PROMPT, "answer": rowio.TEXT, "capability": rowio.ANY}
PRE_PROMPT = ("First please perform reasoning, and think step by step to provide best answer to the following "
              "question: \n\n")
NUM_ROWS = 218


def judge_key(question_id: str) -> str:
  """MM-Vet's id of a question: "v1_<n>" (LLaVA's convert prefixes its integer ids; an id already "v1_<n>" stays)."""
  qid = str(question_id)
  if qid.startswith("v1_") and qid[3:].isdigit():
    return qid
  if qid.isdigit():
    return f"v1_{qid}"
  raise ValueError(f"MM-Vet question_id {qid!r} is neither an integer nor 'v1_<integer>'")


def judge_predictions(rows: Sequence[Mapping[str, Any]], expected: int | None = NUM_ROWS) -> dict[str, str]:
  """{"v1_<n>": generation} of a run's rows, in row order. ValueError on a repeated id, or when `expected` is given
  and the rows are not that many (the judge needs every question; None for a --limit run)."""
  out: dict[str, str] = {}
  for row in rows:
    key = judge_key(row["question_id"])
    if key in out:
      raise ValueError(f"MM-Vet: question {key} occurs twice in the run's rows")
    out[key] = rowio.generation(row)
  if expected is not None and len(out) != expected:
    raise ValueError(f"MM-Vet: {len(out)} predictions, the judge reads all {expected} questions; pass expected=None "
                     "to write a partial file")
  return out


def write_judge_file(rows: Sequence[Mapping[str, Any]], path: str, expected: int | None = NUM_ROWS) -> str:
  """Writes `judge_predictions(rows)` as MM-Vet's results JSON (atomically); returns the path."""
  predictions = judge_predictions(rows, expected)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(predictions, f, indent=2)
  os.replace(tmp, path)
  return path


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for _, where, row, image in rowio.split_rows(data_dir, None, SPLIT, COLUMNS, with_images, "question_id"):
    try:
      judge_key(row["question_id"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    text = (PRE_PROMPT if protocol == "lmms_eval" else "") + row["question"]
    yield base.Example(question_id=row["question_id"], image=image, text=text, target=row["answer"],
                       meta={"capability": row["capability"]}, source=where)


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  # lmms-eval's judge reads the generation as its task strips it (`ConfigurableTask.process_results`).
  return generation.strip() if rowio.check_protocol(protocol) == "lmms_eval" else generation


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  rowio.check_protocol(protocol)
  return {"questions": float(len(rows)), "empty": float(sum(not rowio.generation(r).strip() for r in rows))}


TASKS = {
    "mmvet": base.Task(
        name="mmvet", repo="lmms-lab/MMVet", folder="MMVet", config=None, split=SPLIT, num_rows=NUM_ROWS,
        id_source="question_id", max_new_tokens={"llava": 1024, "lmms_eval": 1024}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score,
        judged=True),
}
