"""Append-only JSONL results with resume: an interrupted run picks up where it stopped, nothing recomputed or lost.

Each row carries a `key` (the run configuration's name plus the example id). On open, existing rows are read and
their keys remembered; `done(key)` tells the runner to skip. Rows are flushed and fsync'ed as they are written, so a
killed process loses at most the row being written; a torn last line (killed mid-write) is dropped on the next open
and the file is repaired in place before anything new is appended.
"""

import json
import os
from typing import Any, Iterable

__all__ = ["ResultsLog"]


class ResultsLog:
  """JSONL file of result rows keyed by `row["key"]`."""

  def __init__(self, path: str):
    self.path = path
    self.rows: list[dict[str, Any]] = []
    self._keys: set[str] = set()
    if os.path.exists(path):
      self._load()
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def _load(self):
    with open(self.path, "r", encoding="utf-8") as f:
      lines = f.read().split("\n")
    good = []
    for number, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        if number >= len(lines) - 2:  # the torn last line of a killed run
          break
        raise ValueError(f"{self.path}:{number + 1}: corrupt results line (not the last one); refusing to continue")
      good.append(line)
      self.rows.append(row)
      self._keys.add(row["key"])
    if len(good) != sum(1 for line in lines if line.strip()):
      with open(self.path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in good))

  def done(self, key: str) -> bool:
    return key in self._keys

  def append(self, rows: Iterable[dict[str, Any]]):
    for row in rows:
      if row["key"] in self._keys:
        continue
      self._file.write(json.dumps(row, sort_keys=True) + "\n")
      self.rows.append(row)
      self._keys.add(row["key"])
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
