"""Fingerprints of the files a result depends on (a checkpoint, CDPruner's CLIP checkpoint, a dataset snapshot):
hashed into row keys (`experiments.runner.plan.run_hash_fields`), recorded in every output's provenance and checked
by `experiments.score`. Standard library only, so the re-scoring tool loads no model code."""

import hashlib
import json
import os

__all__ = ["fingerprint", "of_files"]


def of_files(root: str, files) -> str:
  """Name (path relative to `root`), size and mtime of `files`, hashed; cheap (no file is read), unlike hashing
  contents: a file edited or re-downloaded in place changes it, and so does a copy."""
  entries = [(os.path.relpath(path, root), info.st_size, info.st_mtime_ns)
             for path, info in ((path, os.stat(path)) for path in sorted(files))]
  return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:10]


def fingerprint(directory: str) -> str:
  """A checkpoint's fingerprint (`of_files` over its top-level files, notes *.md left out): a checkpoint retrained
  in place (the testbed's training writes the default directory) must not reuse the old weights' rows. A benchmark
  snapshot's is its task's (`experiments.benchmarks.base.Task.fingerprint`: the data files it reads only)."""
  return of_files(directory, [os.path.join(directory, name) for name in os.listdir(directory)
                              if os.path.isfile(os.path.join(directory, name)) and not name.endswith(".md")])

