r"""Re-scores a predictions file without the model: the task's metrics as one JSON object.

    python -m experiments.score --task=pope --data_dir=/data/POPE --predictions=runs/x/predictions/pope/full.jsonl
    python -m experiments.score --task=mme --data_dir=/data/MME --predictions=preds.jsonl --protocol=llava

The predictions file holds one JSON object per line with "question_id" and "prediction" (the raw generation; extra
fields such as the runner's "prompt" and "answer" are ignored). `question_id` is the task's own (`Task.id_source`):
the dataset's unique id column where it has one, else the row's position in the split in shard order. The targets
are read from the snapshot in `--data_dir` (the dataset's own folder) without its images. The printed keys are
the ones the runner's summary tables show. Bad input raises naming the file and line: malformed JSON, a missing
field, an id twice, an id the split does not have; questions without a prediction are counted ("missing") and the
metrics are over the predicted ones.
"""

import json
import sys

from absl import app
from absl import flags

from experiments.benchmarks import base
from experiments.benchmarks import registry
from experiments.synthvqa import vqa

__all__ = ["read_predictions", "score"]


def _define_flags():
  """The CLI's flags, defined only when it runs (importing `score` and `run` in one process must not clash)."""
  flags.DEFINE_string("task", None, "Benchmark task name (experiments.benchmarks.registry).")
  flags.DEFINE_string("data_dir", None, "The task's dataset snapshot (e.g. ROOT/POPE).")
  flags.DEFINE_string("predictions", None, "JSONL of {\"question_id\", \"prediction\"} rows.")
  flags.DEFINE_enum("protocol", "lmms_eval", list(base.PROTOCOLS), "Parser and metric protocol.")


def read_predictions(path: str) -> dict[str, str]:
  """question_id -> raw prediction; ValueError naming the file and line for bad rows."""
  out, lines = {}, {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      row = vqa.json_object_line(line, where)
      for field in ("question_id", "prediction"):
        if field not in row:
          raise ValueError(f"{where}: missing field {field!r}")
      if not isinstance(row["prediction"], str):
        raise ValueError(f"{where}: field 'prediction' must be a string, got {json.dumps(row['prediction'])}")
      qid = str(row["question_id"])
      if qid in out:
        raise ValueError(f"{where}: question_id {qid!r} is also on line {lines[qid]}")
      out[qid], lines[qid] = row["prediction"], number
  return out


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
  for name in ("task", "data_dir", "predictions"):
    if not value(name):
      raise app.UsageError(f"--{name} is required")
  if value("task") not in registry.TASKS:
    raise app.UsageError(f"--task: unknown task {value('task')!r}; known: {', '.join(registry.TASKS)}")
  try:
    metrics = score(registry.TASKS[value("task")], value("data_dir"), read_predictions(value("predictions")),
                    value("protocol"))
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from None
  json.dump(metrics, sys.stdout, sort_keys=True)
  sys.stdout.write("\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
