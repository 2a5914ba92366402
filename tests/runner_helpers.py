"""Running `experiments.run` in-process from a test, and reading what it wrote (a helper module, not a test)."""

import json
import os

from absl import flags

from experiments import run

__all__ = ["run_main", "read_rows"]


def run_main(*args):
  """`python -m experiments.run ARGS` in this process; the flags are reset before and after."""
  argv = ["run"] + list(args)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    run.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()


def read_rows(out_dir: str) -> list[dict]:
  """The rows of `out_dir`/results.jsonl."""
  with open(os.path.join(out_dir, "results.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
