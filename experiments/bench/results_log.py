r"""Open time and memory of the results log (`experiments.runner.results.ResultsLog`) against the rows it holds.

    python -m experiments.bench.results_log --rows=1000000 --dir=/tmp/results_bench      # BUILD.md's numbers
    python -m experiments.bench.results_log --rows=200000 --baseline_repo=/path/to/older/checkout
    python -m experiments.bench.results_log --smoke                                      # 2,000 rows (tests)

Writes --rows rows shaped like a LLaVA-NeXT benchmark row (a 10-character run hash, a run name, the question,
prompt, prediction, parsed answer and target, kept and processed tokens for 32 layers, FLOPs, time, KL and dNLL:
about 1.4 KB of JSON each) through `ResultsLog.append`, --batch rows at a time (a batch of a run, fsync'ed), then
opens the log in a fresh process (so its peak RSS is the open's own) in three states:

  indexed    the index matches the log: a resume after a clean exit
  tail       --batch rows appended behind the index's back: a resume after kill -9 between the rows' fsync and the
             index's commit (the open indexes them)
  rebuilt    no index: the first open of a log written before the index existed, or after the index was deleted

For each it reports the open's wall time, the process's peak RSS and its growth over the imports (VmHWM), the
time of `done` on --lookups keys (half of them in the log) and of reading 1,000 rows by key (what a report reads).
--baseline_repo measures another checkout's ResultsLog on the same log (its open and `done`; e.g. the commit before
the index, which read every row into memory). Rows go to --output (JSONL) and a markdown table to stdout.
"""

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments.runner import results

__all__ = ["row", "write", "measure", "run", "table"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAYERS = 32
_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the human's questions. USER: <image>\nIs there a {thing} in the image?\n"
           "Answer the question using a single word or phrase. ASSISTANT:")


def _define_flags():
  flags.DEFINE_integer("rows", 1_000_000, "Rows written.")
  flags.DEFINE_integer("batch", 250, "Rows per append (one fsync and one index transaction each).")
  flags.DEFINE_integer("lookups", 10_000, "Keys looked up with `done` (half of them in the log).")
  flags.DEFINE_string("dir", None, "Where the log is written (default: a temporary folder, removed after).")
  flags.DEFINE_string("baseline_repo", None, "Another checkout whose ResultsLog is measured on the same log.")
  flags.DEFINE_string("output", None, "JSONL file for the rows.")
  flags.DEFINE_bool("smoke", False, "2,000 rows in batches of 100, 500 lookups (for the tests).")


def row(i: int) -> dict[str, Any]:
  """The i-th synthetic row: a benchmark row's fields and sizes (31 runs of 8 budgets x methods over questions)."""
  run = ("full", "tops@T=640", "tops@T=320", "divprune@T=640", "fastv@T=160")[i % 5]
  question = f"{100000 + i // 5}"
  kept = [float(2880 - 40 * (layer * (i % 5)) % 2000) for layer in range(_LAYERS)]
  return dict(key=f"{(i % 5) * 1111111111:010d}/{run}/{question}", run=run, method=run.split("@")[0],
              budget=None if run == "full" else int(run.split("=")[1]), keep_ratio=None, task="pope",
              question_id=question, prompt=_PROMPT.format(thing=("dog", "cat", "car")[i % 3]), prediction="Yes",
              answer="yes", target=("yes", "no")[i % 2], meta=dict(category="adversarial"), visual_tokens=2880,
              kept_per_layer=kept, tokens_per_layer=[k + 60.0 for k in kept], prefill_flops=1.23456789e13 + i,
              prefill_ms=123.456789 + i % 97, process="host:12345:2026-12-08T10:00:00.000000",
              kl=0.0123456789 * (i % 7), nll_increase=0.0234567891 * (i % 11))


def write(path: str, rows: int, batch: int) -> dict[str, Any]:
  """Appends `rows` rows `batch` at a time; the time, the rows per second and this process's peak RSS."""
  start = time.perf_counter()
  with results.ResultsLog(path) as log:
    for first in range(0, rows, batch):
      log.append(row(i) for i in range(first, min(first + batch, rows)))
  seconds = time.perf_counter() - start
  return dict(state="write", rows=rows, seconds=seconds, rows_per_s=rows / seconds, log_bytes=os.path.getsize(path),
              index_bytes=os.path.getsize(path + results.INDEX_SUFFIX),
              peak_rss_mb=_peak_rss_mb())


def _peak_rss_mb() -> float:
  """This process image's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork and exec)."""
  with open("/proc/self/status") as f:
    return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024


# Run in a fresh interpreter with the measured checkout first on sys.path: only what both the indexed log and the
# one before it offer (ResultsLog(path), done, close; read where it exists).
_CHILD = r"""
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
from experiments.runner import results
path, keys = sys.argv[2], json.load(open(sys.argv[3]))
rss = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
base = rss()
start = time.perf_counter()
log = results.ResultsLog(path)
out = dict(open_s=time.perf_counter() - start, peak_rss_mb=rss(), open_rss_growth_mb=rss() - base)
start = time.perf_counter()
out["found"] = sum(log.done(k) for k in keys)
out["done_us"] = (time.perf_counter() - start) / len(keys) * 1e6
if hasattr(log, "read"):
  wanted = [k for k in keys if log.done(k)][:1000]
  start = time.perf_counter()
  got = log.read(wanted)
  out["read_1000_s"] = time.perf_counter() - start
  out["read_ok"] = sorted(got) == sorted(wanted) and all(got[k]["key"] == k for k in wanted)
log.close()
print(json.dumps(out))
"""


def measure(path: str, keys: Sequence[str], repo: str = _REPO) -> dict[str, Any]:
  """Opens the log at `path` in a fresh process with `repo`'s ResultsLog and looks `keys` up."""
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(list(keys), f)
  try:
    child = subprocess.run([sys.executable, "-c", _CHILD, repo, path, f.name], capture_output=True, text=True,
                           check=False, cwd="/")
  finally:
    os.remove(f.name)
  if child.returncode:
    raise RuntimeError(f"measuring {path} with {repo} failed:\n{child.stderr}")
  return json.loads(child.stdout)


def run(directory: str, rows: int, batch: int, lookups: int, baseline_repo: str | None = None) -> list[dict]:
  """Writes the log into `directory` and measures it in each state (the module docstring); one dict per state."""
  path = os.path.join(directory, "results.jsonl")
  if os.path.exists(path):
    raise ValueError(f"{path} exists; give an empty --dir")
  draw = random.Random(0)
  keys = [row(i)["key"] for i in draw.sample(range(rows), lookups // 2)]
  keys += [f"absent/{i}" for i in range(lookups - len(keys))]
  out = [write(path, rows, batch)]
  if baseline_repo:
    out.append(dict(measure(path, keys, baseline_repo), state="baseline", rows=rows))
  out.append(dict(measure(path, keys), state="indexed", rows=rows))
  with open(path, "a", encoding="utf-8") as f:        # what a writer killed before its index commit leaves
    f.writelines(json.dumps(row(i), sort_keys=True) + "\n" for i in range(rows, rows + batch))
  out.append(dict(measure(path, keys), state="tail", rows=rows + batch))
  os.remove(path + results.INDEX_SUFFIX)
  out.append(dict(measure(path, keys), state="rebuilt", rows=rows + batch))
  return out


def table(measured: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per state."""
  cell = lambda r, k, f: "-" if r.get(k) is None else format(r[k], f)
  lines = ["| state | rows | open (s) | peak RSS (MB) | RSS growth (MB) | done (us) | read 1,000 (s) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in measured:
    if r["state"] == "write":
      continue
    lines.append(f"| {r['state']} | {r['rows']:,} | {cell(r, 'open_s', '.3f')} | {cell(r, 'peak_rss_mb', '.1f')} | "
                 f"{cell(r, 'open_rss_growth_mb', '.1f')} | {cell(r, 'done_us', '.1f')} | "
                 f"{cell(r, 'read_1000_s', '.3f')} |")
  (w,) = [r for r in measured if r["state"] == "write"]
  lines.append(f"\nwrite: {w['rows']:,} rows in {w['seconds']:.1f} s ({w['rows_per_s']:,.0f} rows/s), log "
               f"{w['log_bytes'] / 1e9:.2f} GB, index {w['index_bytes'] / 1e6:.0f} MB, writer's peak RSS "
               f"{w['peak_rss_mb']:.0f} MB")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  rows, batch, lookups = (2000, 100, 500) if f.smoke else (f.rows, f.batch, f.lookups)
  if f.dir:           # left there to look at
    measured = run(f.dir, rows, batch, lookups, f.baseline_repo)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      measured = run(tmp, rows, batch, lookups, f.baseline_repo)
  if f.output:
    with open(f.output, "w", encoding="utf-8") as out:
      out.writelines(json.dumps(r) + "\n" for r in measured)
  print(table(measured))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
