r"""Re-scores a predictions file without the model: the task's metrics as one JSON object.

    python -m experiments.score --predictions=runs/x/predictions/pope/full.jsonl     # a file the runner wrote
    python -m experiments.score --task=mme --data_dir=/data/MME --predictions=old.jsonl --protocol=llava

A file the runner wrote starts with its provenance header (`experiments.runner.predictions`): the task, the protocol
and the snapshot folder are taken from it, and the snapshot's fingerprint (its files' names, sizes and mtimes) must
be the one the predictions were made on. A flag that is given must agree with the header: --task or --protocol
naming another value is an error naming both; --data_dir may name another folder (a copy), but a snapshot whose
fingerprint differs is an error naming both fingerprints unless --nocheck_data (a re-downloaded or copied snapshot,
on the user's word). A file without the header (written before it existed, or by another tool) is scored with
--task, --data_dir and --protocol, which it then needs: no protocol is assumed, because the runner's default differs
per backbone (llava for LLaVA-1.5, lmms_eval for LLaVA-NeXT) and the two score the same generations differently.

The predictions are one JSON object per line with "question_id" and "prediction" (the raw generation; extra fields
such as the runner's "prompt" and "answer" are ignored). `question_id` is the task's own (`Task.id_source`): the
dataset's unique id column where it has one, else the row's position in the split in shard order. The targets are
read from the snapshot without its images. The printed keys are the ones the runner's summary tables show. Bad input
raises naming the file and line: malformed JSON, a missing field, an id twice, an id the split does not have;
questions without a prediction are counted ("missing") and the metrics are over the predicted ones.
"""

import json
import sys
from typing import Any, Mapping, NamedTuple

from absl import app
from absl import flags

from experiments.benchmarks import base
from experiments.benchmarks import registry
from experiments.runner import predictions as predictions_lib
from experiments.runner.fingerprints import fingerprint

__all__ = ["read_predictions", "score", "Target", "target"]

read_predictions = predictions_lib.read_predictions


def _define_flags():
  """The CLI's flags, defined only when it runs (importing `score` and `run` in one process must not clash)."""
  flags.DEFINE_string("task", None, "Benchmark task name (experiments.benchmarks.registry; default: the file's).")
  flags.DEFINE_string("data_dir", None, "The task's dataset snapshot (e.g. ROOT/POPE; default: the file's).")
  flags.DEFINE_string("predictions", None, "JSONL of {\"question_id\", \"prediction\"} rows.")
  flags.DEFINE_enum("protocol", None, list(base.PROTOCOLS), "Parser and metric protocol (default: the file's).")
  flags.DEFINE_bool("check_data", True, "Require the snapshot's fingerprint to be the one the file records.")


class Target(NamedTuple):
  """What a predictions file is scored against."""
  task: str
  data_dir: str
  protocol: str


def target(path: str, header: Mapping[str, Any] | None, task: str | None = None, data_dir: str | None = None,
           protocol: str | None = None, check_data: bool = True) -> Target:
  """The task, snapshot and protocol to score the file at `path` with: its header's, checked against the flags
  given (None: not given). ValueError naming both values when a flag disagrees with the header, naming both
  fingerprints when the snapshot is not the recorded one, naming the flags a file without a header needs."""
  if header is None:
    missing = [f"--{name}" for name, value in (("task", task), ("data_dir", data_dir), ("protocol", protocol))
               if not value]
    if missing:
      raise ValueError(f"{path} has no provenance header (a file written before the runner recorded one, or by "
                       f"another tool): pass {', '.join(missing)} (the run's protocol: llava for LLaVA-1.5, "
                       "lmms_eval for LLaVA-NeXT unless --protocol was given)")
    return Target(task, data_dir, protocol)
  for name, value in (("task", task), ("protocol", protocol)):
    if value is not None and value != header.get(name):
      raise ValueError(f"--{name}={value} disagrees with {path}, whose provenance header records {name} "
                       f"{header.get(name)!r}; drop --{name} or score the file it belongs to")
  directory = data_dir or header.get("data_path")
  if not directory:
    raise ValueError(f"{path}'s provenance header names no snapshot folder: pass --data_dir")
  if check_data:
    if header.get("task") not in registry.TASKS:
      raise ValueError(f"{path}'s provenance header names the task {header.get('task')!r}, which is not a benchmark "
                       f"task ({', '.join(registry.TASKS)})")
    got, want = registry.TASKS[header["task"]].fingerprint(directory), header.get("data_fingerprint")
    if got != want:
      raise ValueError(f"the snapshot in {directory} has fingerprint {got}, but {path} was made on one with "
                       f"fingerprint {want} ({header.get('data_path')}): its files changed, or it was re-downloaded "
                       "or copied without their mtimes; pass --nocheck_data to score against it anyway")
  return Target(header["task"], directory, header["protocol"])


def score(task: base.Task, data_dir: str, predictions: dict[str, str], protocol: str) -> dict[str, float]:
  """The task's metrics over the predicted questions, plus "scored" and "missing" counts."""
  rows, known = [], set()
  for ex in task.examples(data_dir, protocol, False):
    known.add(ex.question_id)
    if ex.question_id in predictions:
      rows.append(dict(question_id=ex.question_id, prediction=predictions[ex.question_id], target=ex.target,
                       meta=dict(ex.meta), answer=task.parse(predictions[ex.question_id], ex.meta, protocol)))
  unknown = sorted(set(predictions) - known)
  if unknown:
    raise ValueError(f"{len(unknown)} question_id(s) are not in {task.name}'s split, e.g. {unknown[:3]}")
  if not rows:
    raise ValueError(f"no prediction matches a question of {task.name}")
  metrics = dict(task.score(rows, protocol))
  metrics.update(scored=float(len(rows)), missing=float(len(known) - len(rows)))
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
  value = lambda name: flags.FLAGS[name].value
  path = value("predictions")
  if not path:
    raise app.UsageError("--predictions is required")
  try:
    scored = target(path, predictions_lib.read_header(path), value("task"), value("data_dir"), value("protocol"),
                    value("check_data"))
    if scored.task not in registry.TASKS:
      raise ValueError(f"--task: unknown task {scored.task!r}; known: {', '.join(registry.TASKS)}")
    metrics = score(registry.TASKS[scored.task], scored.data_dir, read_predictions(path), scored.protocol)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from None
  json.dump(metrics, sys.stdout, sort_keys=True)
  sys.stdout.write("\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
