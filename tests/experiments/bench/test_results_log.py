"""The results-log benchmark's smoke run (so the script cannot rot), and that opening a log takes no memory per row
already written."""

import subprocess
import sys

from experiments.bench import results_log


def test_smoke_run_prints_every_state():
  out = subprocess.run([sys.executable, "-m", "experiments.bench.results_log", "--smoke"], capture_output=True,
                       text=True, check=True).stdout
  for state in ("| indexed | 2,000 |", "| tail | 2,100 |", "| rebuilt | 2,100 |", "write: 2,000 rows"):
    assert state in out, out


def test_open_memory_does_not_grow_with_the_rows(tmp_path):
  """30,000 rows (38 MB of JSON; the log before the index read them into dicts: 250 MB more at open): opening the
  indexed log, indexing a tail or rebuilding the index each raise the peak RSS by a few MB at most."""
  measured = {r["state"]: r for r in results_log.run(str(tmp_path), 30_000, 1000, 400)}
  assert measured["write"]["log_bytes"] > 35e6
  for state in ("indexed", "tail", "rebuilt"):
    r = measured[state]
    assert r["found"] == 200 and r["read_ok"], (state, r)
    assert r["open_rss_growth_mb"] < 8, (state, r)
  assert measured["indexed"]["open_s"] < measured["rebuilt"]["open_s"]
