"""What the runner writes after evaluating a task: its table, plot and kept-token pictures (an in-memory task), or
its metrics table and predictions files (a benchmark), and the benchmarks' summary relative to the full model; and
one invocation's outputs kept together as a set (`Invocation`, manifest.json).

A benchmark's table holds the task's metrics (`Task.score`, the official formulas), means of kept tokens per layer
and FLOPs, the fidelity columns (KL, dNLL; `experiments.runner.evaluate`) and FLOPs / time ratios against the full
run; per run, `predictions/<task>/<run>.jsonl` (`experiments.runner.predictions`: a provenance header, then one object
per question: question_id, prompt, prediction, answer), which `experiments.score` re-scores. An in-memory task's table
and plot are `experiments.analysis.report`'s, its pictures `experiments.analysis.pictures`'. Every summary ends with
a `provenance: {...}` line (`provenance`): the invocation, the task and every setting hashed into its rows
(protocol, template, resolution, limit, checkpoint and its fingerprint, the snapshot and its fingerprint, ...).

One invocation's outputs are a set. At start (`Invocation.start`: process 0, holding the directory's lock, once the
configuration has resolved) the previous invocation's outputs (`OUTPUTS`: summary_*.md, relative_accuracy_*.png,
kept_tokens.png, predictions/) are removed, and manifest.json says "running"; after each task the manifest lists the
task's provenance and the files written so far; at the end it says "complete", or "failed" with the error. So a
summary never sits beside another invocation's: a run that fails or is killed on a later task leaves its own earlier
tasks' outputs and a manifest saying it did not finish ("running" with a dead pid after kill -9). The manifest is
written atomically; results.jsonl and its index are never removed (every row stays for resume).
"""

import datetime
import glob
import json
import os
import shutil
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from experiments.benchmarks import base
from experiments.runner import predictions
from experiments.runner import results
from experiments.runner.plan import RunSpec
from experiments.runner.tasks import TaskRun

__all__ = ["write_task", "compiled_line", "relative_summary", "task_summary", "format_summary", "write_predictions", "provenance",
           "Invocation", "MANIFEST", "OUTPUTS"]

MANIFEST = "manifest.json"
OUTPUTS = ("summary_*.md", "relative_accuracy_*.png", "kept_tokens.png", "predictions")


def provenance(job: TaskRun, hashes: Mapping[str, str], invocation: str) -> dict[str, Any]:
  """What a task's outputs record: the invocation, the task, its snapshot folder (benchmarks), every setting hashed
  into its rows (`TaskRun.settings`) and each run's hash (the first part of its rows' keys)."""
  return dict(job.settings, invocation=invocation, task=job.name, data_path=job.directory, run_hashes=dict(hashes))


def _provenance_line(record: Mapping[str, Any]) -> str:
  return "provenance: " + json.dumps(record, sort_keys=True, ensure_ascii=False)


def _write_text(path: str, text: str):
  results.write_atomically(path, [text])


def write_task(job: TaskRun, runs: Sequence[RunSpec], rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
               out_dir: str, *, model=None, pictured: Sequence[base.Example] = (), pictured_target: int | None = None,
               protocol: str | None = None, template: str | None = None, expected: int | None = None,
               record: Mapping[str, Any] | None = None,
               compiled: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
  """Prints and writes the task's outputs into `out_dir`; returns a benchmark's metrics by run name ({} for an
  in-memory task). pictured: the examples kept_tokens.png shows (in-memory tasks), for the runs at
  `pictured_target` and the full one. expected: the judge file's expected question count (MM-Vet; None: any).
  record: the task's `provenance`, ending its summary and heading each predictions file. compiled: what the task
  compiled (`evaluate.evaluate_task`): a benchmark's summary states its visual-token buckets and programs."""
  record = dict(record or {})
  if job.benchmark is None:
    _write_report(job, runs, rows_by_run, out_dir, model, pictured, pictured_target, record)
    return {}
  task = job.benchmark
  entries = task_summary(task, rows_by_run, runs, protocol)
  table = format_summary(task, entries)
  if compiled:
    table += "\n" + compiled_line(compiled)
  print(f"\n{job.name} (protocol {protocol}, template {template}, images {job.aspect})\n{table}", flush=True)
  _write_text(os.path.join(out_dir, f"summary_{job.name}.md"), f"{table}\n\n{_provenance_line(record)}\n")
  write_predictions(out_dir, job.name, rows_by_run, record)
  if task.judged:      # MM-Vet: the judge scripts' input, one file per run
    from experiments.benchmarks import mmvet  # pylint: disable=g-import-not-at-top
    for run_name, run_rows in rows_by_run.items():
      mmvet.write_judge_file(run_rows, os.path.join(out_dir, "predictions", job.name, f"{run_name}.judge.json"),
                             expected=expected)
  return {e["run"]: e["metrics"] for e in entries}


def compiled_line(compiled: Mapping[str, Any]) -> str:
  """One line: the visual tokens per image the batches were padded to (examples at each) and the programs compiled."""
  buckets = ", ".join(f"{n} ({k} ex.)" for n, k in sorted(compiled.get("visual_buckets", {}).items()))
  return (f"Compiled: visual tokens per image {buckets or '-'}; {len(compiled.get('shapes', []))} batch shape(s) "
          f"[B, S, text bound, visual tokens] {compiled.get('shapes', [])}; {compiled.get('programs', 0)} prefill "
          "program(s) (runs x shapes; resumed batches compile none).")


def _write_report(job, runs, rows_by_run, out_dir, model, pictured, pictured_target, record):
  from experiments.analysis import report  # pylint: disable=g-import-not-at-top
  rows = [row for spec in runs for row in rows_by_run[spec.name]]
  summary = report.summary(rows)
  table = report.format_table(summary)
  print(f"\n{job.name} ({len(job.examples)} examples; relative accuracy: (a) ratio of mean scores, (b) mean of "
        f"per-family ratios)\n{table}", flush=True)
  _write_text(os.path.join(out_dir, f"summary_{job.name}.md"),
              f"{report.to_markdown(summary)}\n\n{_provenance_line(record)}\n")
  report.plot(summary, os.path.join(out_dir, f"relative_accuracy_{job.name}.png"))
  if pictured:
    shown = [r for r in runs if r.target is None or r.target == pictured_target]
    _picture(model, shown, pictured, rows, out_dir)


def _picture(model, specs: Sequence[RunSpec], examples: Sequence[base.Example], rows, out_dir: str):
  """kept_tokens.png: for a few examples, the image area each method's Stage I (or first step) kept, read from the
  `kept_slots` their rows recorded."""
  from experiments.analysis import pictures  # pylint: disable=g-import-not-at-top
  by_key = {(r["run"], r["example_id"]): r for r in rows}
  masks, titles = [], []
  for spec in specs:
    row_masks = []
    for ex in examples:
      h, w = ex.image.shape[:2]
      row = by_key[(spec.name, ex.question_id)]
      slots = row.get("kept_slots")
      if slots is None:       # the full model keeps everything
        if "kept_slots" not in row and spec.target is not None:
          logging.warning("kept_tokens.png: the row of %s for %s predates recorded kept slots; shown unshaded",
                          spec.name, ex.question_id)
        row_masks.append(np.ones((h, w), bool))
        continue
      layout = model.layout(np.array([[h, w]]), 1)
      row_masks.append(pictures.kept_mask((h, w), pictures.slot_boxes((h, w), layout, 0, model.config), slots))
    masks.append(row_masks)
    titles.append(spec.name)
  pictures.kept_picture([ex.image for ex in examples], masks, titles, os.path.join(out_dir, "kept_tokens.png"))


def relative_summary(runs: Sequence[RunSpec], scores: Mapping[str, Mapping[str, Mapping[str, float]]], out_dir: str,
                     records: Mapping[str, Mapping[str, Any]] | None = None):
  """summary_benchmarks.md: each pruned run's two relative-% summaries against the full model over the benchmark
  tasks of this invocation (`experiments.benchmarks.summary`). scores: task -> run name -> metrics; records: task ->
  its `provenance` (the file's last line lists them)."""
  from experiments.benchmarks import summary  # pylint: disable=g-import-not-at-top
  full = {task: by_run[runs[0].name] for task, by_run in scores.items() if runs[0].name in by_run}
  lines = []
  for spec in runs[1:]:
    run_scores = {task: by_run[spec.name] for task, by_run in scores.items() if spec.name in by_run}
    lines.append(summary.format_relative(spec.name, summary.relative(full, run_scores)))
  text = "\n\n".join(lines)
  print("\nrelative to the full model\n" + text, flush=True)
  records = {task: record for task, record in (records or {}).items() if task in scores}
  _write_text(os.path.join(out_dir, "summary_benchmarks.md"), f"{text}\n\n{_provenance_line(records)}\n")


def task_summary(task: base.Task, rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
                 runs: Sequence[RunSpec], protocol: str) -> list[dict[str, Any]]:
  """One entry per run: the task's metrics (`Task.score`), means of kept tokens per layer, FLOPs, KL and NLL
  increase, and FLOPs / time ratios against the full run over the shared questions."""
  full = {r["question_id"]: r for r in rows_by_run.get(runs[0].name, [])}
  entries = []
  for spec in runs:
    rows = rows_by_run[spec.name]
    if not rows:
      continue
    shared = [r for r in rows if r["question_id"] in full]
    ratio = lambda field: (sum(r[field] for r in shared) / sum(full[r["question_id"]][field] for r in shared)
                           if shared and sum(full[r["question_id"]][field] for r in shared) > 0 else None)
    entries.append(dict(
        run=spec.name, method=spec.label, budget=spec.target, n=len(rows), metrics=task.score(rows, protocol),
        kept_per_layer=float(np.mean([np.mean(r["kept_per_layer"]) for r in rows])),
        prefill_flops=float(np.mean([r["prefill_flops"] for r in rows])),
        kl=float(np.mean([r["kl"] for r in rows])), nll_increase=float(np.mean([r["nll_increase"] for r in rows])),
        flops_ratio=ratio("prefill_flops"), time_ratio=ratio("prefill_ms"),
        processes=len({r["process"] for r in rows})))
  return entries


def format_summary(task: base.Task, entries: Sequence[Mapping[str, Any]]) -> str:
  """The task's markdown table: run, T (the target), n, every metric, kept/layer, GFLOPs, flops and time ratios, KL,
  dNLL."""
  names = sorted({k for e in entries for k in e["metrics"]})
  cell = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  head = ["method", "T", "n", *names, "kept/layer", "GFLOPs", "flops", "time", "KL", "dNLL"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in entries:
    time_cell = cell(e["time_ratio"]) + ("*" if e["processes"] > 1 else "")
    lines.append("| " + " | ".join([e["method"], "-" if e["budget"] is None else str(e["budget"]), str(e["n"]),
                                    *(cell(e["metrics"].get(k)) for k in names), f"{e['kept_per_layer']:.1f}",
                                    f"{e['prefill_flops'] / 1e9:.3g}", cell(e["flops_ratio"]), time_cell,
                                    f"{e['kl']:.4g}", f"{e['nll_increase']:.4g}"]) + " |")
  note = (f"\n{task.name} ({task.repo}): metrics from the official code's formulas; KL = KL(full || pruned) of the "
          "next-token distribution at the answer position, dNLL = increase of the full model's answer NLL; "
          "flops, time: prefill FLOPs and time / full's; * = timings from several runner processes.")
  if task.judged:
    note += " No local metric exists for this task (an LLM judge scores it): the predictions files are its output."
  return "\n".join(lines) + "\n" + note


def write_predictions(directory: str, task: str, rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
                      record: Mapping[str, Any] | None = None) -> list[str]:
  """predictions/<task>/<run>.jsonl per run (`experiments.runner.predictions`: the header, the task's `provenance`
  with the run's name and hash, then question_id, prompt, prediction = the raw generation cut at the stop strings,
  answer = the parsed one), written atomically; `experiments.score` re-scores such a file."""
  record = dict(record or {}, task=task)
  hashes = record.pop("run_hashes", {})
  paths = []
  for run, rows in rows_by_run.items():
    path = os.path.join(directory, "predictions", task, run.replace("/", "_") + ".jsonl")
    predictions.write(path, dict(record, run=run, run_hash=hashes.get(run)), rows)
    paths.append(path)
  return paths


class Invocation:
  """One invocation's outputs in `out_dir` as a set, recorded in manifest.json (the module docstring says how).
  name: the invocation (its rows' `process`); configuration: the resolved configuration it runs."""

  def __init__(self, out_dir: str, name: str, configuration: Mapping[str, Any]):
    self.out_dir = out_dir
    self.record: dict[str, Any] = dict(invocation=name, status="running", started=_now(), finished=None,
                                       configuration=dict(configuration), tasks={}, compiled={}, files=[])

  @property
  def name(self) -> str:
    return self.record["invocation"]

  def _outputs(self) -> list[str]:
    return sorted(path for pattern in OUTPUTS for path in glob.glob(os.path.join(self.out_dir, pattern)))

  def start(self):
    """Removes the previous invocation's outputs and writes the manifest ("running")."""
    for path in self._outputs():
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    self._write()

  def task_done(self, task: str, record: Mapping[str, Any], compiled: Mapping[str, Any] | None = None):
    """Records a finished task's provenance, what it compiled (visual-token buckets, batch shapes, programs:
    `evaluate.evaluate_task`) and the files written so far."""
    self.record["tasks"][task] = dict(record)
    self.record["compiled"][task] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (compiled or {}).items()}
    self._write()

  def finish(self, error: BaseException | None = None):
    """The manifest's last state: "complete", or "failed" with the error."""
    self.record.update(status="complete" if error is None else "failed", finished=_now())
    if error is not None:
      self.record["error"] = f"{type(error).__name__}: {error}"
    self._write()

  def _write(self):
    files = []
    for path in self._outputs():
      walked = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names] if os.path.isdir(path) else [path]
      files += sorted(os.path.relpath(p, self.out_dir) for p in walked)
    self.record["files"] = files
    _write_text(os.path.join(self.out_dir, MANIFEST), json.dumps(self.record, indent=2, sort_keys=True) + "\n")


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")
