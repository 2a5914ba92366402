"""Tests for experiments.runner.results: what each kind of damage on disk gets, the atomic repair and the directory
lock."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

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
    assert [r["value"] for r in log.rows] == [0, 1, 2] and not log.done("h/r/e3")
    log.append([dict(key="h/r/e3", value=3)])
  assert [json.loads(line)["value"] for line in open(path)] == [0, 1, 2, 3]
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o640          # the renamed repair keeps the log's mode
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_last_row_without_newline_is_not_glued_to_the_next(tmp_path):
  path = str(tmp_path / "results.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(_rows(2)))  # killed between a row and its newline
  with results.ResultsLog(path) as log:
    log.append([dict(key="h/r/e2", value=2)])
  assert [json.loads(line)["value"] for line in open(path)] == [0, 1, 2]


def test_a_repair_that_cannot_be_written_loses_nothing(tmp_path):
  """The issue's 350 rows that became 148: the repair's write fails (here: the file size limit, as a full disk)."""
  path = str(tmp_path / "results.jsonl")
  _write(path, _rows(350))
  with open(path, "a") as f:
    f.write('{"key": "torn')
  before = open(path).read()
  limit = len(before) // 2  # room for half the rows: a rewrite in place would keep about 175 of them
  child = _python(f"""
      import resource
      from experiments.runner import results
      resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
      results.ResultsLog({path!r})
  """)
  _, err = child.communicate(timeout=60)
  assert child.returncode != 0 and "File too large" in err, err
  assert open(path).read() == before
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


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
    assert log.rows == []


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
