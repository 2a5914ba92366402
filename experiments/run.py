r"""The experiment runner: evaluate pruning methods x budgets on a backbone and a task, stream results, summarise.

    python -m experiments.run                                   # the embedded default (see below)
    python -m experiments.run --method=tops --keep_ratio=0.111 --limit=200
    python -m experiments.run --backbone=llava_next --checkpoint=/ckpt/llava-v1.6-vicuna-7b-hf \
        --tasks=vqa_jsonl --data_dir=/data/pope --method=tops,divprune --budget=640,320,160 --batch_size=8
    python -m experiments.run --method=tops --ablation               # the TOPS criteria ablation (7 subsets)

With no flags it evaluates the shipped testbed (a small LLaVA-NeXT trained by `experiments.testbed.train`, in
`experiments/testbed_ckpt/`) on the synthetic VQA benchmark's test split with every method at the papers' three
ratios (22.2%, 11.1%, 5.6% of visual tokens kept) plus the full model, and prints a table.

Budgets and what each method does with T: `experiments.runner.plan`. The flags are read once into a frozen
`plan.RunConfig`; `plan.resolve` checks it against the model. Each batch runs one pruned prefill, timed, whose
outputs are scored (`experiments.runner.evaluate`); tasks are in `experiments.runner.tasks`.

Output (`--output_dir`, default runs/<backbone>): results.jsonl (one row per evaluated example, appended and flushed
as it goes; an interrupted run resumes where it stopped: every finished row is skipped, nothing recomputed), then
summary.md (the table), relative_accuracy.png (relative accuracy vs kept fraction) and kept_tokens.png (which tokens
each method kept on a few examples, from the slots recorded in their rows: no second pass).

A row is reused only by a run that would compute the same row: its key holds a hash of every setting that changes
numbers (`evaluate.run_hash`: checkpoint and its file stamps, task, data, seed, --max_new_tokens, --batch_size, the
pruning configuration) and a hash of the example's question, answer and image. The table holds exactly the rows of
this invocation's runs x examples (a smaller --limit shows a smaller table), and marks a time ratio that mixes timings
of several runner processes. A run locks its output_dir: a second run into it fails at once, naming the holder.
"""


import contextlib
import datetime
import json
import os
import socket
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments.runner import evaluate
from experiments.runner import hosts as hosts_lib
from experiments.runner import plan
from experiments.runner import results as results_lib
from experiments.runner import tasks as tasks_lib
from experiments.synthvqa import vqa

assert set(tasks_lib.TASKS) == set(plan.IN_MEMORY_TASKS), "plan.IN_MEMORY_TASKS must name every in-memory task"

flags.DEFINE_enum("backbone", "testbed", list(plan.BACKBONES), "Model family.")
flags.DEFINE_string("checkpoint", None, "Local Hugging Face checkpoint directory "
                    "(default for testbed: the shipped experiments/testbed_ckpt).")
flags.DEFINE_list("method", ["all"], "Methods to evaluate ('all' = every method of tops_jax.prune.METHODS); "
                  "the full model is always evaluated too, as the reference.")
flags.DEFINE_list("budget", None, "Visual tokens kept per image, T (exclusive with --keep_ratio).")
flags.DEFINE_list("keep_ratio", None, "Kept fractions of the backbone's nominal visual-token count "
                  "(default 0.222,0.111,0.056 when --budget is not given).")
flags.DEFINE_list("tasks", ["synthvqa"], "Tasks: synthvqa (the procedural benchmark), vqa_jsonl (data_dir).")
flags.DEFINE_string("data_dir", None, "synthvqa: a directory written by vqa.write_split (else the split "
                    "is generated from --seed); vqa_jsonl: a directory with questions.jsonl.")
flags.DEFINE_enum("split", "test", list(vqa.SPLITS), "Benchmark split for synthvqa.")
flags.DEFINE_integer("limit", 400, "Examples per task (0 = all of a data_dir task).")
flags.DEFINE_integer("batch_size", 25, "Examples per batch.")
flags.DEFINE_string("output_dir", None, "Where results go (default runs/<backbone>).")
flags.DEFINE_integer("seed", 0, "Seed of generated data and of random methods.")
flags.DEFINE_float("alpha", None, "Diversity weight (tops Stage I; tops default 0.5).")
flags.DEFINE_float("lam", None, "Coverage weight (tops Stage I; tops default 0.5).")
flags.DEFINE_float("stage2_alpha", None, "tops Stage II alpha (default: the paper's per model).")
flags.DEFINE_float("stage2_lam", None, "tops Stage II lambda (default: the paper's per model).")
flags.DEFINE_enum("normalize", None, ["mean", "minmax"], "tops criterion normalisation.")
flags.DEFINE_bool("ablation", False, "Run the TOPS criteria ablation: all 7 non-empty subsets of "
                  "relevance/diversity/coverage (needs --method=tops).")
flags.DEFINE_integer("max_new_tokens", None, "Answer length limit (default per backbone).")
flags.DEFINE_integer("pictures", 3, "Examples shown in kept_tokens.png (0 = none).")
flags.DEFINE_enum("protocol", None, ["llava", "lmms_eval"], "Benchmark protocol: the LLaVA repository's eval scripts or "
                  "lmms-eval's task code (default per backbone: llava for llava_1_5, lmms_eval for llava_next).")
flags.DEFINE_string("conv_template", None, "Benchmark prompts' conversation template: vicuna_v1, mistral_instruct, "
                    "chat_template (the checkpoint's), plain (default: the checkpoint's decoder decides).")
flags.DEFINE_list("overrides", None, "Named variants of the methods' official protocols, method.name=value (e.g. "
                  "divprune.scope=global, cdpruner.newlines=drop, dart.dart_count=exact); see "
                  "models/pruning/protocols.py for each method's names and why they exist.")
flags.DEFINE_string("clip_checkpoint", None, "Local CLIP checkpoint directory (e.g. a copy of "
                    "openai/clip-vit-large-patch14-336) whose text tower gives CDPruner's relevance.")
flags.DEFINE_string("mesh", None, "Device mesh, axis:size over the axes data, fsdp, tensor (e.g. data:8, "
                    "data:2,fsdp:2,tensor:2; one size may be -1: the devices left over); the sizes multiply to the "
                    "device count of all processes. Default: one device (several processes: data:-1).")
flags.DEFINE_bool("distributed", False, "Join the other hosts with jax.distributed.initialize() discovering the "
                  "cluster (Cloud TPU slices, Slurm, Kubernetes); every host runs the same command.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator, for an explicit "
                    "multi-process launch (with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Processes of an explicit multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's index in an explicit multi-process launch.")
flags.DEFINE_enum("resolution", "native", ["native", "fixed_672"], "LLaVA-NeXT benchmark images: native size, or "
                  "resized to the paper's fixed 672 x 672 (2,880 visual tokens before unpadding).")


def _load(backbone: plan.Backbone, backbone_name: str, checkpoint: str, mesh=None):
  import models  # pylint: disable=g-import-not-at-top
  from transformers import AutoProcessor  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    raise ValueError(f"--checkpoint {checkpoint!r} is not a directory")
  model = models.load_pretrained(checkpoint, mesh=mesh)      # with a mesh: each device reads its own shards
  with open(os.path.join(checkpoint, "config.json")) as f:
    model_type = json.load(f).get("model_type")
  if model_type != backbone.model_type:
    raise ValueError(f"--backbone={backbone_name} expects a {backbone.model_type} checkpoint; {checkpoint} is "
                     f"{model_type}")
  if backbone_name == "testbed":
    from experiments import testbed  # pylint: disable=g-import-not-at-top
    processor = testbed.make_processor(testbed.hf_from_model(model), directory=checkpoint)
  else:
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
  return model, processor


def _picture(model, specs, items, rows, out_dir):
  """kept_tokens.png: for a few examples, the image area each method's Stage I (or first step) kept, read from the
  `kept_slots` their rows recorded."""
  from experiments.analysis import pictures  # pylint: disable=g-import-not-at-top
  by_key = {(r["run"], r["example_id"]): r for r in rows}
  masks, titles = [], []
  for spec in specs:
    row_masks = []
    for it in items:
      h, w = it.image.shape[:2]
      row = by_key[(spec.name, it.example_id)]
      slots = row.get("kept_slots")
      if slots is None:       # the full model keeps everything
        if "kept_slots" not in row and spec.budget is not None:
          logging.warning("kept_tokens.png: the row of %s for %s predates recorded kept slots; shown unshaded",
                          spec.name, it.example_id)
        row_masks.append(np.ones((h, w), bool))
        continue
      layout = model.layout(np.array([[h, w]]), 1)
      row_masks.append(pictures.kept_mask((h, w), pictures.slot_boxes((h, w), layout, 0, model.config), slots))
    masks.append(row_masks)
    titles.append(spec.name)
  pictures.kept_picture([it.image for it in items], masks, titles, os.path.join(out_dir, "kept_tokens.png"))


def _benchmark(evaluator, backbone, config, resolved, runs, name, settings, log, out_dir, process):
  """One benchmark task: stream, evaluate every run batch-major, then its table and predictions files."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from experiments.runner import benchmark_eval  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  task = registry.TASKS[name]
  protocol = resolved.protocol
  single = sum(t not in plan.IN_MEMORY_TASKS for t in config.tasks) == 1
  directory = benchmark_eval.task_dir(config.data_dir, task, single)
  max_new_tokens = config.max_new_tokens or task.max_new_tokens[protocol]
  aspect = task.image_aspect[protocol] if backbone.square_pad else config.resolution
  bench = benchmark_eval.Settings(protocol=protocol, template=resolved.conv_template, aspect=aspect,
                                  max_new_tokens=max_new_tokens, batch_size=config.batch_size, seed=config.seed,
                                  limit=config.limit)
  fields = dict(settings, max_new_tokens=max_new_tokens, data_fingerprint=_tree_fingerprint(directory))
  hashes = {spec.name: evaluate.run_hash(fields, spec, name, []) for spec in runs}
  total = min(config.limit, task.num_rows) if config.limit and task.num_rows else (config.limit or task.num_rows)
  with tqdm(total=None if total is None else total * len(runs), desc=name, unit="ex", file=sys.stderr,
            disable=not evaluator.hosts.writer) as progress:
    benchmark_eval.evaluate_task(evaluator, runs, task, task.examples(directory, protocol, True), log, hashes, bench,
                                 progress, process)
  if not evaluator.hosts.writer:
    return {}
  rows = benchmark_eval.task_rows(log, runs, hashes, name)
  entries = benchmark_eval.task_summary(task, rows, runs, protocol)
  table = benchmark_eval.format_summary(task, entries)
  print(f"\n{name} (protocol {protocol}, template {resolved.conv_template}, images {aspect})\n{table}", flush=True)
  with open(os.path.join(out_dir, f"summary_{name}.md"), "w") as f:
    f.write(table + "\n")
  benchmark_eval.write_predictions(out_dir, name, rows)
  if task.judged:      # MM-Vet: the judge scripts' input, one file per run
    from experiments.benchmarks import mmvet  # pylint: disable=g-import-not-at-top
    for run_name, run_rows in rows.items():
      mmvet.write_judge_file(run_rows, os.path.join(out_dir, "predictions", name, f"{run_name}.judge.json"),
                             expected=None if config.limit else task.num_rows)
  return {e["run"]: e["metrics"] for e in entries}


def _tree_fingerprint(directory: str) -> str:
  """Relative path, size and mtime of every file under a snapshot, hashed: an edited or re-downloaded snapshot at
  the same path gets new rows (cheap: no file is read)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  entries = []
  for folder, _, names in sorted(os.walk(directory)):
    for name in sorted(names):
      info = os.stat(os.path.join(folder, name))
      entries.append((os.path.relpath(os.path.join(folder, name), directory), info.st_size, info.st_mtime_ns))
  return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:10]


def _relative_summary(runs, scores, out_dir):
  """summary_benchmarks.md: each pruned run's two relative-% summaries against the full model over the benchmark
  tasks of this invocation (`experiments.benchmarks.summary`)."""
  from experiments.benchmarks import summary  # pylint: disable=g-import-not-at-top
  full = {task: by_run[runs[0].name] for task, by_run in scores.items() if runs[0].name in by_run}
  lines = []
  for spec in runs[1:]:
    run_scores = {task: by_run[spec.name] for task, by_run in scores.items() if spec.name in by_run}
    lines.append(summary.format_relative(spec.name, summary.relative(full, run_scores)))
  text = "\n\n".join(lines)
  print("\nrelative to the full model\n" + text, flush=True)
  with open(os.path.join(out_dir, "summary_benchmarks.md"), "w") as f:
    f.write(text + "\n")


def _process_name() -> str:
  """Names this runner invocation in every row it measures (two invocations in one Python process differ too)."""
  return f"{socket.gethostname()}:{os.getpid()}:{datetime.datetime.now().isoformat(timespec='microseconds')}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
  try:
    from experiments import testbed  # pylint: disable=g-import-not-at-top  (the model face: its checkpoint path)
    config = plan.RunConfig.from_flags(flags.FLAGS).with_defaults(lambda: testbed.DEFAULT_CKPT)
    backbone = plan.BACKBONES[config.backbone]
    # Before any use of the devices: join the other processes, build the mesh.
    hosts = hosts_lib.start(config.mesh, distributed=config.distributed, coordinator=config.coordinator_address,
                            num_processes=config.num_processes, process_id=config.process_id)
    hosts.check_batch(config.batch_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with hosts_lib.mesh_context(hosts):       # every program traced in the run sees the mesh
    _main(config, backbone, hosts)


def _main(config: plan.RunConfig, backbone: plan.Backbone, hosts: hosts_lib.Hosts):
  try:
    model, processor = _load(backbone, config.backbone, config.checkpoint, hosts.mesh)
    resolved, runs = plan.resolve(config, model)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if hosts.writer:
    print("resolved configuration:\n" + resolved.to_json(), flush=True)
  logging.info("process %d of %d, mesh %s; runs: %s", hosts.index, hosts.count, hosts.mesh,
               ", ".join(r.name for r in runs))

  out_dir = config.output_dir
  process = _process_name()
  evaluator = evaluate.Evaluator(model, processor, backbone, resolved.max_new_tokens, hosts)
  if config.clip_checkpoint and any(r.config.stage1_relevance == "clip_text" for r in runs):
    from models import clip_text  # pylint: disable=g-import-not-at-top
    try:
      evaluator.clip = clip_text.ClipTextRelevance(config.clip_checkpoint)
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--clip_checkpoint: {e}") from None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from experiments.analysis import report  # pylint: disable=g-import-not-at-top
  # Opening the log locks out_dir for this process (results.DirectoryLock): a second run into it fails here.
  # Only process 0 opens (and locks) the log and writes; the others learn from it what is finished.
  opened = (results_lib.ResultsLog(os.path.join(out_dir, "results.jsonl")) if hosts.writer
            else contextlib.nullcontext(None))
  with opened as log:
    benchmark_scores = {}
    for task in config.tasks:
      settings = plan.run_hash_fields(resolved, task)
      if task not in tasks_lib.TASKS:
        try:
          benchmark_scores[task] = _benchmark(evaluator, backbone, config, resolved, runs, task, settings, log,
                                              out_dir, process)
        except ValueError as e:
          raise app.UsageError(str(e)) from None
        continue
      items = tasks_lib.TASKS[task](config.data_dir, config.split, config.limit, config.seed)
      if not items:
        raise app.UsageError(f"task {task} has no examples")
      batches = evaluate.encode_batches(evaluator, items, config.batch_size)
      try:
        evaluate.check_budgets(runs, batches, task)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      pictured = items[:config.pictures]
      with tqdm(total=len(items) * len(runs), desc=task, unit="ex", file=sys.stderr,
                disable=not hosts.writer) as progress:
        for spec in runs:
          progress.set_postfix_str(spec.name)
          evaluate.evaluate_run(evaluator, spec, batches, log, evaluate.run_hash(settings, spec, task, items),
                                config.seed, progress, process=process,
                                pictured=frozenset(it.example_id for it in pictured))
      if not hosts.writer:
        continue
      rows = evaluate.task_rows(log, settings, runs, task, items)
      summary = report.summary(rows)
      table = report.format_table(summary)
      print(f"\n{task} ({len(items)} examples; relative accuracy: (a) ratio of mean scores, (b) mean of per-family "
            f"ratios)\n{table}", flush=True)
      with open(os.path.join(out_dir, f"summary_{task}.md"), "w") as f:
        f.write(report.to_markdown(summary) + "\n")
      report.plot(summary, os.path.join(out_dir, f"relative_accuracy_{task}.png"))
      if pictured:
        shown = [r for r in runs if r.budget is None or r.budget == min(resolved.budgets)]
        _picture(model, shown, pictured, rows, out_dir)
    if benchmark_scores and len(runs) > 1 and hosts.writer:
      _relative_summary(runs, benchmark_scores, out_dir)
  if not hosts.writer:
    return
  print(f"results: {os.path.join(out_dir, 'results.jsonl')}; table, plot and pictures in {out_dir}")


if __name__ == "__main__":
  app.run(main)
