r"""The experiment runner: evaluate pruning methods x targets on a backbone and a task, stream results, summarise.

    python -m experiments.run                                   # the embedded default (see below)
    python -m experiments.run --method=tops --keep_ratio=0.111 --limit=200
    python -m experiments.run --backbone=llava_next --checkpoint=/ckpt/llava-v1.6-vicuna-7b-hf \
        --tasks=vqa_jsonl --data_dir=/data/pope --method=tops,divprune --budget=640,320,160 --batch_size=8
    python -m experiments.run --method=tops --ablation               # the TOPS criteria ablation (7 subsets)

With no flags it evaluates the shipped testbed (a small LLaVA-NeXT trained by `experiments.testbed.train`, in
`experiments/testbed_ckpt/`) on the synthetic VQA benchmark's test split with every method at the papers' three
ratios (22.2%, 11.1%, 5.6% of visual tokens kept) plus the full model, and prints a table.

Targets and what each method does with one: `experiments.runner.plan`. The flags are read once into a frozen
`plan.RunConfig`; `plan.resolve` checks it against the model. Each batch runs one pruned prefill, timed, whose
outputs are scored (`experiments.runner.evaluate`); tasks are in `experiments.runner.tasks`.

Output (`--output_dir`, default runs/<backbone>): results.jsonl (one row per evaluated example, appended and flushed
as it goes; an interrupted run resumes where it stopped: every finished row is skipped, nothing recomputed), then
summary.md (the table), relative_accuracy.png (relative accuracy vs kept fraction) and kept_tokens.png (which tokens
each method kept on a few examples, from the slots recorded in their rows: no second pass). The outputs of one
invocation are a set: the previous invocation's are removed when this one starts evaluating, and manifest.json
records the invocation, its tasks' provenance and whether it finished (`experiments.runner.outputs`).

A row is reused only by a run that would compute the same row: its key holds a hash of every setting that changes
numbers (`evaluate.run_hash`: checkpoint and its file stamps, task, data, seed, --max_new_tokens, --batch_size, the
Qwen images' pixel bounds, the pruning configuration) and a hash of the example's question, answer and image. The
table holds exactly the rows of this invocation's runs x examples (a smaller --limit shows a smaller table), and
marks a time ratio that mixes timings of several runner processes. A run locks its output_dir before it loads anything: a second run into it fails at
once, naming the holder.
"""


import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys

from absl import app
from absl import flags
from absl import logging

from experiments.runner import evaluate
from experiments.runner import hosts as hosts_lib
from experiments.runner import outputs
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
flags.DEFINE_list("budget", None, "Targets: the papers' visual tokens per image (exclusive with --keep_ratio).")
flags.DEFINE_list("keep_ratio", None, "Kept fractions of the backbone's nominal visual-token count "
                  "(default 0.222,0.111,0.056 when --budget is not given; qwen2_5_vl: --budget=256,128).")
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
                  "lmms-eval's task code (default per backbone: llava for llava_1_5, lmms_eval for llava_next and qwen2_5_vl).")
flags.DEFINE_string("conv_template", None, "Benchmark prompts' conversation template: vicuna_v1, mistral_instruct, "
                    "chat_template (the checkpoint's), plain (default: the checkpoint's decoder decides).")
flags.DEFINE_list("overrides", None, "Named variants of the methods' official protocols, method.name=value (e.g. "
                  "divprune.scope=global, cdpruner.newlines=drop, dart.dart_count=exact; sequences and dicts join "
                  "their items with '+': pdrop.layers=2+8+16, tops.hparams=engine:dense); see "
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
flags.DEFINE_integer("min_pixels", None, "qwen2_5_vl: the least pixels an image is resized to (lmms-eval's "
                     "model_arg; default its 200704 = 256 x 28 x 28; VLMEvalKit's 1003520 = 1280 x 28 x 28).")
flags.DEFINE_integer("max_pixels", None, "qwen2_5_vl: the most pixels an image is resized to (lmms-eval's model_arg; "
                     "default its 1605632 = 2048 x 28 x 28; VLMEvalKit's 12845056 = 16384 x 28 x 28).")
flags.DEFINE_enum("resolution", "native", ["native", "fixed_672"], "LLaVA-NeXT benchmark images: native size, or "
                  "resized to the paper's fixed 672 x 672 (2,880 visual tokens before unpadding).")


def _process_name() -> str:
  """Names this runner invocation in every row it measures (two invocations in one Python process differ too)."""
  return f"{socket.gethostname()}:{os.getpid()}:{datetime.datetime.now().isoformat(timespec='microseconds')}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
  try:
    from experiments import testbed  # pylint: disable=g-import-not-at-top  (the model face: its checkpoint path)
    config = plan.RunConfig.from_flags(flags.FLAGS).with_defaults(lambda: testbed.DEFAULT_CKPT)
    backbone = plan.backbone_of(config)       # its input hooks under --min_pixels / --max_pixels
    # Before any use of the devices: join the other processes, build the mesh.
    hosts = hosts_lib.start(config.mesh, distributed=config.distributed, coordinator=config.coordinator_address,
                            num_processes=config.num_processes, process_id=config.process_id)
    hosts.check_batch(config.batch_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with hosts_lib.mesh_context(hosts):       # every program traced in the run sees the mesh
    _main(config, backbone, hosts)


def _main(config: plan.RunConfig, backbone: plan.Backbone, hosts: hosts_lib.Hosts):
  # Opening the log locks out_dir for this process (results.DirectoryLock) before anything is loaded: a second run
  # into it fails here, at once. Only process 0 opens (and locks) the log and writes; the others learn from it what
  # is finished.
  try:
    opened = (results_lib.ResultsLog(os.path.join(config.output_dir, "results.jsonl")) if hosts.writer
              else contextlib.nullcontext(None))
  except results_lib.DirectoryLocked as e:
    raise SystemExit(f"experiments.run: {e}") from None
  with opened as log:
    _evaluate(config, backbone, hosts, log)
  if hosts.writer:
    print(f"results: {os.path.join(config.output_dir, 'results.jsonl')}; table, plot and pictures in "
          f"{config.output_dir}")


def _evaluate(config: plan.RunConfig, backbone: plan.Backbone, hosts: hosts_lib.Hosts, log):
  try:
    evaluator = evaluate.load(backbone, config.backbone, config.checkpoint, hosts, config.protocol or backbone.protocol)
    resolved, runs = plan.resolve(config, evaluator.model)
    if resolved.clip_fingerprint is not None:       # a run reads CLIP
      evaluator = dataclasses.replace(evaluator, clip=evaluate.load_clip(config.clip_checkpoint, evaluator.model))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if hosts.writer:
    print("resolved configuration:\n" + resolved.to_json(), flush=True)
  logging.info("process %d of %d, mesh %s; runs: %s", hosts.index, hosts.count, hosts.mesh,
               ", ".join(r.name for r in runs))
  out_dir, process = config.output_dir, _process_name()
  invocation = outputs.Invocation(out_dir, process, json.loads(resolved.to_json())) if hosts.writer else None
  if invocation:
    invocation.start()
  try:
    benchmark_scores = {}
    task_run = lambda name: tasks_lib.task_run(name, config, resolved, backbone, evaluator.processor)
    for name in config.tasks:
      # An in-memory task's bad data raises as it is read (ValueError naming the file and line); anything else a
      # task raises is the invocation's error.
      job = task_run(name) if name in tasks_lib.TASKS else None
      try:
        job = job or task_run(name)
        scores = _task(evaluator, config, resolved, runs, job, log, out_dir, process, invocation)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      if job.benchmark is not None and hosts.writer:
        benchmark_scores[name] = scores
    if benchmark_scores and len(runs) > 1 and hosts.writer:
      outputs.relative_summary(runs, benchmark_scores, out_dir, invocation.record["tasks"])
  except BaseException as e:
    if invocation:
      invocation.finish(e)
    raise
  if invocation:
    invocation.finish()


def _task(evaluator, config, resolved, runs, job, log, out_dir, process, invocation):
  """One task: every run evaluated (rows appended to `log`), then its outputs and provenance (process 0)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  order = [ex.question_id for ex in job.examples] if job.in_memory else ()
  hashes = {spec.name: evaluate.run_hash(job.settings, spec, job.name, order) for spec in runs}
  pictured = list(job.examples[:config.pictures]) if job.in_memory else []
  total = len(job.examples) if job.in_memory else job.benchmark.num_rows
  if not job.in_memory and config.limit:
    total = min(config.limit, total) if total else config.limit
  compiled = {}
  with tqdm(total=None if total is None else total * len(runs), desc=job.name, unit="ex", file=sys.stderr,
            disable=not evaluator.hosts.writer) as progress:
    covered = evaluate.evaluate_task(evaluator, runs, job, log, hashes, config.batch_size, config.seed, progress,
                                     process, frozenset(ex.question_id for ex in pictured), compiled)
  logging.info("%s: visual tokens per image (examples evaluated at each): %s; %d prefill program(s) compiled",
               job.name, compiled.get("visual_buckets", {}), compiled.get("programs", 0))
  if not evaluator.hosts.writer:
    return {}
  record = outputs.provenance(job, hashes, process)
  scores = outputs.write_task(job, runs, evaluate.task_rows(log, covered), out_dir, model=evaluator.model,
                              pictured=pictured, pictured_target=min(resolved.targets), protocol=resolved.protocol,
                              template=resolved.conv_template,
                              expected=None if config.limit or job.benchmark is None else job.benchmark.num_rows,
                              record=record, compiled=compiled)
  invocation.task_done(job.name, record, compiled)
  return scores


if __name__ == "__main__":
  app.run(main)
