"""ScienceQA-IMG test (2,017 questions with an image): lmms-lab/ScienceQA, config ScienceQA-IMG, split test.

Columns (the card's dataset_info, config ScienceQA-IMG): image, question, choices (list<string>), answer (int8, the
index of the right choice), hint, task, grade, subject, topic, category, skill, lecture, solution. No id column:
question_id is the row's position in the split (shard order).

Prompt (both protocols): "Context: {hint}\\n" when the hint is not empty, "{question}\\n", the options as
"A. c0\\nB. c1...", then "\\nAnswer with the option's letter from the given choices directly."
- lmms_eval (`tasks/scienceqa/utils.py` `sqa_doc_to_text`, default format, at 75571cf): exactly that; a null hint
  would print as "None" (the f-string of its None), kept. max_new_tokens 16, greedy; the yaml sets
  `image_aspect_ratio: original` for the llava model [which `models/simple/llava.py` applies only when the
  checkpoint's config has no image_aspect_ratio; LLaVA-1.5's config.json has "pad", so lmms-eval pads there, and
  so does this port: the official code wins over the yaml].
- llava (`llava/eval/model_vqa_science.py --single-pred-prompt` on `llava_test_CQM-A.json`, c121f04): the question
  file's text, stripped, then the same suffix; max_new_tokens 1024; pad-to-square (LLaVA-1.5's config). The file is
  in LLaVA's eval.zip, not the repository: a record of it quoted elsewhere reads "Context: {hint}\\n{question}\\nA. ..."
  [that layout for a question without a hint is unverified; taken as lmms-eval's, without the Context line].
Scoring:
- llava: `eval_science_qa.py`'s parse (a bare letter, "X. ...", or one "The answer is X."), right when the letter's
  index is the answer (`choices.eval_science_qa_answer`, `get_pred_idx`).
- lmms_eval: `sqa_process_results` (`choices.sqa_process_results`).
Metrics: accuracy (a fraction, as every task's), and unparsed (generations from which the parser reads no letter).
"""

from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, choices, rowio

__all__ = ["TASKS", "prompt"]

CONFIG, SPLIT = "ScienceQA-IMG", "test"
COLUMNS = {"question": rowio.PROMPT, "choices": rowio.PROMPT_TEXTS, "answer": rowio.INT, "hint": rowio.OPTIONAL_PROMPT}


def prompt(question: str, options: Sequence[str], hint: Any, protocol: str) -> str:
  """The user text after the image."""
  lines = choices.options_lines(options)
  if rowio.check_protocol(protocol) == "lmms_eval":
    context = f"Context: {hint}\n" if hint else hint      # "" stays "", None prints "None" (as the official f-string)
    return f"{context}{question}\n{lines}{choices.MC_SUFFIX}"
  context = f"Context: {hint}\n" if hint else ""
  return f"{context}{question}\n{lines}".strip() + choices.MC_SUFFIX


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for position, where, row, image in rowio.split_rows(data_dir, CONFIG, SPLIT, COLUMNS, with_images):
    options = row["choices"]
    if not options or len(options) > len(choices.LETTERS):
      raise ValueError(f"{where}: choices {options!r} is not a list of 1 to 26 options")
    answer = row["answer"]
    if not 0 <= answer < len(options):
      raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(options)} choices")
    yield base.Example(question_id=str(position), image=image,
                       text=prompt(row["question"], options, row["hint"], protocol),
                       target=choices.LETTERS[answer], meta={"num_choices": len(options)}, source=where)


def _lmms_eval_answer(generation: str) -> str:
  pred = generation.strip()
  return pred[0] if len(pred) >= 2 and pred[0].isupper() and pred[1] == "." else pred


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  if rowio.check_protocol(protocol) == "llava":
    return choices.eval_science_qa_answer(generation.strip())
  return _lmms_eval_answer(generation)


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  rowio.check_protocol(protocol)
  if not rows:
    raise ValueError("scienceqa_img: no rows to score")
  right = unparsed = 0
  for row in rows:
    text, target = rowio.generation(row), row["target"]
    if protocol == "llava":
      letter = choices.eval_science_qa_answer(text.strip())
      unparsed += letter == "FAILED"
      right += choices.get_pred_idx(letter, row["meta"]["num_choices"]) == choices.LETTERS.index(target)
    else:
      unparsed += len(_lmms_eval_answer(text)) != 1
      right += choices.sqa_process_results(target, text) == 1.0
  return {"accuracy": right / len(rows), "unparsed": float(unparsed)}


TASKS = {
    "scienceqa_img": base.Task(
        name="scienceqa_img", repo="lmms-lab/ScienceQA", folder="ScienceQA", config=CONFIG, split=SPLIT,
        num_rows=2017, id_source="position", max_new_tokens={"llava": 1024, "lmms_eval": 16}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score),
}
