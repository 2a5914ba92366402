"""VQAv2 validation (214,354 questions) on lmms-lab/VQAv2, and its 500-question lite subset (lmms-lab/LMMs-Eval-Lite).

Layouts: lmms-lab/VQAv2's card lists `data/validation-*` (also testdev and test, which need the EvalAI server).
LMMs-Eval-Lite has one folder per config; `vqav2_val/lite-00000-of-00001.parquet`, split `lite`, 500 rows (the hub
tree and viewer). Columns (VQAv2 card): question_type, multiple_choice_answer, answers (10 structs answer,
answer_confidence, answer_id), image_id, answer_type, question_id (int64), question, image; the lite subset is
assumed to keep them (lmms-eval scores it with the same function) [its card unverified].

Protocols (read at lmms-eval 75571cf `tasks/vqav2/utils.py`, `_default_template_vqav2_yaml`, vqav2_val*.yaml;
LLaVA c121f04 `scripts/v1_5/eval/vqav2.sh`, `scripts/convert_vqav2_for_submission.py`):
  prompt: the same for both: the question, then "\\nAnswer the question using a single word or phrase." (LLaVA's
    jsonl is in eval.zip [unverified]). max_new_tokens: lmms_eval 16; llava 128. Stop strings: none.
  "lmms_eval": `vqav2_process_results`: the prediction and every human answer get newlines/tabs -> spaces, strip,
    `process_punctuation`, `process_digit_article` (no lowercasing first; `vqa_eval.normalize_vqav2`); the accuracy
    is the leave-one-out mean of min(1, matches/3) (`vqa_eval.vqa_accuracy`).
  "llava": LLaVA evaluates VQAv2 only on test-dev through the EvalAI server; its submission file holds
    `EvalAIAnswerProcessor(text)` (`vqa_eval.normalize`), which is our parse. The server's scorer is not in either
    repository; we score the submitted answer with the lmms-eval accuracy above (its reproduction of the official
    VQA evaluation) [the server side unverified]. Papers' VQAv2 numbers are test-dev, not val.
"""

import functools
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio, vqa_eval

__all__ = ["SUFFIX", "TASKS"]

SUFFIX = "\nAnswer the question using a single word or phrase."
_COLUMNS = {"question_id": rowio.ID, "image_id": rowio.ANY, "question": rowio.PROMPT,
            "answers": rowio.Field("texts", item_key="answer"), "answer_type": rowio.ANY}


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  del meta
  if protocol == "llava":
    return vqa_eval.normalize(generation)
  if protocol == "lmms_eval":
    return vqa_eval.normalize_vqav2(generation)
  raise ValueError(f"unknown protocol {protocol!r}; expected one of {base.PROTOCOLS}")


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  if not rows:
    raise ValueError("VQAv2: no rows to score")
  scores = []
  for r in rows:
    answer = _parse(r["prediction"], r["meta"], protocol)
    if protocol == "llava":  # the scorer's own processing of the submitted answer
      answer = vqa_eval.normalize_vqav2(answer)
    scores.append(vqa_eval.vqa_accuracy(answer, [vqa_eval.normalize_vqav2(a) for a in r["target"]]))
  return {"accuracy": sum(scores) / len(scores)}


def _examples(data_dir: str, protocol: str, with_images: bool, config: str | None,
              split: str) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for _, where, row, image in rowio.split_rows(data_dir, config, split, _COLUMNS, with_images, "question_id"):
    if not row["answers"]:
      raise ValueError(f"{where}: no ground-truth answers")
    yield base.Example(question_id=row["question_id"], image=image, text=row["question"] + SUFFIX,
                       target=row["answers"], meta={"image_id": row["image_id"], "answer_type": row["answer_type"]},
                       source=where)


def _task(name: str, repo: str, config: str | None, split: str, num_rows: int) -> base.Task:
  return base.Task(
      name=name, repo=repo, folder=repo.split("/")[1], config=config, split=split, num_rows=num_rows,
      id_source="question_id", max_new_tokens={"llava": 128, "lmms_eval": 16}, stop=(),
      image_aspect={"llava": "pad", "lmms_eval": "pad"},
      examples=functools.partial(_examples, config=config, split=split), parse=_parse, score=_score)


TASKS = {
    "vqav2_val": _task("vqav2_val", "lmms-lab/VQAv2", None, "validation", 214354),
    "vqav2_val_lite": _task("vqav2_val_lite", "lmms-lab/LMMs-Eval-Lite", "vqav2_val", "lite", 500),
}
