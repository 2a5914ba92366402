"""A run's predictions file, `predictions/<task>/<run>.jsonl`: written by the runner (`experiments.runner.outputs`),
re-scored without the model by `experiments.score`.

The first line is the provenance header, `{"provenance": {...}}`: the invocation that wrote the file, the task, the
run and its hash (the first part of its rows' keys in results.jsonl), the snapshot folder, and every setting hashed
into the rows (`TaskRun.settings`: protocol, conv_template, resolution, limit, max_new_tokens, checkpoint and its
fingerprint, data_dir and the snapshot's fingerprint, the task revision; seed, batch_size, backbone). Then one object
per question: question_id, prompt, prediction (the raw generation cut at the task's stop strings) and answer (the
parsed one), lmms-eval's spirit. A file without the header (written before the header existed) reads the same, with
no provenance.
"""

import itertools
import json
import os
from typing import Any, Iterable, Mapping

from experiments.runner import results
from experiments.synthvqa import vqa

__all__ = ["HEADER", "write", "read_header", "read_predictions"]

HEADER = "provenance"


def write(path: str, provenance: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]):
  """The header and one line per row, written atomically (`results.write_atomically`)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = (json.dumps(dict(question_id=r["question_id"], prompt=r["prompt"], prediction=r["prediction"],
                           answer=r["answer"]), ensure_ascii=False) + "\n" for r in rows)
  header = json.dumps({HEADER: dict(provenance)}, ensure_ascii=False, sort_keys=True) + "\n"
  results.write_atomically(path, itertools.chain([header], lines))


def _header_of(row: Mapping[str, Any], where: str) -> dict[str, Any] | None:
  if HEADER not in row:
    return None
  if not isinstance(row[HEADER], dict) or "question_id" in row:
    raise ValueError(f"{where}: a provenance header must be {{\"{HEADER}\": {{...}}}} alone")
  return row[HEADER]


def read_header(path: str) -> dict[str, Any] | None:
  """The file's provenance (None for a file written without it)."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        return _header_of(vqa.json_object_line(line, f"{path}:{number}"), f"{path}:{number}")
  return None


def read_predictions(path: str) -> dict[str, str]:
  """question_id -> raw prediction (the header skipped); ValueError naming the file and line for bad rows."""
  out, lines, first = {}, {}, True
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      row = vqa.json_object_line(line, where)
      if first:
        first = False
        if _header_of(row, where) is not None:
          continue
      for field in ("question_id", "prediction"):
        if field not in row:
          raise ValueError(f"{where}: missing field {field!r}")
      if not isinstance(row["prediction"], str):
        raise ValueError(f"{where}: field 'prediction' must be a string, got {json.dumps(row['prediction'])}")
      qid = str(row["question_id"])
      if qid in out:
        raise ValueError(f"{where}: question_id {qid!r} is also on line {lines[qid]}")
      out[qid], lines[qid] = row["prediction"], number
  return out
