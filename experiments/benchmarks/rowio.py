"""What every benchmark task shares: a split's rows, each field checked as its task declares it, with their decoded
images and the row's position in the split; and a run row's generation.

Axes: H image height, W image width (pixels).

This is where a split's bad data is named, when its row is read: each task declares its columns as `Field`s and
`split_rows` checks every cell against them (null, type, the image token in prompt text, an id used twice), naming
the file, the row and the field. What only one task knows (POPE's yes/no answers, MME's categories) its module
checks on the rows `split_rows` yields.
"""

import dataclasses
import math
from typing import Any, Iterator, Mapping

import numpy as np

from experiments.benchmarks import base, parquet

__all__ = ["Field", "TEXT", "PROMPT", "OPTIONAL_PROMPT", "TEXTS", "PROMPT_TEXTS", "ID", "INT", "ANY",
           "check_protocol", "read_field", "split_rows", "generation"]


@dataclasses.dataclass(frozen=True)
class Field:
  """How a column's cell is read.

  kind: "text" a string; "texts" a list of strings (a list of structs read as their `item_key` strings when that is
    given); "id" a string or an integer, read as a string; "int" an integer or a string of one, read as an int;
    "any" as stored (the task checks it).
  nullable: a null cell (None, or a float NaN) reads as None ([] for "texts") instead of raising; a null inside a
    list always raises.
  prompt: the text goes into the prompt, so it may not hold `base.IMAGE_TOKEN`.
  """
  kind: str
  nullable: bool = False
  prompt: bool = False
  item_key: str | None = None

  def __post_init__(self):
    if self.kind not in ("text", "texts", "id", "int", "any"):
      raise ValueError(f"unknown field kind {self.kind!r}")


TEXT = Field("text")
PROMPT = Field("text", prompt=True)                   # the question
OPTIONAL_PROMPT = Field("text", nullable=True, prompt=True)   # hints, MMBench's options
TEXTS = Field("texts")                                # ground-truth answer lists
PROMPT_TEXTS = Field("texts", prompt=True)            # option lists
ID = Field("id")
INT = Field("int")
ANY = Field("any", nullable=True)                     # meta the scores never read, or checked by the task

_TYPES = {"text": "a string", "texts": "a list of strings", "id": "a string or an integer", "int": "an integer"}


def check_protocol(protocol: str) -> str:
  if protocol not in base.PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(base.PROTOCOLS)}")
  return protocol


def _null(value: Any) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def _shown(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _text(value: Any, name: str, where: str, prompt: bool) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {name!r} is {'null' if _null(value) else _shown(value)}; expected a string")
  if prompt and base.IMAGE_TOKEN in value:
    raise ValueError(f"{where}: field {name!r} holds {base.IMAGE_TOKEN!r}, the token the processor replaces with "
                     f"the image's features: {value[:80]!r}")
  return value


def read_field(value: Any, field: Field, name: str, where: str) -> Any:
  """A cell read as `field` declares; ValueError naming `where` (file and row), the field and what it holds."""
  if _null(value) and field.kind != "any":
    if field.nullable:
      return [] if field.kind == "texts" else None
    raise ValueError(f"{where}: field {name!r} is null")
  if field.kind == "any":
    return value
  if field.kind == "text":
    return _text(value, name, where, field.prompt)
  if field.kind == "texts":
    if not isinstance(value, list):
      raise ValueError(f"{where}: field {name!r} is {_shown(value)}; expected {_TYPES['texts']}")
    key = field.item_key
    if key is None:
      return [_text(item, f"{name}[{i}]", where, field.prompt) for i, item in enumerate(value)]
    return [_text(item.get(key) if isinstance(item, Mapping) else item, f"{name}[{i}].{key}", where, field.prompt)
            for i, item in enumerate(value)]
  if field.kind == "id" and isinstance(value, (str, int)) and not isinstance(value, bool):
    return str(value)
  if field.kind == "int" and isinstance(value, (int, str)) and not isinstance(value, bool):
    try:
      return int(value)
    except ValueError:
      pass
  raise ValueError(f"{where}: field {name!r} is {_shown(value)}; expected {_TYPES[field.kind]}")


def split_rows(data_dir: str, config: str | None, split: str, columns: Mapping[str, Field], with_images: bool,
               id_column: str | None = None,
               image_column: str = "image") -> Iterator[tuple[int, str, dict[str, Any], np.ndarray | None]]:
  """Streams (position in the split in shard order, "file row i", {column: checked value}, uint8[H, W, 3] or None).

  columns: each column the task reads and how (`Field`). id_column: the column of the task's question ids, which
  must be unique (as `str` of the read value; the first row of a repeated id is named too).
  The errors are parquet's (a missing split, an incomplete shard set, a missing column, bytes that are not UTF-8, an
  empty split), the fields' (`read_field`), a repeated id's, and the image's (a null cell, bytes that do not
  decode), each naming the file and row.
  """
  names = list(columns) + ([image_column] if with_images else [])
  files = parquet.split_files(data_dir, config, split)
  first: dict[str, str] = {}
  for position, (path, index, raw) in enumerate(parquet.iter_rows(files, names)):
    where = f"{path} row {index}"
    row = {name: read_field(raw[name], field, name, where) for name, field in columns.items()}
    if id_column is not None:
      qid = str(row[id_column])
      if qid in first:
        raise ValueError(f"{where}: {id_column} {qid!r} is also that of {first[qid]}; results are keyed by it, so "
                         "it must be unique in the split")
      first[qid] = where
    image = base.decode_image(parquet.image_bytes(raw[image_column], where), where) if with_images else None
    yield position, where, row, image


def generation(row: Mapping[str, Any]) -> str:
  """The generation of a run row: base.py's "prediction", or the runner's "generation" (cut at the stop strings)."""
  for key in ("prediction", "generation"):
    if key in row:
      return str(row[key])
  raise KeyError(f"question {row.get('question_id')!r}: the row has no 'prediction' or 'generation' "
                 f"(keys: {sorted(row)})")
