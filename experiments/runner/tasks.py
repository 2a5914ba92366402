"""The runner's tasks: what one invocation evaluates on each `--tasks` name, the same contract for every task.

Every task is a stream of `benchmarks.base.Example`s turned into a `TaskRun` (`task_run`): how an example becomes a
prompt and an image, the row fields its generation gives, its row key and the settings hashed into the keys. Two
kinds share it:
- in memory (`TASKS`: synthvqa, the procedural benchmark; vqa_jsonl, a local questions.jsonl): every example is read
  first; `TASKS[name](data_dir, split, limit, seed) -> list[Example]` (meta: family, subtype), rows scored by exact
  match after `normalize_answer`, keyed by the example id and its content `digest`;
- streamed (`experiments.benchmarks.registry`): the papers' benchmarks on local snapshots, rows parsed and scored by
  the task's official formulas, keyed by the question id. `task_run` reads the examples the run will evaluate once
  without their images, so that a bad row is named before any is evaluated; images are checked as they stream.
Bad data raises ValueError naming the file, line and field, and nothing is skipped silently (a skipped example would
shrink the benchmark).
"""

import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from experiments.benchmarks import base
from experiments.benchmarks import parquet
from experiments.runner import conversation
from experiments.runner import plan
from experiments.synthvqa import vqa

__all__ = ["TASKS", "TaskRun", "task_run", "task_dir", "digest", "normalize_answer"]


def normalize_answer(text: str) -> str:
  return text.strip().lower().rstrip(".").strip()


def digest(example: base.Example) -> str:
  """Hash of what the model sees and is scored against: an example edited under the same id gets new rows."""
  meta = example.meta
  h = hashlib.sha1(json.dumps([example.text, example.target, meta["family"], meta["subtype"],
                               list(example.image.shape)]).encode())
  h.update(np.ascontiguousarray(example.image).tobytes())
  return h.hexdigest()[:10]


def _example(example_id: str, image: np.ndarray, question: str, answer: str, family: str,
             subtype: str) -> base.Example:
  return base.Example(example_id, image, question, answer, {"family": family, "subtype": subtype})


def _check_unique_ids(items: Sequence[base.Example], where: str):
  first: dict[str, int] = {}
  for position, it in enumerate(items):
    if it.question_id in first:
      raise ValueError(f"{where}: example id {it.question_id!r} is used by examples {first[it.question_id]} and "
                       f"{position} (0-based); results are keyed by id, so ids must be unique")
    first[it.question_id] = position


def synthvqa(data_dir, split, limit, seed) -> list[base.Example]:
  if data_dir:
    examples = vqa.read_split(data_dir, split)
    examples = examples[:limit] if limit else examples
  else:
    examples = vqa.make_split(split, limit or 400, seed=seed)
  # scene ids name (split, seed, family, k): a larger --limit evaluates a superset and resumes the rest.
  items = [_example(f"{split}/{ex.scene_id}", ex.image, ex.question, ex.answer, ex.family, ex.subtype)
           for ex in examples]
  _check_unique_ids(items, os.path.join(data_dir, split) if data_dir else f"synthvqa {split} split")
  return items


def vqa_jsonl(data_dir, split, limit, seed) -> list[base.Example]:
  """data_dir/questions.jsonl rows: {"id", "image" (path relative to data_dir), "question", "answer",
  optional "family"/"subtype"} (e.g. POPE or GQA converted to this form).

  Blank lines are skipped (and counted in the log). Everything else wrong raises ValueError naming questions.jsonl
  and the line: malformed JSON, a line that is not an object, a missing or null field, a field of the wrong type
  (answer: a string or an integer), an id used twice (both lines named), an image that is missing, truncated or
  not an image (the image file named). Nothing is skipped silently: a skipped example would shrink the benchmark.
  """
  del split, seed
  path = os.path.join(data_dir, "questions.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"vqa_jsonl: {path} does not exist")
  items, first_line, blank = [], {}, 0
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f):
      if limit and len(items) >= limit:
        break
      if not line.strip():
        blank += 1
        continue
      where = f"{path}:{number + 1}"
      row = _question_row(line, where)
      example_id = str(row.get("id", number))
      if example_id in first_line:
        raise ValueError(f"{where}: id {example_id!r} is also on line {first_line[example_id]}; results are keyed "
                         "by id, so ids must be unique")
      first_line[example_id] = number + 1
      items.append(_example(example_id, _read_image(os.path.join(data_dir, row["image"]), where), row["question"],
                            str(row["answer"]), row.get("family", "vqa"), row.get("subtype", "")))
  if blank:
    logging.warning("%s: skipped %d blank line(s)", path, blank)
  return items


def _question_row(line: str, where: str) -> dict[str, Any]:
  """One questions.jsonl line, checked field by field; ValueError naming `where` (file:line) and the field."""
  row = vqa.json_object_line(line, where)
  missing = [k for k in ("image", "question", "answer") if k not in row]
  if missing:
    raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
  # bool is an int to Python, and str(True) would be scored against "true".
  expected = dict(image=(str,), question=(str,), answer=(str, int), id=(str, int), family=(str,), subtype=(str,))
  for field, types in expected.items():
    if field in row and (not isinstance(row[field], types) or isinstance(row[field], bool)):
      names = " or ".join({str: "a string", int: "an integer"}[t] for t in types)
      raise ValueError(f"{where}: field {field!r} is {json.dumps(row[field])}; expected {names}")
  return row


def _read_image(image_path: str, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(image_path) as image:
      return np.asarray(image.convert("RGB"))  # convert() decodes every pixel: a truncated file fails here
  except OSError as e:  # missing, not an image (UnidentifiedImageError), truncated
    raise ValueError(f"{where}: image {image_path} cannot be read: {e}") from None


TASKS = {"synthvqa": synthvqa, "vqa_jsonl": vqa_jsonl}


@dataclasses.dataclass(frozen=True)
class TaskRun:
  """A task as one invocation evaluates it (`task_run`).

  in_memory: every example is read first and batched in its order, with one padded length and one text bound for
    the whole task (one compile per run); batches are numbered from 0 (the random methods' key), and for random
    methods the examples' order is hashed into the rows' keys. Streamed (the benchmarks): buffers of examples sorted
    by prompt length, each batch its own length and text bound, numbered from 1, and each pruned row also records
    its KL / NLL fidelity against the full run's (the full run is evaluated first).
  examples: the task's examples (a list when in_memory; the stream stops at `limit`, 0 = all).
  settings: what, besides a run's pruning configuration, changes its rows' numbers (`evaluate.run_hash`).
  prompt, image: an example -> the rendered prompt (one "<image>") and the image the processor receives.
  key: an example -> its part of the rows' keys.
  fields: (example, prompt, generation) -> the task's row fields (ids, answer, scoring).
  benchmark: the benchmark task (None for the in-memory tasks).
  directory: the benchmark's snapshot folder (`task_dir`; None for the in-memory tasks).
  """
  name: str
  in_memory: bool
  examples: Iterable[base.Example]
  limit: int
  max_new_tokens: int
  settings: Mapping[str, Any]
  prompt: Callable[[base.Example], str]
  image: Callable[[base.Example], np.ndarray]
  key: Callable[[base.Example], str]
  fields: Callable[[base.Example, str, str], dict[str, Any]]
  benchmark: base.Task | None = None
  aspect: str | None = None
  directory: str | None = None


def task_dir(data_dir: str, task: base.Task, single: bool) -> str:
  """The task's snapshot: ROOT/<repository name> when it exists, else `data_dir` itself when it is the one
  benchmark task of the invocation. ValueError naming both candidates otherwise."""
  candidate = os.path.join(data_dir, task.folder)
  if os.path.isdir(candidate):
    return candidate
  if single:
    return data_dir
  raise ValueError(f"task {task.name}: no snapshot folder {candidate} (the folder of {task.repo}); with several "
                   "benchmark tasks --data_dir must hold one folder per dataset repository")


def _cut(text: str, stops: Sequence[str]) -> str:
  cut = min([text.index(s) for s in stops if s and s in text], default=len(text))
  return text[:cut]


def _read_through(task: base.Task, directory: str, protocol: str, limit: int) -> None:
  """Reads the first `limit` (0: all) examples without images: every check of the split's rows (`rowio.split_rows`:
  nulls, types, the image token, ids used twice) raises now, before the first batch is evaluated, not when the
  stream reaches the row. Costs one pass over the text columns."""
  for _ in itertools.islice(task.examples(directory, protocol, False), limit or None):
    pass


def task_run(name: str, config: plan.RunConfig, resolved: plan.Resolved, backbone: plan.Backbone,
             processor) -> TaskRun:
  """The `TaskRun` of task `name` under this invocation's configuration. ValueError for a task without examples, a
  benchmark snapshot that is not there or whose shards are not one complete download, or a bad row among the
  examples the run will evaluate (`_read_through`).

  A benchmark's `data_fingerprint` hashes the data files the task reads (`Task.fingerprint`), nothing else under
  the snapshot: an output folder inside it, the hub's `.cache/` or a note change no row, so a resume reuses every
  finished row."""
  settings = plan.run_hash_fields(resolved, name)
  if name in TASKS:
    examples = TASKS[name](config.data_dir, config.split, config.limit, config.seed)
    if not examples:
      raise ValueError(f"task {name} has no examples")

    def fields(example, prompt, generation):
      del prompt
      prediction = normalize_answer(generation)
      return dict(example_id=example.question_id, family=example.meta["family"], subtype=example.meta["subtype"],
                  answer=example.target, prediction=prediction,
                  correct=prediction == normalize_answer(example.target))

    return TaskRun(name=name, in_memory=True, examples=examples, limit=0, max_new_tokens=resolved.max_new_tokens,
                   settings=settings, prompt=lambda ex: backbone.prompt.format(question=ex.text),
                   image=lambda ex: ex.image, key=lambda ex: f"{ex.question_id}/{digest(ex)}", fields=fields)
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  task = registry.TASKS[name]
  protocol = resolved.protocol
  single = sum(t not in plan.IN_MEMORY_TASKS for t in config.tasks) == 1
  directory = task_dir(config.data_dir, task, single)
  # The family's input hooks (`experiments.runner.inputs`): its wrapper's answer length where the task's yaml sets
  # none, its stop strings, its system prompt, its image preparation.
  inputs = backbone.inputs
  max_new_tokens = config.max_new_tokens or inputs.max_new_tokens(task) or task.max_new_tokens[protocol]
  aspect = task.image_aspect[protocol] if backbone.square_pad else config.resolution
  stops, system = inputs.stops(task.stop), inputs.system(protocol)
  fingerprint = task.fingerprint(directory)
  _read_through(task, directory, protocol, config.limit)

  def fields(example, prompt, generation):
    generation = _cut(generation, stops).strip()
    return dict(task=task.name, question_id=example.question_id, prompt=prompt, prediction=generation,
                answer=task.parse(generation, example.meta, protocol), target=example.target, meta=dict(example.meta))

  return TaskRun(name=name, in_memory=False, examples=task.examples(directory, protocol, True), limit=config.limit,
                 max_new_tokens=max_new_tokens,
                 settings=dict(settings, max_new_tokens=max_new_tokens,
                               data_fingerprint=fingerprint),
                 prompt=lambda ex: conversation.render(resolved.conv_template, ex.text, processor, system),
                 image=lambda ex: inputs.image(ex.image, aspect, processor, protocol), key=lambda ex: ex.question_id,
                 fields=fields, benchmark=task, aspect=aspect, directory=directory)
