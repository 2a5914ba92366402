"""MMBench dev, English and Chinese (4,329 rows each): lmms-lab/MMBench, configs en / cn, split dev.

Columns (the card's dataset_info): index (int64 in cn; the en entry of one revision says string, so both are
read), question, hint, answer (a letter), A, B, C, D (null where a question has fewer options), category, image,
source, L2-category, comment, split. question_id is `index`. The dev split holds each question (index < 1e6) and its
rotated copies (index + k * 1e6, the options shifted and the answer letter with them), which circular evaluation
groups by index mod 1e6.

Prompts:
- lmms_eval (`tasks/mmbench/en_utils.py`, `cn_utils.py`, `mmbench_evals.py` `create_options_prompt`, 75571cf):
  "{hint} {question} There are several options:\\nA. a\\nB. b..." (the hint part only when the hint is not null and,
  in en only, not the string "nan"; an option only when it is not null, empty or "nan"), then "\\n" and the
  post-prompt: en "\\nAnswer with the option's letter from the given choices directly.", cn
  "\\n请直接使用所提供的选项字母作为答案回答。". Both utils read `mmbench.yaml`, so cn's options line is the English
  "There are several options:" too (`mmbench_cn.yaml`'s "有如下几个选项：" is never read). max_new_tokens en 1024, cn
  256, greedy; `image_aspect_ratio: original` for llava (applied by `models/simple/llava.py` only when the
  checkpoint's config has no image_aspect_ratio: LLaVA-1.5's has "pad", so both protocols pad here). en's `until: ["ASSISTANT:"]` is not
  applied by lmms-eval's llava model (its cut is commented out), so no stop string.
- llava (`llava/eval/model_vqa_mmbench.py --single-pred-prompt`, `scripts/v1_5/eval/mmbench*.sh`, c121f04):
  "{hint}\\n{question}\\nA. a\\nB. b..." (options A-D up to the first null / "nan" / "none"; the hint unless it is
  one of those), then "\\nAnswer with the option's letter from the given choices directly." (en) or
  "\\n请直接回答选项字母。" (cn); max_new_tokens 1024; pad-to-square. One pass per row: the rotated copies are rows of
  the file (no --all-rounds).
Scoring (both protocols): LLaVA's answers go to the OpenCompass server, which is not offline; lmms-eval's
`MMBench_Evaluator.eval_result` is the offline equivalent. Each row's letter is `can_infer` (option letter, else
option text), and where that finds nothing, `extract_mcq_answer` over the row's options: the `static` method of
`mmbench_en_dev_static`, never a judge. Metrics (fractions; lmms-eval prints %): accuracy (single pass: each
question's own row), circular_accuracy (every rotated copy right), per category; questions (question rows).
"""

import math
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, choices, rowio

__all__ = ["TASKS", "prompt", "answer"]

SPLIT = "dev"
OPTION_LETTERS = "ABCD"
COLUMNS = {"index": rowio.INT, "question": rowio.PROMPT, "hint": rowio.OPTIONAL_PROMPT, "answer": rowio.TEXT,
           **{c: rowio.OPTIONAL_PROMPT for c in OPTION_LETTERS}, "category": rowio.ANY, "L2-category": rowio.ANY}
LMMS_EVAL_OPTIONS = "There are several options:"
POST_PROMPT = {"lmms_eval": {"en": "\nAnswer with the option's letter from the given choices directly.",
                             "cn": "\n请直接使用所提供的选项字母作为答案回答。"},
               "llava": {"en": "Answer with the option's letter from the given choices directly.",
                         "cn": "请直接回答选项字母。"}}


def _null(value: Any) -> bool:
  """pandas' isna of a cell: None or a float NaN."""
  return value is None or (isinstance(value, float) and math.isnan(value))


def _llava_none(value: Any) -> bool:
  """model_vqa_mmbench.is_none."""
  return _null(value) or (isinstance(value, str) and value.lower() in ("nan", "none"))


def prompt(row: Mapping[str, Any], lang: str, protocol: str) -> str:
  """The user text after the image of an MMBench row (question, hint, A-D)."""
  if rowio.check_protocol(protocol) == "lmms_eval":
    shown = [c for c in OPTION_LETTERS if row.get(c) and not _null(row[c]) and row[c] != "nan"]
    options = (f"{LMMS_EVAL_OPTIONS}\n" + "".join(f"{c}. {row[c]}\n" for c in shown)).rstrip("\n")
    hint = row["hint"]
    with_hint = not _null(hint) and (lang == "cn" or hint != "nan")
    query = f"{hint} {row['question']} {options}" if with_hint else f"{row['question']} {options}"
    return f"{query}\n{POST_PROMPT['lmms_eval'][lang]}"
  text = row["question"] if _llava_none(row["hint"]) else f"{row['hint']}\n{row['question']}"
  for c in OPTION_LETTERS:
    if _llava_none(row[c]):
      break
    text += f"\n{c}. {row[c]}"
  return f"{text}\n{POST_PROMPT['llava'][lang]}"


def answer(generation: str, options: Mapping[str, str]) -> str:
  """The letter the evaluator reads: `can_infer` (option letter, else option text), else `extract_mcq_answer`
  over the options' letters; "" when neither finds one. options: {letter: text} of the non-null A-D."""
  found = choices.can_infer(generation, dict(options))
  return found if found else choices.extract_mcq_answer(generation, sorted(options))


def _examples(lang: str):
  def examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
    rowio.check_protocol(protocol)
    for _, where, row, image in rowio.split_rows(data_dir, lang, SPLIT, COLUMNS, with_images, "index"):
      index = row["index"]
      options = {c: row[c] for c in OPTION_LETTERS if not _null(row[c])}     # build_choices: what is not NaN
      if row["answer"] not in options:
        raise ValueError(f"{where}: answer {row['answer']!r} is not one of the options {sorted(options)}")
      yield base.Example(question_id=str(index), image=image, text=prompt(row, lang, protocol), target=row["answer"],
                         meta={"index": index, "options": options, "category": row["category"],
                               "l2_category": row["L2-category"]}, source=where)
  return examples


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  rowio.check_protocol(protocol)
  return answer(generation.strip(), meta["options"])


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  rowio.check_protocol(protocol)
  if not rows:
    raise ValueError("mmbench: no rows to score")
  result = choices.mmbench_eval_result(
      dict(index=r["meta"]["index"], hit=answer(rowio.generation(r).strip(), r["meta"]["options"]) == r["target"],
           category=r["meta"]["category"], l2_category=r["meta"]["l2_category"]) for r in rows)
  if not result["questions"]:
    raise ValueError("mmbench: no question rows (index < 1e6) among the rows")
  out = {"accuracy": result["single"], "circular_accuracy": result["circular"],
         "questions": float(result["questions"])}
  for name, (single, circular) in result["category"].items():
    out[f"accuracy/{name}"] = single
    out[f"circular_accuracy/{name}"] = circular
  return out


def _task(lang: str) -> base.Task:
  return base.Task(
      name=f"mmbench_{lang}_dev", repo="lmms-lab/MMBench", folder="MMBench", config=lang, split=SPLIT,
      num_rows=4329, id_source="index", max_new_tokens={"llava": 1024, "lmms_eval": 1024 if lang == "en" else 256},
      stop=(), image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples(lang), parse=_parse,
      score=_score)


TASKS = {"mmbench_en_dev": _task("en"), "mmbench_cn_dev": _task("cn")}
