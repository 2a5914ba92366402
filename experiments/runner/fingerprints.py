"""Fingerprints of the files a result depends on (a checkpoint, CDPruner's CLIP checkpoint, a dataset snapshot):
hashed into row keys (`experiments.runner.plan.run_hash_fields`), recorded in every output's provenance and checked
by `experiments.score`. Standard library only, so the re-scoring tool loads no model code."""

import hashlib
import json
import os

__all__ = ["fingerprint"]


def fingerprint(directory: str, *, tree: bool = False) -> str:
  """Name (path relative to `directory`), size and mtime of its files, hashed; cheap (no file is read), unlike
  hashing contents. A checkpoint (tree=False: its top-level files, notes *.md left out) retrained in place (the
  testbed's training writes the default directory) must not reuse the old weights' rows, and a dataset snapshot
  (tree=True: every file under it) edited or re-downloaded at the same path gets new rows; a copy gets a new
  fingerprint and is evaluated afresh."""
  if tree:
    files = [os.path.join(folder, name) for folder, _, names in sorted(os.walk(directory)) for name in sorted(names)]
  else:
    files = [os.path.join(directory, name) for name in sorted(os.listdir(directory))
             if os.path.isfile(os.path.join(directory, name)) and not name.endswith(".md")]
  entries = [(os.path.relpath(path, directory), info.st_size, info.st_mtime_ns)
             for path, info in ((path, os.stat(path)) for path in files)]
  return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:10]

