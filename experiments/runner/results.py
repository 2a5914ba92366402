"""Append-only JSONL results with resume: an interrupted run picks up where it stopped, nothing recomputed or lost.

Each row is a JSON object with a string `key` (the run configuration's hash and name plus the example), one per line.
`done(key)` tells the runner to skip a finished row and `read(keys)` reads the rows a report needs. Rows are written,
flushed and fsync'ed a batch at a time, so a killed process loses at most the batch being written.

The index: `results.jsonl.index` beside the log (SQLite, from the standard library) maps each key to its row's byte
offset, length and line, and records the log's size, mtime and inode as of its last commit. Opening a log whose index
matches it reads nothing else, so open time and memory do not grow with the rows already written (1,000,000 rows:
BUILD.md "Results log", `experiments.bench.results_log`); `done` is one indexed lookup. An append writes and fsyncs
the rows first, then commits their entries and the new log state in one transaction, so the index never names bytes
the log does not hold. A process killed between the two leaves an index behind its log: the next open checks that
the last indexed row is still where the index says (its bytes' hash) and indexes the rows after it. A missing,
unreadable or older-format index, or a log that is not the indexed one plus appended lines (replaced, rewritten,
edited in place), is rebuilt from the whole log. A killed run therefore resumes to the same log and the same index as
an uninterrupted one (`tests/experiments/runner/test_results.py`).

What can go wrong on disk, and what each gets (lines are checked as they are indexed):
- A torn last line (a process killed mid-write) is cut off the log in place (`ftruncate` to the end of the last good
  line: no copy is written, so a full disk cannot lose rows), and a last row missing its newline gets one appended.
- A corrupt line that is not the last, a line that is not a JSON object, a row without a string `key`, or two rows
  with one key (two writers at once, before logs were locked) raise ValueError naming the file and line(s); so does
  a row that no longer reads back as the key the index names (the log edited by hand in the meantime).
- Two writers: opening a log takes an exclusive `flock` on `.lock` in its directory (holder's pid, host and start
  time written inside). A second opener fails at once with `DirectoryLocked` naming the holder. The kernel drops the
  lock when its process dies, so a stale `.lock` file left by a killed run never blocks the next one. (flock is
  local to one machine: two hosts writing one network directory are not kept apart.) `read_rows` reads a log
  without the lock or the index, for a report while a run is still appending.
"""

import collections
import datetime
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import stat
import tempfile
from typing import Any, Iterable, Iterator, NamedTuple

__all__ = ["ResultsLog", "read_rows", "DirectoryLock", "DirectoryLocked", "LOCK_NAME", "INDEX_SUFFIX",
           "write_atomically"]

LOCK_NAME = ".lock"
INDEX_SUFFIX = ".index"
_INDEX_VERSION = 1


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



def _fsync_directory(directory: str):
  """A rename or a new file must reach the disk too, not only the file's bytes."""
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def write_atomically(path: str, chunks: Iterable[str]):
  """Writes the text `chunks` to a temporary file in path's directory, fsyncs it and renames it over `path`: a reader
  sees the old file or the new one, never part of one. An existing file keeps its mode; a new one gets 0644."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644)  # not mkstemp's 0600
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(chunks)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_directory(directory)


class _Line(NamedTuple):
  """One row of a log and where it is."""
  row: dict[str, Any]
  offset: int         # its first byte
  length: int         # its bytes, without the newline
  number: int         # its 1-based line


class _Scan:
  """The rows of a log from byte `start` (`lines` lines before it), each checked as it is read (ValueError naming
  file:line). After the iteration: `end` is the byte after the last line read (a torn last line is not read), `lines`
  the lines up to `end`, `torn` whether a torn line follows `end`, `unterminated` whether the last line read lacks
  its newline."""

  def __init__(self, path: str, start: int = 0, lines: int = 0):
    self.path, self.end, self.lines = path, start, lines
    self.torn = self.unterminated = False

  def __iter__(self) -> Iterator[_Line]:
    with open(self.path, "rb") as f:
      f.seek(self.end)
      for raw in f:
        number = self.lines + 1
        if raw.strip():
          line = self._checked(raw, number, f)
          if line is None:
            return
          yield line
        self.end += len(raw)
        self.lines = number
        self.unterminated = not raw.endswith(b"\n")

  def _checked(self, raw: bytes, number: int, rest) -> _Line | None:
    where = f"{self.path}:{number}"
    try:
      row = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
      if any(line.strip() for line in rest):
        raise ValueError(f"{where}: corrupt results line (not the last one); refusing to continue") from None
      self.torn = True  # the torn last line of a killed run
      return None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: a results line must be a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("key"), str):
      raise ValueError(f"{where}: results row has no string 'key' (got {row.get('key')!r})")
    return _Line(row, self.end, len(raw.rstrip(b"\n")), number)


def _duplicate(path: str, number: int, key: str, first: int) -> ValueError:
  return ValueError(f"{path}:{number}: key {key!r} is also on line {first}: two runs wrote into this log at once; "
                    "delete one of the two lines (or the file) and rerun")


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a log, read without its lock or index and without repairing it (a torn last line is skipped): for
  reports while a run may still be appending."""
  rows, line_of = [], {}
  for line in _Scan(path):
    key = line.row["key"]
    if key in line_of:
      raise _duplicate(path, line.number, key, line_of[key])
    line_of[key] = line.number
    rows.append(line.row)
  return rows


class _State(NamedTuple):
  """The log as an index last saw it: its size, mtime and inode, its lines, and its last indexed row (the anchor:
  offset, length and sha1 of its bytes; length -1 when no row is indexed)."""
  size: int
  mtime_ns: int
  inode: int
  lines: int
  anchor_offset: int = 0
  anchor_length: int = -1
  anchor_sha1: str = ""

  def matches(self, info: os.stat_result) -> bool:
    return (self.size, self.mtime_ns, self.inode) == (info.st_size, info.st_mtime_ns, info.st_ino)


class _Index:
  """The on-disk map key -> (offset, length, line) of one log and the `_State` of the log it describes (SQLite:
  lookups read a few pages; memory is SQLite's page cache, about 2 MB, whatever the rows)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._db = self._connect()
    except sqlite3.DatabaseError:  # not an index (a damaged or foreign file): start a new one
      for stale in (path, path + "-journal"):    # a journal left beside it must not be replayed into the new one
        if os.path.exists(stale):
          os.remove(stale)
      self._db = self._connect()

  def _connect(self) -> sqlite3.Connection:
    db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit (`transaction`)
    try:
      db.execute("PRAGMA synchronous = FULL")    # a commit is on disk when it returns
      if db.execute("PRAGMA user_version").fetchone()[0] != _INDEX_VERSION:
        db.executescript(f"""
            DROP TABLE IF EXISTS rows; DROP TABLE IF EXISTS state;
            CREATE TABLE rows (key TEXT PRIMARY KEY, offset INTEGER NOT NULL, length INTEGER NOT NULL,
                               line INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE state (size, mtime_ns, inode, lines, anchor_offset, anchor_length, anchor_sha1);
            PRAGMA user_version = {_INDEX_VERSION};""")
      db.execute("SELECT count(*) FROM state").fetchone()
    except BaseException:
      db.close()
      raise
    return db

  def state(self) -> _State | None:
    row = self._db.execute("SELECT * FROM state").fetchone()
    return None if row is None else _State(*row)

  def find(self, key: str) -> tuple[int, int, int] | None:
    """(offset, length, line) of the row of `key`, None when the log has none."""
    return self._db.execute("SELECT offset, length, line FROM rows WHERE key = ?", (key,)).fetchone()

  def count(self) -> int:
    return self._db.execute("SELECT count(*) FROM rows").fetchone()[0]

  def transaction(self) -> "_Transaction":
    return _Transaction(self._db, self.path)

  def clear(self):
    self._db.execute("DELETE FROM rows")

  def insert(self, path: str, lines: Iterable[_Line]):
    """Indexes `lines`; ValueError naming both lines for a key the index already holds."""
    for line in lines:
      try:
        self._db.execute("INSERT INTO rows VALUES (?, ?, ?, ?)",
                         (line.row["key"], line.offset, line.length, line.number))
      except sqlite3.IntegrityError:
        raise _duplicate(path, line.number, line.row["key"], self.find(line.row["key"])[2]) from None

  def save_state(self, state: _State):
    self._db.execute("DELETE FROM state")
    self._db.execute("INSERT INTO state VALUES (?, ?, ?, ?, ?, ?, ?)", state)

  def close(self):
    self._db.close()


class _Transaction:
  """BEGIN ... COMMIT, or ROLLBACK when the block raises (the index is then as before the block). SQLite's I/O errors
  (a full disk) come out as OSError naming the index."""

  def __init__(self, db: sqlite3.Connection, path: str):
    self._db, self._path = db, path

  def __enter__(self):
    self._db.execute("BEGIN IMMEDIATE")

  def __exit__(self, exc_type, exc, tb):
    try:
      if exc_type is None:
        self._db.execute("COMMIT")
        return
    except sqlite3.OperationalError as e:
      exc = e
    if self._db.in_transaction:
      self._db.execute("ROLLBACK")
    if isinstance(exc, sqlite3.OperationalError):
      raise OSError(f"{self._path}: the results index cannot be written ({exc})") from exc


def _sha1_at(path: str, offset: int, length: int) -> str | None:
  """sha1 of the `length` bytes at `offset` when a newline follows them, else None."""
  with open(path, "rb") as f:
    f.seek(offset)
    data = f.read(length + 1)
  return hashlib.sha1(data[:-1]).hexdigest() if len(data) == length + 1 and data.endswith(b"\n") else None


class ResultsLog:
  """JSONL file of result rows keyed by `row["key"]`, indexed on disk (`INDEX_SUFFIX`); holds its directory's lock
  while open. The log and its index are created by the first append."""

  def __init__(self, path: str):
    self.path = path
    self._file = None         # the append handle (binary), opened by the first append
    self._index: _Index | None = None
    self._lock = DirectoryLock(os.path.dirname(os.path.abspath(path)))
    try:
      if os.path.exists(path):
        self._sync()
    except BaseException:
      self.close()
      raise

  def _sync(self):
    """Brings the index up to the log (the module docstring says how), repairing a torn or unterminated tail."""
    self._index = self._index or _Index(self.path + INDEX_SUFFIX)
    info, state = os.stat(self.path), self._index.state()
    if state is not None and state.matches(info):
      return
    resume = state is not None and info.st_size > state.size and (
        state.anchor_length < 0 and state.size == 0 or
        _sha1_at(self.path, state.anchor_offset, state.anchor_length) == state.anchor_sha1)
    scan = _Scan(self.path, state.size, state.lines) if resume else _Scan(self.path)
    with self._index.transaction():
      if not resume:
        self._index.clear()
      last = None
      for line in scan:
        self._index.insert(self.path, [line])
        last = line
      if scan.torn:
        with open(self.path, "r+b") as f:
          f.truncate(scan.end)
          os.fsync(f.fileno())
      elif scan.unterminated:   # a last row without its newline would be glued to the next row appended
        with open(self.path, "ab") as f:
          f.write(b"\n")
          f.flush()
          os.fsync(f.fileno())
        scan.end += 1
      if last is not None:
        anchor = (last.offset, last.length, _sha1_at(self.path, last.offset, last.length))
      else:
        anchor = state[4:] if resume else (0, -1, "")
      info = os.stat(self.path)
      self._index.save_state(_State(info.st_size, info.st_mtime_ns, info.st_ino, scan.lines, *anchor))

  def done(self, key: str) -> bool:
    return self._index is not None and self._index.find(key) is not None

  def count(self) -> int:
    """The rows in the log."""
    return 0 if self._index is None else self._index.count()

  def read(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The rows of `keys` that the log holds, by key (keys without a row are left out), read in the log's order.
    ValueError naming file:line for a row that does not read back as its key (the log edited since it was
    indexed)."""
    if self._index is None:
      return {}
    where = sorted((found, key) for key in keys if (found := self._index.find(key)) is not None)
    out = {}
    with open(self.path, "rb") as f:
      for (offset, length, number), key in where:
        f.seek(offset)
        try:
          row = json.loads(f.read(length))
        except ValueError:
          row = None
        if not isinstance(row, dict) or row.get("key") != key:
          raise ValueError(f"{self.path}:{number}: this line no longer holds the row of key {key!r} that "
                           f"{self.path + INDEX_SUFFIX} names (the log was edited); delete the index to rebuild it")
        out[key] = row
    return out

  def append(self, rows: Iterable[dict[str, Any]]):
    """Writes the rows whose key is new (a row already in the log is skipped: a batch half-written by a killed run
    is recomputed whole), fsyncs them, then indexes them; two rows with one key in `rows` raise ValueError."""
    rows = list(rows)
    twice = sorted(k for k, n in collections.Counter(row["key"] for row in rows).items() if n > 1)
    if twice:
      raise ValueError(f"{self.path}: append got two rows for key(s) {twice}")
    new = [row for row in rows if not self.done(row["key"])]
    if not new:
      return
    if self._file is None:
      self._file = open(self.path, "ab")
      self._sync()
    state = self._index.state()
    lines, data = [], []
    offset = state.size
    for number, row in enumerate(new, state.lines + 1):
      data.append(json.dumps(row, sort_keys=True).encode())
      lines.append(_Line(row, offset, len(data[-1]), number))
      offset += len(data[-1]) + 1
    self._file.write(b"".join(d + b"\n" for d in data))
    self._file.flush()
    os.fsync(self._file.fileno())
    info = os.fstat(self._file.fileno())    # st_size is `offset`: nobody else appends while we hold the lock
    with self._index.transaction():
      self._index.insert(self.path, lines)
      self._index.save_state(_State(info.st_size, info.st_mtime_ns, info.st_ino, lines[-1].number, lines[-1].offset,
                                    lines[-1].length, hashlib.sha1(data[-1]).hexdigest()))

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._index is not None:
      self._index.close()
      self._index = None
    self._lock.release()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
