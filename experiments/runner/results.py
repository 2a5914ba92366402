"""Append-only JSONL results with resume: an interrupted run picks up where it stopped, nothing recomputed or lost.

Each row is a JSON object with a string `key` (the run configuration's hash and name plus the example). On open,
existing rows are read and their keys remembered; `done(key)` tells the runner to skip. Rows are flushed and
fsync'ed as they are written, so a killed process loses at most the row being written.

What can go wrong on disk, and what each gets:
- A torn last line (a process killed mid-write) is dropped on the next open, and a last row missing its newline
  gets one; the file is repaired by writing the good lines to a temporary file beside it, fsync'ing it and renaming
  it over the log, so a failed repair leaves the old file whole.
- A corrupt line that is not the last, a line that is not a JSON object, a row without a string `key`, or two rows
  with one key (two writers at once, before logs were locked) raise ValueError naming the file and line(s).
- Two writers: opening a log takes an exclusive `flock` on `.lock` in its directory (holder's pid, host and start
  time written inside). A second opener fails at once with `DirectoryLocked` naming the holder. The kernel drops the
  lock when its process dies, so a stale `.lock` file left by a killed run never blocks the next one. (flock is
  local to one machine: two hosts writing one network directory are not kept apart.) `read_rows` reads a log
  without the lock, for a report while a run is still appending.
"""

import collections
import datetime
import fcntl
import json
import os
import socket
import stat
import tempfile
from typing import Any, Iterable

__all__ = ["ResultsLog", "read_rows", "DirectoryLock", "DirectoryLocked", "LOCK_NAME"]

LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
  """Another live process holds the directory's lock."""


class DirectoryLock:
  """Exclusive, non-blocking `flock` on `directory/.lock`, held until `release()` (or the process dies)."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, LOCK_NAME)
    # O_RDWR without O_TRUNC: the holder's note must survive our open until we own the lock.
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(os.pread(self._fd, 4096, 0))
      os.close(self._fd)
      raise DirectoryLocked(f"{directory} is in use by {holder} (lock {self.path}); wait for that run to finish or "
                            "use another --output_dir") from None
    note = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                           started=datetime.datetime.now().isoformat(timespec="seconds")))
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (note + "\n").encode(), 0)

  def release(self):
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor releases the flock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _describe_holder(note: bytes) -> str:
  """The holder's note as words; the holder may not have written it yet (it writes right after locking)."""
  try:
    holder = json.loads(note)
    return f"pid {holder['pid']} on {holder['host']} (started {holder['started']})"
  except (ValueError, TypeError, KeyError):
    return note.decode("utf-8", "replace").strip() or "another process (its note is not written yet)"


def _replace_atomically(path: str, lines: list[str]):
  """Writes `lines` to a temporary file in path's directory and renames it over `path` (all or nothing)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # mkstemp's 0600 must not replace the log's mode
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)  # the rename itself must reach the disk too
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def _parse(path: str) -> tuple[list[dict[str, Any]], list[str], bool]:
  """(rows, their lines, whether the file needs a repair before appending) of a log; a torn last line is left out
  of rows and lines."""
  with open(path, "r", encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
  rows, good = [], []
  line_of: dict[str, int] = {}  # key -> its 1-based line, to name both lines of a duplicate
  for number, line in enumerate(lines):
    if not line.strip():
      continue
    where = f"{path}:{number + 1}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == last:  # the torn last line of a killed run
        break
      raise ValueError(f"{where}: corrupt results line (not the last one); refusing to continue") from None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: a results line must be a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("key"), str):
      raise ValueError(f"{where}: results row has no string 'key' (got {row.get('key')!r})")
    if row["key"] in line_of:
      raise ValueError(f"{where}: key {row['key']!r} is also on line {line_of[row['key']]}: two runs wrote into "
                       "this log at once; delete one of the two lines (or the file) and rerun")
    rows.append(row)
    good.append(line)
    line_of[row["key"]] = number + 1
  # A last row without its newline (killed between the two) would be glued to the next row appended.
  unterminated = bool(text) and not text.endswith("\n")
  return rows, good, unterminated or len(good) != sum(1 for line in lines if line.strip())


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a log, read without its lock and without repairing it (a torn last line is skipped): for reports
  while a run may still be appending."""
  return _parse(path)[0]


class ResultsLog:
  """JSONL file of result rows keyed by `row["key"]`; holds its directory's lock while open."""

  def __init__(self, path: str):
    self.path = path
    self.rows: list[dict[str, Any]] = []
    self._keys: set[str] = set()
    self._lock = DirectoryLock(os.path.dirname(os.path.abspath(path)))
    try:
      if os.path.exists(path):
        self._load()
      self._file = open(path, "a", encoding="utf-8")
    except BaseException:
      self._lock.release()
      raise

  def _load(self):
    self.rows, good, needs_repair = _parse(self.path)
    self._keys = {row["key"] for row in self.rows}
    if needs_repair:
      _replace_atomically(self.path, good)

  def done(self, key: str) -> bool:
    return key in self._keys

  def append(self, rows: Iterable[dict[str, Any]]):
    """Writes the rows whose key is new (a row already in the log is skipped: a batch half-written by a killed run
    is recomputed whole); two rows with one key in `rows` raise ValueError."""
    rows = list(rows)
    twice = sorted(k for k, n in collections.Counter(row["key"] for row in rows).items() if n > 1)
    if twice:
      raise ValueError(f"{self.path}: append got two rows for key(s) {twice}")
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
    self._lock.release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
