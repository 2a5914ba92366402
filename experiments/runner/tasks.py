"""The runner's tasks: each reads its examples (`Item`s) from generated data or a local directory.

`TASKS[name](data_dir, split, limit, seed) -> list[Item]`; bad data raises ValueError naming the file, line and
field, and nothing is skipped silently (a skipped example would shrink the benchmark).
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from experiments.synthvqa import vqa

__all__ = ["Item", "TASKS"]


@dataclasses.dataclass(frozen=True)
class Item:
  example_id: str
  image: np.ndarray       # uint8[H, W, 3]
  question: str
  answer: str
  family: str
  subtype: str

  @functools.cached_property
  def digest(self) -> str:
    """Hash of what the model sees and is scored against: an example edited under the same id gets new rows."""
    h = hashlib.sha1(json.dumps([self.question, self.answer, self.family, self.subtype,
                                 list(self.image.shape)]).encode())
    h.update(np.ascontiguousarray(self.image).tobytes())
    return h.hexdigest()[:10]


def _check_unique_ids(items: Sequence[Item], where: str):
  first: dict[str, int] = {}
  for position, it in enumerate(items):
    if it.example_id in first:
      raise ValueError(f"{where}: example id {it.example_id!r} is used by examples {first[it.example_id]} and "
                       f"{position} (0-based); results are keyed by id, so ids must be unique")
    first[it.example_id] = position


def synthvqa(data_dir, split, limit, seed) -> list[Item]:
  if data_dir:
    examples = vqa.read_split(data_dir, split)
    examples = examples[:limit] if limit else examples
  else:
    examples = vqa.make_split(split, limit or 400, seed=seed)
  # scene ids name (split, seed, family, k): a larger --limit evaluates a superset and resumes the rest.
  items = [Item(f"{split}/{ex.scene_id}", ex.image, ex.question, ex.answer, ex.family, ex.subtype) for ex in examples]
  _check_unique_ids(items, os.path.join(data_dir, split) if data_dir else f"synthvqa {split} split")
  return items


def vqa_jsonl(data_dir, split, limit, seed) -> list[Item]:
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
      items.append(Item(example_id, _read_image(os.path.join(data_dir, row["image"]), where), row["question"],
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
