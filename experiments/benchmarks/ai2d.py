"""AI2D test (3,088 questions): lmms-lab/ai2d, default config, split test.

Columns (the card's dataset_info; `tasks/ai2d/upload_ai2d.py`): question, options (list<string>), answer (a string
holding the index of the right option), image. No id column: question_id is the row's position in the split.

lmms-eval (`tasks/ai2d/ai2d.yaml`, `utils.py`, 75571cf), default model kwargs (prompt_format mcq):
"{question}\\nA. o0\\nB. o1...\\nAnswer with the option's letter from the given choices directly.", max_new_tokens 16,
greedy, no aspect override (pad). The LLaVA repository has no AI2D script: the llava protocol is the same task.
Scoring: the "flexible-extract" filter (`MultiChoiceRegexFilter.apply`: "X." at the start after optional whitespace
gives X, else the whole response; its regex_pattern/group_select arguments are unused), the task's strip, then
exact_match with ignore_case and ignore_punctuation against the letter of the answer. Metric: accuracy (a fraction).
"""

from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, choices, rowio

__all__ = ["TASKS", "prompt"]

SPLIT = "test"
COLUMNS = {"question": rowio.PROMPT, "options": rowio.PROMPT_TEXTS, "answer": rowio.INT}


def prompt(question: str, options: Sequence[str]) -> str:
  return f"{question}\n{choices.options_lines(options)}{choices.MC_SUFFIX}"


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for position, where, row, image in rowio.split_rows(data_dir, None, SPLIT, COLUMNS, with_images):
    options = row["options"]
    if not options or len(options) > len(choices.LETTERS):
      raise ValueError(f"{where}: options {options!r} is not a list of 1 to 26 options")
    answer = row["answer"]
    if not 0 <= answer < len(options):
      raise ValueError(f"{where}: answer {row['answer']!r} is not an index into its {len(options)} options")
    yield base.Example(question_id=str(position), image=image, text=prompt(row["question"], options),
                       target=choices.LETTERS[answer], meta={"num_options": len(options)}, source=where)


def _parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
  rowio.check_protocol(protocol)
  return choices.multi_choice_regex_filter(generation).strip()


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  if not rows:
    raise ValueError("ai2d: no rows to score")
  right = sum(choices.exact_match(_parse(rowio.generation(r), r["meta"], protocol), r["target"]) for r in rows)
  return {"accuracy": right / len(rows)}


TASKS = {
    "ai2d": base.Task(
        name="ai2d", repo="lmms-lab/ai2d", folder="ai2d", config=None, split=SPLIT, num_rows=3088,
        id_source="position", max_new_tokens={"llava": 16, "lmms_eval": 16}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score),
}
