"""Tests for experiments.runner.results: what each kind of damage on disk gets, the in-place repair, the on-disk index
(kept up to its log, rebuilt when stale, the same after kill -9 and resume) and the directory lock."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.runner import results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def _rows(n, start=0):
  return [json.dumps(dict(key=f"h/r/e{i}", value=i, pad="x" * 40)) for i in range(start, start + n)]


def _python(code, **kwargs):
  """A child Python with the repo importable (the lock belongs to a process, so a second holder must be one)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_torn_last_line_is_dropped_and_the_log_resumes(tmp_path):
  path = str(tmp_path / "results.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(_rows(3)) + "\n" + '{"key": "h/r/e3", "val')  # killed mid-write
  os.chmod(path, 0o640)
  with results.ResultsLog(path) as log:
    assert log.count() == 3 and not log.done("h/r/e3")
    assert [r["value"] for r in log.read(["h/r/e2", "h/r/e0", "h/r/e9"]).values()] == [0, 2]   # the log's order
    log.append([dict(key="h/r/e3", value=3)])
  assert [json.loads(line)["value"] for line in open(path)] == [0, 1, 2, 3]
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o640          # repaired in place: the log's mode is kept
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_last_row_without_newline_is_not_glued_to_the_next(tmp_path):
  path = str(tmp_path / "results.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(_rows(2)))  # killed between a row and its newline
  with results.ResultsLog(path) as log:
    log.append([dict(key="h/r/e2", value=2)])
  assert [json.loads(line)["value"] for line in open(path)] == [0, 1, 2]


def test_a_repair_needs_no_room_and_loses_nothing(tmp_path):
  """The issue's 350 rows that became 148 (a repair rewritten in place on a full disk, here the file size limit):
  the torn tail is cut off in place, so no copy is written and every row stays, even when the index itself cannot
  be written then (the open fails naming the index; the next one indexes the log)."""
  path = str(tmp_path / "results.jsonl")
  _write(path, _rows(350))
  good = open(path).read()
  with open(path, "a") as f:
    f.write('{"key": "torn')
  limit = len(good) // 2  # room for half the rows: a rewrite in place would keep about 175 of them
  child = _python(f"""
      import resource
      from experiments.runner import results
      resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
      results.ResultsLog({path!r}).close()
  """)
  _, err = child.communicate(timeout=60)
  assert child.returncode != 0 and "results.jsonl.index: the results index cannot be written" in err, err
  assert open(path).read() == good
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
  with results.ResultsLog(path) as log:
    assert log.count() == 350 and log.done("h/r/e349")


@pytest.mark.parametrize("line, match", [
    ('["h/r/e1", 1]', r"results.jsonl:2: a results line must be a JSON object, got list"),
    ('"just a string"', r"results.jsonl:2: a results line must be a JSON object, got str"),
    ('{"value": 1}', r"results.jsonl:2: results row has no string 'key' \(got None\)"),
    ('{"key": 7}', r"results.jsonl:2: results row has no string 'key' \(got 7\)"),
    ('{"key": "h/r/e0", "value": 9}', r"results.jsonl:2: key 'h/r/e0' is also on line 1: two runs wrote"),
    ('{"key": "h/r/', r"results.jsonl:2: corrupt results line \(not the last one\)"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, match):
  path = str(tmp_path / "results.jsonl")
  _write(path, [_rows(1)[0], line] + _rows(1, start=5))
  before = open(path).read()
  with pytest.raises(ValueError, match=match):
    results.ResultsLog(path)
  with pytest.raises(ValueError, match=match):
    results.read_rows(path)
  assert open(path).read() == before
  with results.DirectoryLock(str(tmp_path)):  # the failed open released its lock
    pass


def test_append_refuses_two_rows_with_one_key(tmp_path):
  with results.ResultsLog(str(tmp_path / "results.jsonl")) as log:
    with pytest.raises(ValueError, match=r"two rows for key\(s\) \['h/r/e1'\]"):
      log.append([dict(key="h/r/e1"), dict(key="h/r/e2"), dict(key="h/r/e1")])
    assert log.count() == 0 and not os.path.exists(log.path)


def test_read_rows_skips_a_torn_line_without_repairing(tmp_path):
  path = str(tmp_path / "results.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(_rows(2)) + "\n{\"key\"")
  before = open(path).read()
  with results.ResultsLog(str(tmp_path / "other" / "results.jsonl")):
    pass
  assert [r["value"] for r in results.read_rows(path)] == [0, 1]
  assert open(path).read() == before


def test_second_writer_fails_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
  path = str(tmp_path / "results.jsonl")
  holder = _python(f"""
      import sys, time
      from experiments.runner import results
      log = results.ResultsLog({path!r})
      print("holding", flush=True)
      time.sleep(120)
  """)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(results.DirectoryLocked, match=rf"in use by pid {holder.pid} on .* \(started "):
      results.ResultsLog(path)
  finally:
    holder.send_signal(signal.SIGKILL)  # dies holding the lock: its .lock file stays behind
    holder.wait(timeout=60)
  assert str(holder.pid) in open(tmp_path / results.LOCK_NAME).read()
  with results.ResultsLog(path):
    note = json.loads(open(tmp_path / results.LOCK_NAME).read())
    assert note["pid"] == os.getpid()
    with pytest.raises(results.DirectoryLocked, match=rf"in use by pid {os.getpid()} on "):  # one process, two writers
      results.ResultsLog(path)
  with results.ResultsLog(path):  # closing released it
    pass


def _index_entries(path):
  """(key, offset, length, line) of every row the index holds, in the log's order."""
  import sqlite3  # pylint: disable=g-import-not-at-top
  db = sqlite3.connect(path + results.INDEX_SUFFIX)
  try:
    return db.execute("SELECT key, offset, length, line FROM rows ORDER BY offset").fetchall()
  finally:
    db.close()


def _log_entries(path):
  """The same, read from the log itself."""
  entries, offset = [], 0
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if raw.strip():
        entries.append((json.loads(raw)["key"], offset, len(raw.rstrip(b"\n")), number))
      offset += len(raw)
  return entries


def test_an_open_with_a_current_index_reads_no_row(tmp_path):
  """A log its index matches is not read on open: a row damaged behind the index's back (same size, its mtime put
  back) is found when it is read, naming the file and line."""
  path = str(tmp_path / "results.jsonl")
  with results.ResultsLog(path) as log:
    log.append([json.loads(r) for r in _rows(5)])
  info = os.stat(path)
  text = open(path).read()
  with open(path, "r+") as f:
    f.write(text.replace('"value": 2', '"value": ?'))
  os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
  with results.ResultsLog(path) as log:
    assert log.count() == 5 and log.done("h/r/e2")
    assert log.read(["h/r/e1"])["h/r/e1"]["value"] == 1
    with pytest.raises(ValueError, match=r"results.jsonl:3: this line no longer holds the row of key 'h/r/e2'"):
      log.read(["h/r/e2"])


def test_the_index_follows_its_log_and_is_rebuilt_when_stale(tmp_path):
  path = str(tmp_path / "results.jsonl")
  index = path + results.INDEX_SUFFIX
  with results.ResultsLog(path) as log:
    log.append([json.loads(r) for r in _rows(4)])
    log.append([json.loads(r) for r in _rows(6, start=4)])
  assert _index_entries(path) == _log_entries(path) and len(_index_entries(path)) == 10
  # Killed between the rows' fsync and the index's commit: the rows after the last indexed one are indexed on open.
  with open(path, "a") as f:
    f.write("\n".join(_rows(3, start=10)) + "\n")
  with results.ResultsLog(path) as log:
    assert log.count() == 13 and log.done("h/r/e12")
  assert _index_entries(path) == _log_entries(path)
  # Missing, or not an index at all: rebuilt from the log.
  os.remove(index)
  with results.ResultsLog(path) as log:
    assert log.count() == 13
  with open(index, "wb") as f:
    f.write(b"not a database" * 100)
  with results.ResultsLog(path) as log:
    assert log.count() == 13 and log.read(["h/r/e12"])["h/r/e12"]["value"] == 12
  assert _index_entries(path) == _log_entries(path)
  # The log rewritten (same size, rows in another order; then another log, shorter): rebuilt, never trusted.
  lines = open(path).read().splitlines()
  _write(path, lines[::-1])
  with results.ResultsLog(path) as log:
    assert log.read(["h/r/e0"])["h/r/e0"]["value"] == 0
  assert _index_entries(path) == _log_entries(path) and _log_entries(path)[0][0] == "h/r/e12"
  _write(path, _rows(2, start=50))
  with results.ResultsLog(path) as log:
    assert log.count() == 2 and not log.done("h/r/e0") and log.done("h/r/e51")
  # A second writer's row after the indexed ones (one key twice) names both lines.
  with open(path, "a") as f:
    f.write(_rows(1, start=50)[0] + "\n")
  with pytest.raises(ValueError, match=r"results.jsonl:3: key 'h/r/e50' is also on line 1"):
    results.ResultsLog(path)


_WRITER = """
    import json, sys
    from experiments.runner import results
    with results.ResultsLog(sys.argv[1]) as log:
      for start in range(0, {n}, {batch}):
        log.append([dict(key=f"h/r/e{{i}}", value=i, pad="x" * (i % 300)) for i in range(start, start + {batch})])
    print("finished", flush=True)
"""


def test_kill_9_and_resume_give_the_same_log_and_index(tmp_path):
  """A writer killed at random moments (mid-row, between a row's fsync and its index commit, mid-repair) and resumed
  each time ends with the bytes and the index of a writer that was never killed."""
  import random  # pylint: disable=g-import-not-at-top
  code = textwrap.dedent(_WRITER.format(n=8000, batch=40))

  def writer(path):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", code, path], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  reference = str(tmp_path / "reference" / "results.jsonl")
  os.makedirs(os.path.dirname(reference))
  out, err = writer(reference).communicate(timeout=300)
  assert out.strip() == "finished", err
  path = str(tmp_path / "killed" / "results.jsonl")
  os.makedirs(os.path.dirname(path))
  size = lambda: os.path.getsize(path) if os.path.exists(path) else 0
  draw, kills = random.Random(0), 0
  # Killed as soon as the log passes each of 8 random points of its final size: wherever the writer then is.
  for fraction in sorted(draw.uniform(0.05, 0.95) for _ in range(8)):
    child = writer(path)
    while child.poll() is None and size() < fraction * os.path.getsize(reference):
      time.sleep(0.0005)
    if child.poll() is None:
      child.send_signal(signal.SIGKILL)
      kills += 1
    child.communicate(timeout=60)
  out, err = writer(path).communicate(timeout=300)
  assert out.strip() == "finished", err
  assert kills >= 4
  assert open(path, "rb").read() == open(reference, "rb").read()
  assert _index_entries(path) == _index_entries(reference) == _log_entries(reference)
