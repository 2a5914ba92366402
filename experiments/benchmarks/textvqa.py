"""TextVQA validation (5,000 questions) on lmms-lab/textvqa, without and with the OCR-token hint line.

Layout (card of pppop7/textvqa, a duplicate of lmms-lab/textvqa): the default config, `data/validation-*.parquet`.
Columns: image_id, question_id (int32), question, question_tokens, image, image_width, image_height,
flickr_original_url, flickr_300k_url, answers (10 strings), image_classes, set_name, ocr_tokens (strings).

Two task names, because the hint changes the prompt under either protocol: `textvqa_val` (no hint, lmms-eval's
default `ocr: false`, about 46 for LLaVA-1.5-7B) and `textvqa_val_ocr` (the hint, which LLaVA-1.5's reported 58.2
uses: `scripts/v1_5/eval/textvqa.sh` reads `llava_textvqa_val_v051_ocr.jsonl`).

Protocols (read at lmms-eval 75571cf `tasks/textvqa/utils.py` + `_default_template_textvqa_yaml`; LLaVA c121f04
`llava/eval/eval_textvqa.py`, `m4c_evaluator.py`):
  prompt "lmms_eval": `question.capitalize()` (which also lowercases the rest), then with the hint
    "\\nReference OCR token: " + ", ".join(ocr_tokens), then "\\nAnswer the question using a single word or phrase.".
  prompt "llava": the question with its first character upper-cased (the rest as stored), then the same hint and
    suffix. LLaVA's `llava_textvqa_val_v051_ocr.jsonl` (eval.zip) holds the questions capitalised: 4,995 of its 5,000
    start upper-case ("What is ...") where lmms-lab's column is lower-case (compared in issue 27); `str.capitalize`
    would also lower-case the rest ("CAMERA"), which LLaVA's file does not. Its line layout (question, hint, suffix)
    is what `eval_textvqa.prompt_processor` parses back; its OCR tokens (LLaVA's file predates lmms-lab's
    `ocr_tokens` column) are [unverified].
  max_new_tokens: lmms_eval 1024 (the yaml sets none; the llava wrapper's default); llava 128. Stop: the yaml's
    `until: ["ASSISTANT:"]` (lmms-eval's llava wrapper does not apply it; cutting there changes no answer before it).
  parser, both: EvalAI's answer processor (`vqa_eval.normalize`). Score, both: the mean over questions of the
    leave-one-out VQA accuracy against the ten processed answers (`vqa_eval.vqa_accuracy`); lmms-eval calls it
    `exact_match`, LLaVA prints it as Accuracy (x100).
"""

import functools
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio, vqa_eval

__all__ = ["SUFFIX", "TASKS", "prompt"]

SUFFIX = "\nAnswer the question using a single word or phrase."
_COLUMNS = {"question_id": rowio.ID, "image_id": rowio.ANY, "question": rowio.PROMPT, "answers": rowio.TEXTS}
_OCR = {"ocr_tokens": rowio.Field("texts", nullable=True, prompt=True)}   # a null list: no tokens, as before


def prompt(question: str, ocr_tokens: Sequence[str] | None, protocol: str) -> str:
  """The user text; `ocr_tokens` None: no hint line."""
  if protocol not in base.PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {base.PROTOCOLS}")
  head = question.capitalize() if protocol == "lmms_eval" else question[:1].upper() + question[1:]
  hint = "" if ocr_tokens is None else "\nReference OCR token: " + ", ".join(ocr_tokens)
  return head + hint + SUFFIX


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  del meta
  if protocol not in base.PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {base.PROTOCOLS}")
  return vqa_eval.normalize(generation)


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  if not rows:
    raise ValueError("TextVQA: no rows to score")
  scores = [vqa_eval.vqa_accuracy(_parse(r["prediction"], r["meta"], protocol),
                                  [vqa_eval.normalize(a) for a in r["target"]]) for r in rows]
  return {"accuracy": sum(scores) / len(scores)}


def _examples(data_dir: str, protocol: str, with_images: bool, ocr: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  columns = {**_COLUMNS, **(_OCR if ocr else {})}
  for _, where, row, image in rowio.split_rows(data_dir, None, "validation", columns, with_images, "question_id"):
    if not row["answers"]:
      raise ValueError(f"{where}: no ground-truth answers")
    text = prompt(row["question"], row["ocr_tokens"] if ocr else None, protocol)
    yield base.Example(question_id=row["question_id"], image=image, text=text, target=row["answers"],
                       meta={"image_id": row["image_id"]}, source=where)


def _task(name: str, ocr: bool) -> base.Task:
  return base.Task(
      name=name, repo="lmms-lab/textvqa", folder="textvqa", config=None, split="validation", num_rows=5000,
      id_source="question_id", max_new_tokens={"llava": 128, "lmms_eval": 1024}, stop=("ASSISTANT:",),
      image_aspect={"llava": "pad", "lmms_eval": "pad"}, length_from_wrapper=True,
      examples=functools.partial(_examples, ocr=ocr),
      parse=_parse, score=_score)


TASKS = {"textvqa_val": _task("textvqa_val", ocr=False), "textvqa_val_ocr": _task("textvqa_val_ocr", ocr=True)}
