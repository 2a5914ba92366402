"""Evaluating the runs on a benchmark task (`experiments.benchmarks`): streamed, batch-major, one prefill per batch.

The split streams from its snapshot (`Task.examples`); a buffer of `SORT_BATCHES` batches is sorted by prompt length
(text tokens plus the image's tokens) and cut into batches, so memory holds a buffer, never the split. Each batch
is encoded once and every run evaluates it in turn, the full model first: its next-token distribution at the answer
position and its answer are kept for the batch, so each pruned row also records the logit fidelity of the paper's
Figure 2, label-free:
- `kl`: KL(full || pruned) of the next-token distributions at the first answer position;
- `nll_increase`: the full model's answer (its greedy tokens up to its stop token) scored under the pruned model,
  minus its NLL under the full model (teacher-forced, `models.generate.score_tokens`).
Per row: the rendered prompt, `prediction` (the raw generation cut at the task's stop strings), the parsed `answer`,
the target and meta (JSON), and the prefill's kept tokens, FLOPs and time (as `experiments.runner.evaluate`). Rows append to
results.jsonl and resume by key; per run, `predictions/<task>/<run>.jsonl` holds one object per question
(question_id, prompt, prediction, answer), lmms-eval's spirit; the task's metrics come from `Task.score`.
"""

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from experiments.analysis import flops
from experiments.benchmarks import base
from experiments.runner import conversation
from experiments.runner import evaluate
from experiments.runner import hosts as hosts_lib
from experiments.runner import images as images_lib
from experiments.runner.plan import RunSpec
from models import pruning

__all__ = ["SORT_BATCHES", "Settings", "task_dir", "evaluate_task", "task_summary", "write_predictions",
           "format_summary"]

SORT_BATCHES = 8      # batches per length-sorted buffer


@dataclasses.dataclass(frozen=True)
class Settings:
  protocol: str
  template: str
  aspect: str                 # images.ASPECTS entry
  max_new_tokens: int
  batch_size: int
  seed: int
  limit: int                  # 0: the whole split


def task_dir(data_dir: str, task: base.Task, single: bool) -> str:
  """The task's snapshot: ROOT/<repository name> when it exists, else `data_dir` itself when it is the one
  benchmark task of the invocation. ValueError naming both candidates otherwise."""
  candidate = os.path.join(data_dir, task.folder)
  if os.path.isdir(candidate):
    return candidate
  if single:
    return data_dir
  raise ValueError(f"task {task.name}: no snapshot folder {candidate} (the folder of {task.repo}); with several "
                   "benchmark tasks --data_dir must hold one folder per dataset repository")


def _limited(examples: Iterable[base.Example], limit: int) -> Iterator[base.Example]:
  for number, example in enumerate(examples):
    if limit and number >= limit:
      return
    yield example


def _buffers(examples: Iterable[base.Example], size: int) -> Iterator[list[base.Example]]:
  buffer = []
  for example in examples:
    buffer.append(example)
    if len(buffer) == size:
      yield buffer
      buffer = []
  if buffer:
    yield buffer


@dataclasses.dataclass
class _Prepared:
  example: base.Example
  prompt: str
  image: np.ndarray
  length: int                 # prompt tokens with the image expanded
  image_tokens: int           # the image's tokens (its layout's count)


def _prepare(evaluator: evaluate.Evaluator, settings: Settings, example: base.Example) -> _Prepared:
  processor = evaluator.processor
  image = images_lib.prepare(example.image, settings.aspect, getattr(processor.image_processor, "image_mean", None))
  prompt = conversation.render(settings.template, example.text, processor)
  h, w = image.shape[:2]
  layout = evaluator.model.layout(np.array([[h, w]]), 1)
  text = len(processor.tokenizer(prompt.replace("<image>", ""))["input_ids"])
  count = int(np.asarray(layout.counts)[0])
  return _Prepared(example, prompt, image, text + count, count)


def _prefill(evaluator: evaluate.Evaluator, config, batch, key, max_new_tokens: int):
  """The pruned prefill with a cache for the task's answer length (a `generate.Prefill`)."""
  return pruning.prefill(evaluator.model, config, batch["input_ids"], batch["attention_mask"],
                         pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes"),
                         max_new_tokens=max_new_tokens, key=key, text_len=evaluator.text_bound,
                         visual_len=evaluator.visual_bound, clip=evaluator.clip_inputs(config, batch))


def _cut(text: str, stops: Sequence[str]) -> str:
  cut = min([text.index(s) for s in stops if s and s in text], default=len(text))
  return text[:cut]


class _Fidelity:
  """The full model's next-token log-probabilities and answer tokens for the current batch."""

  def __init__(self, state, tokens, num_tokens):
    self.logp = hosts_lib.fetch(jax.nn.log_softmax(state.logits.astype(np.float32), axis=-1))
    self.tokens, self.num_tokens = tokens, num_tokens
    self.nll = None

  def answer_nll(self, evaluator, config, state) -> np.ndarray:
    """-sum log p(full answer) under the model of `state`: float64[B]."""
    from models import generate  # pylint: disable=g-import-not-at-top
    segments = config.segments(evaluator.model.config.text.num_hidden_layers)
    n = max(1, int(self.num_tokens.max()))
    logp = hosts_lib.fetch(generate.score_tokens(evaluator.model, state._replace(extra=None), self.tokens[:, :n],
                                                 segments=segments)).astype(np.float64)
    real = np.arange(n)[None, :] < np.maximum(self.num_tokens, 1)[:, None]
    return -(logp * real).sum(-1)


def evaluate_task(evaluator: evaluate.Evaluator, runs: Sequence[RunSpec], task: base.Task,
                  examples: Iterable[base.Example], log, hashes: Mapping[str, str], settings: Settings,
                  progress=None, process: str = "") -> int:
  """Evaluates every run on the streamed examples, appending rows to `log` (finished rows are skipped); returns
  the number of examples. `hashes`: run name -> `evaluate.run_hash` of this task.

  Several processes (`evaluator.hosts`): each streams and length-sorts the same examples (reading every image's size)
  but runs the processor on its own rows of each batch only; `log` is process 0's (None elsewhere), which decides
  what is finished and writes the rows."""
  text_config = evaluator.model.config.text
  hosts = evaluator.hosts
  warm: set[tuple[str, tuple[int, ...]]] = set()
  seen, number = set(), 0
  for buffer in _buffers(_limited(examples, settings.limit), settings.batch_size * SORT_BATCHES):
    prepared = sorted((_prepare(evaluator, settings, ex) for ex in buffer), key=lambda p: p.length)
    for start in range(0, len(prepared), settings.batch_size):
      chunk = prepared[start:start + settings.batch_size]
      for p in chunk:
        if p.example.question_id in seen:
          raise ValueError(f"task {task.name}: question_id {p.example.question_id!r} occurs twice in the split")
        seen.add(p.example.question_id)
      keys = {spec.name: [f"{hashes[spec.name]}/{spec.name}/{p.example.question_id}" for p in chunk]
              for spec in runs}
      finished = hosts.done_flags(log, [keys[spec.name] for spec in runs])    # process 0's log, on every process
      todo = [spec for spec, done in zip(runs, finished) if not done]
      number += 1
      fewest = min(p.image_tokens for p in chunk)
      for spec in runs:
        first = spec.config.stage1_budget or (spec.config.steps[0][1] if spec.config.steps else 0)
        if first > fewest:
          raise ValueError(f"{spec.name} keeps {first} visual tokens in its first stage, but an image of task "
                           f"{task.name} has only {fewest}; lower --budget/--keep_ratio")
      if progress is not None:
        progress.update(len(chunk) * (len(runs) - len(todo)))      # finished rows, counted as done
      if not todo:
        continue
      padded = chunk + [chunk[0]] * (settings.batch_size - len(chunk))      # one compiled shape per length bucket
      mine = [padded[r] for r in hosts.local_rows(settings.batch_size)]      # this process's rows
      encode = lambda length=None: evaluator.encode_prompts(
          [p.prompt for p in mine], [p.image for p in mine], length, questions=[p.example.text for p in mine])
      arrays = encode()
      length = hosts.max(arrays["input_ids"].shape[1])
      if length != arrays["input_ids"].shape[1]:
        arrays = encode(length)
      arrays = hosts.assemble(arrays, settings.batch_size)
      evaluator.text_bound = evaluator._text_len(arrays)  # pylint: disable=protected-access
      visual = evaluator.visual_tokens(arrays)
      key = jax.random.fold_in(jax.random.key(settings.seed), number)
      fidelity = None
      for spec in runs:     # full first: the reference of the fidelity columns
        if spec not in todo and spec.budget is not None:
          continue
        shape = (spec.name,) + arrays["input_ids"].shape + (evaluator.text_bound,)
        if shape not in warm:   # compile outside the timed call
          jax.block_until_ready(_prefill(evaluator, spec.config, arrays, key, settings.max_new_tokens))
          warm.add(shape)
        t0 = time.perf_counter()
        state = jax.block_until_ready(_prefill(evaluator, spec.config, arrays, key, settings.max_new_tokens))
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        tokens, num_tokens = evaluator.generate(spec.config, state, settings.max_new_tokens)
        if spec.budget is None:
          fidelity = _Fidelity(state, tokens, num_tokens)
          fidelity.nll = fidelity.answer_nll(evaluator, spec.config, state)
          if spec not in todo:
            continue      # full's rows are done; it ran as the reference only
          kl = np.zeros(len(padded))
          nll_increase = np.zeros(len(padded))
        else:
          logp = hosts_lib.fetch(jax.nn.log_softmax(state.logits.astype(np.float32), axis=-1)).astype(np.float64)
          kl = (np.exp(fidelity.logp) * (fidelity.logp - logp)).sum(-1)
          nll_increase = fidelity.answer_nll(evaluator, spec.config, state) - fidelity.nll
        out = state.extra
        kept = hosts_lib.fetch(out.visual_per_layer).astype(np.float64)
        per_layer = hosts_lib.fetch(out.tokens_per_layer).astype(np.float64)
        rows = []
        for i, p in enumerate(chunk):
          text = evaluator.tokenizer.decode(tokens[i, :max(int(num_tokens[i]), 0)], skip_special_tokens=True)
          generation = _cut(text, task.stop).strip()
          ex = p.example
          rows.append(dict(
              key=keys[spec.name][i], run=spec.name, method=spec.label, budget=spec.budget,
              keep_ratio=spec.keep_ratio, task=task.name, question_id=ex.question_id, prompt=p.prompt,
              prediction=generation, answer=task.parse(generation, ex.meta, settings.protocol), target=ex.target,
              meta=dict(ex.meta), visual_tokens=int(visual[i]), kept_per_layer=kept[i].tolist(),
              tokens_per_layer=per_layer[i].tolist(),
              prefill_flops=flops.decoder_prefill_flops(text_config, per_layer[i].tolist(), lm_head_positions=1),
              prefill_ms=elapsed_ms / len(padded), process=process, kl=float(kl[i]),
              nll_increase=float(nll_increase[i])))
        if hosts.writer:
          log.append(rows)
        if progress is not None:
          progress.update(len(rows))
  if not seen:
    raise ValueError(f"task {task.name}: the split has no examples")
  return len(seen)


def task_rows(log, runs: Sequence[RunSpec], hashes: Mapping[str, str], task: str) -> dict[str, list[dict]]:
  """This invocation's rows of each run, by run name (never another configuration's)."""
  wanted = {spec.name: f"{hashes[spec.name]}/{spec.name}/" for spec in runs}
  out = {spec.name: [] for spec in runs}
  for row in log.rows:
    name = row.get("run")
    if name in wanted and row.get("task") == task and row["key"].startswith(wanted[name]):
      out[name].append(row)
  return out


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
        run=spec.name, method=spec.label, budget=spec.budget, n=len(rows), metrics=task.score(rows, protocol),
        kept_per_layer=float(np.mean([np.mean(r["kept_per_layer"]) for r in rows])),
        prefill_flops=float(np.mean([r["prefill_flops"] for r in rows])),
        kl=float(np.mean([r["kl"] for r in rows])), nll_increase=float(np.mean([r["nll_increase"] for r in rows])),
        flops_ratio=ratio("prefill_flops"), time_ratio=ratio("prefill_ms"),
        processes=len({r["process"] for r in rows})))
  return entries


def format_summary(task: base.Task, entries: Sequence[Mapping[str, Any]]) -> str:
  """The task's markdown table: run, T, n, every metric, kept/layer, GFLOPs, flops and time ratios, KL, dNLL."""
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


def write_predictions(directory: str, task: str, rows_by_run: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
  """predictions/<task>/<run>.jsonl per run (question_id, prompt, prediction = the raw generation cut at the stop
  strings, answer = the parsed one), written atomically; `experiments.score` re-scores such a file."""
  paths = []
  folder = os.path.join(directory, "predictions", task)
  os.makedirs(folder, exist_ok=True)
  for run, rows in rows_by_run.items():
    path = os.path.join(folder, run.replace("/", "_") + ".jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(dict(question_id=r["question_id"], prompt=r["prompt"], prediction=r["prediction"],
                                answer=r["answer"]), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    paths.append(path)
  return paths
