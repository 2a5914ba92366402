"""Evaluating the runs (each a method at a target) on a task: one streamed loop, one pruned prefill per batch and run.

Per batch (`evaluate_task`): the rows every run has finished are skipped; the batch is encoded once and every run
evaluates it in turn, the full model first. `Evaluator.prefill` runs Stage I, the decoder with its Stage II steps and
the LM head at each row's last token (filling the KV cache when more than one token is generated or the fidelity
columns need it); `Evaluator.generate` takes the first token from the prefill's logits and the rest from
`models.generate.decode` on its cache. `prefill_ms` times the prefill, and `prefill_flops`
(`experiments.analysis.flops`) counts the same decoder work, the LM head at one position per row included. Each
compiled shape of a run is called once untimed first (compilation), and that result discarded.

How a task is batched is its `TaskRun`'s (`experiments.runner.tasks`): an in-memory task's batches are encoded up
front in the examples' order at one length; a streamed task (the benchmarks) reads buffers of `SORT_BATCHES` batches,
sorted by prompt length (text tokens plus the image's tokens), so memory holds a buffer, never the split, and each
pruned row also records the logit fidelity of the TOPS paper's Figure 2, label-free:
- `kl`: KL(full || pruned) of the next-token distributions at the first answer position;
- `nll_increase`: the full model's answer (its greedy tokens up to its stop token) scored under the pruned model,
  minus its NLL under the full model (teacher-forced, `models.generate.score_tokens`).

Row keys (`row_key`) hold a hash of every setting that changes a row's numbers (`run_hash`) and the example's part
(`TaskRun.key`), so a resumed or larger run reuses exactly the rows it would recompute. With several processes
(`Evaluator.hosts`) every process runs every unfinished batch on its own rows; the log is process 0's (None
elsewhere), which alone decides what is finished and writes the rows.
"""

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.analysis import flops
from experiments.benchmarks import base
from experiments.runner import hosts as hosts_lib
from experiments.runner import inputs as inputs_lib
from experiments.runner.plan import Backbone, RunSpec, reads_clip
from experiments.runner.tasks import TaskRun
from models import pruning
from tops_jax import prune

__all__ = ["SORT_BATCHES", "Evaluator", "Batch", "batches", "evaluate_task", "run_hash", "run_fields", "row_key",
           "task_rows", "check_budgets", "load", "load_clip"]

SORT_BATCHES = 8      # batches per length-sorted buffer of a streamed task


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The checkpoint's model and processor, this process's place in the run, CDPruner's CLIP text tower (None
  without --clip_checkpoint) and the family's input hooks (`experiments.runner.inputs`): encodes batches and runs
  the pruned prefill and decoding."""
  model: Any
  processor: Any
  hosts: hosts_lib.Hosts = hosts_lib.SINGLE
  clip: Any = None        # models.clip_text.ClipTextRelevance
  inputs: Any = inputs_lib.LLAVA

  @property
  def tokenizer(self):
    return self.processor.tokenizer

  def clip_inputs(self, config: pruning.PruningConfig, arrays) -> "pruning.ClipText | None":
    """CDPruner's CLIP inputs for `arrays` when `config` reads them (stage1_relevance="clip_text"), else None."""
    if not reads_clip(config) or config.stage1_budget is None:
      return None
    if self.clip is None or "clip_text" not in arrays:
      raise ValueError(f"{config.method} reads CLIP text relevance: the runner needs --clip_checkpoint")
    return pruning.ClipText(image_head=self.clip.model.vision, text_embeds=jnp.asarray(arrays["clip_text"]))

  def encode(self, texts: Sequence[str], images: Sequence[np.ndarray], questions: Sequence[str],
             length: int | None = None, visual_len: int | None = None) -> dict[str, np.ndarray]:
    """Rendered prompts (one image each) and their images -> arrays padded to `length` (default: the family's rule;
    LLaVA: the longest row rounded up to a multiple of 32) with the images at `visual_len` tokens (default the
    model's bound; `inputs`); with a CLIP text tower (`clip`) also `clip_text` float32[B, E], CDPruner's text
    embedding of each row's question (the user text, as its official eval scripts pass it). The images are
    uint8[H, W, 3], said so: left to guess, the processor reads an image 1 or 3 px high as channels-first (3 x 100
    as 100 x 3)."""
    arrays = self.inputs.encode(self.model, self.processor, texts, images, length,
                                visual_len or self.model.config.max_image_tokens)
    if self.clip is not None:
      arrays["clip_text"] = self.clip.encode(list(questions))
    return arrays

  def visual_tokens(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Visual tokens per row before pruning (newlines excluded)."""
    layout = self.inputs.layout(self.model, arrays)
    return (np.asarray(layout.valid) & ~np.asarray(layout.newline)).sum(-1)

  def text_bound(self, arrays: Mapping[str, np.ndarray]) -> int:
    """The static bound on real non-image tokens per row (a multiple of 8)."""
    return inputs_lib.text_bound(arrays, self.model.config.image_token_id)

  def prefill(self, config: pruning.PruningConfig, batch: "Batch", key, max_new_tokens: int, cache: bool):
    """The pruned prefill: a PruneOutput (cache=False: one new token, no cache) or a `generate.Prefill` to
    decode `max_new_tokens` from."""
    a = batch.arrays
    common = dict(key=key, text_len=batch.text_bound, clip=self.clip_inputs(config, a),
                  **self.inputs.prefill_args(self.model, a, batch.visual_len))
    if not cache:
      return pruning.forward(self.model, config, a["input_ids"], a["attention_mask"], a["pixel_values"], **common)
    return pruning.prefill(self.model, config, a["input_ids"], a["attention_mask"], pixel_values=a["pixel_values"],
                           max_new_tokens=max_new_tokens, **common)

  def generate(self, config: pruning.PruningConfig, state, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens from a `prefill` state (no second prefill): (int32[B, M], num_tokens int32[B]) as numpy."""
    if isinstance(state, pruning.PruneOutput):      # one new token: the argmax of the prefill's logits
      tokens = hosts_lib.fetch(jnp.argmax(state.logits[:, 0], axis=-1))[:, None]
      return tokens, np.ones(len(tokens), np.int32)
    eos = self.tokenizer.eos_token_id
    gen = pruning.decode(self.model, config, state, max_new_tokens=max_new_tokens,
                         eos_token_ids=() if eos is None else (eos,), pad_token_id=self.tokenizer.pad_token_id or 0)
    return hosts_lib.fetch(gen.tokens), hosts_lib.fetch(gen.num_tokens)


def load(backbone: Backbone, backbone_name: str, checkpoint: str,
         hosts: hosts_lib.Hosts = hosts_lib.SINGLE, protocol: str | None = None) -> Evaluator:
  """The Evaluator of a local checkpoint (with a mesh each device reads its own shards), its processor as the
  benchmark `protocol` sets it up (`inputs.load_processor`). ValueError for a missing directory or a checkpoint of
  another model type."""
  import models  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    raise ValueError(f"--checkpoint {checkpoint!r} is not a directory")
  model = models.load_pretrained(checkpoint, mesh=hosts.mesh)
  with open(os.path.join(checkpoint, "config.json")) as f:
    model_type = json.load(f).get("model_type")
  if model_type != backbone.model_type:
    raise ValueError(f"--backbone={backbone_name} expects a {backbone.model_type} checkpoint; {checkpoint} is "
                     f"{model_type}")
  if backbone_name == "testbed":
    from experiments import testbed  # pylint: disable=g-import-not-at-top
    processor = testbed.make_processor(testbed.hf_from_model(model), directory=checkpoint)
  else:
    processor = backbone.inputs.load_processor(checkpoint, protocol)
  return Evaluator(model, processor, hosts, inputs=backbone.inputs)


def load_clip(clip_checkpoint: str, model):
  """CDPruner's CLIP text tower (`models.clip_text.ClipTextRelevance`, for `Evaluator.clip`); ValueError naming
  --clip_checkpoint when it cannot be read or its image head does not read `model`'s vision features (before any
  example is evaluated, not when the first batch is traced)."""
  from models import clip_text  # pylint: disable=g-import-not-at-top
  try:
    clip = clip_text.ClipTextRelevance(clip_checkpoint)
  except (OSError, ValueError) as e:
    raise ValueError(f"--clip_checkpoint: {e}") from None
  width, tower = clip.model.vision.width, model.config.vision.hidden_size
  if width != tower:
    raise ValueError(f"--clip_checkpoint {clip_checkpoint}: its image head (post_layernorm, visual_projection) reads "
                     f"{width}-wide vision features, and the checkpoint's vision tower gives {tower}-wide ones; "
                     "CDPruner needs the CLIP checkpoint of the model's own tower (openai/clip-vit-large-patch14-336 "
                     "for LLaVA-1.5 and LLaVA-NeXT)")
  return clip


def _draws_randomly(config: pruning.PruningConfig) -> bool:
  methods = {config.method, config.stage2_method or config.method}
  return any(prune.METHODS[m].needs_key for m in methods if m in prune.METHODS)


def run_fields(settings: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
  """The task's settings that change `spec`'s rows: all of them, less the CLIP checkpoint's file fingerprint for a
  run that does not read CLIP (so those rows keep the keys they had before the fingerprint was recorded)."""
  if reads_clip(spec.config):
    return dict(settings)
  return {k: v for k, v in settings.items() if k != "clip_checkpoint_fingerprint"}


def run_hash(settings: Mapping[str, Any], spec: RunSpec, task: str, order: Sequence[str] = ()) -> str:
  """Everything that changes a run's numbers, hashed: rows of a changed configuration are not reused.

  settings: `TaskRun.settings`: `plan.run_hash_fields(resolved, task)` (backbone, checkpoint and its fingerprint,
  data_dir, split, seed, max_new_tokens, batch_size; with --clip_checkpoint its path, and for the runs that read
  CLIP its files' fingerprint (`run_fields`); benchmarks: protocol, template, resolution, limit, the task's answer
  length and the snapshot's fingerprint). The run's keep_ratio is hashed too, so a run's rows always agree
  on it. The example itself goes into each row's key (`row_key`). batch_size matters because random methods draw
  from fold_in(fold_in(seed, batch), row): for them the draws follow each example's position, so `order`, the
  in-memory task's example ids in order, is hashed too (a different --limit of a generated split reorders it; a
  streamed task hashes its limit instead). Output paths, --pictures and --limit (for the other methods of an
  in-memory task) change no row, so a resume or a larger --limit reuses every finished row.
  """
  fields = dict(run_fields(settings, spec), task=task, config=repr(spec.config), keep_ratio=spec.keep_ratio)
  if _draws_randomly(spec.config):
    fields["order"] = hashlib.sha1("\n".join(order).encode()).hexdigest()
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def row_key(run_hash_: str, spec: RunSpec, example_key: str) -> str:
  return f"{run_hash_}/{spec.name}/{example_key}"


@dataclasses.dataclass(frozen=True)
class _Prepared:
  example: base.Example
  key: str                    # the example's part of its rows' keys
  prompt: str
  image: np.ndarray
  length: int = 0             # prompt tokens with the image expanded (streamed tasks sort by it)
  count: int = 0              # the image's visual tokens (before any bucket)


@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch of a task: its examples, their static visual-token count per image (`inputs.visual_len`: the bucket)
  and, once encoded, the global arrays (padded to the batch size with copies of the first example), the visual
  tokens per row and the static text bound."""
  number: int                 # folds the seed for the random methods
  examples: list[_Prepared]
  visual_len: int = 0
  arrays: dict[str, Any] | None = None
  visual: np.ndarray | None = None      # int[B] visual tokens per row before pruning
  text_bound: int = 0


def _prepare(evaluator: Evaluator, job: TaskRun, example: base.Example, measure: bool) -> _Prepared:
  """The example rendered; `measure`: with its length, checked to leave room for the answer (ValueError naming the
  example's file and row, before its batch runs: the model's own check names no example)."""
  image, prompt = job.image(example), job.prompt(example)
  length = 0
  count = evaluator.inputs.image_tokens(evaluator.model, evaluator.processor, image)
  if measure:
    length = len(evaluator.tokenizer(prompt.replace(base.IMAGE_TOKEN, ""))["input_ids"]) + count
    most = evaluator.model.config.text.max_position_embeddings
    if length + job.max_new_tokens > most:
      raise ValueError(f"{example.source or job.name}: question {example.question_id!r} is too long: its prompt "
                       f"holds {length} tokens ({count} of them the image's), and {length} + max_new_tokens "
                       f"{job.max_new_tokens} > max_position_embeddings {most}")
  return _Prepared(example, job.key(example), prompt, image, length, count)


def _local(evaluator: Evaluator, examples: Sequence[_Prepared], batch_size: int) -> list[_Prepared]:
  """This process's rows of a batch padded to `batch_size` (one compiled shape) with copies of its first example."""
  padded = list(examples) + [examples[0]] * (batch_size - len(examples))
  return [padded[r] for r in evaluator.hosts.local_rows(batch_size)]


def _encode(evaluator: Evaluator, mine: Sequence[_Prepared], visual_len: int,
            length: int | None = None) -> dict[str, np.ndarray]:
  return evaluator.encode([p.prompt for p in mine], [p.image for p in mine], [p.example.text for p in mine], length,
                          visual_len)


def _visual_len(evaluator: Evaluator, examples: Sequence[_Prepared]) -> int:
  return evaluator.inputs.visual_len(evaluator.model, [p.count for p in examples])


def _checked(evaluator: Evaluator, batch: Batch, arrays, runs: Sequence[RunSpec], task: str,
             text_bound: int | None = None) -> Batch:
  """The batch with its global arrays, visual tokens and text bound, its first stages' counts checked
  (`check_budgets`)."""
  visual = evaluator.visual_tokens(arrays)
  check_budgets(runs, visual[:len(batch.examples)], task)
  return dataclasses.replace(batch, arrays=arrays, visual=visual,
                             text_bound=text_bound or evaluator.text_bound(arrays))


def batches(evaluator: Evaluator, job: TaskRun, runs: Sequence[RunSpec], batch_size: int) -> Iterator[Batch]:
  """The task's batches. In memory: all encoded (every batch at one length: one compile per run; each process
  encodes only its rows, the length agreed over the processes) and checked before the first is yielded. Streamed:
  examples read up to the task's limit in buffers, sorted by length, cut into batches that are encoded when a run
  needs them (`encode_batch`)."""
  if job.in_memory:
    prepared = [_prepare(evaluator, job, ex, False) for ex in job.examples]
    visual_len = _visual_len(evaluator, prepared)        # one for the task: one compile per run
    chunks = [Batch(n, prepared[start:start + batch_size], visual_len)
              for n, start in enumerate(range(0, len(prepared), batch_size))]
    local = [_local(evaluator, b.examples, batch_size) for b in chunks]
    encoded = [_encode(evaluator, mine, visual_len) for mine in local]
    length = evaluator.hosts.max(max(a["input_ids"].shape[1] for a in encoded))
    encoded = [a if a["input_ids"].shape[1] == length else _encode(evaluator, mine, visual_len, length)
               for a, mine in zip(encoded, local)]
    assembled = [evaluator.hosts.assemble(a, batch_size) for a in encoded]
    bound = max(evaluator.text_bound(a) for a in assembled)
    yield from [_checked(evaluator, b, a, runs, job.name, bound) for b, a in zip(chunks, assembled)]
    return
  number = 0
  for buffer in _buffers(_limited(job.examples, job.limit), batch_size * SORT_BATCHES):
    prepared = sorted((_prepare(evaluator, job, ex, True) for ex in buffer), key=lambda p: p.length)
    for start in range(0, len(prepared), batch_size):
      number += 1
      chunk = prepared[start:start + batch_size]
      yield Batch(number, chunk, _visual_len(evaluator, chunk))


def encode_batch(evaluator: Evaluator, batch: Batch, runs: Sequence[RunSpec], batch_size: int, task: str) -> Batch:
  """A streamed batch encoded at its own length (agreed over the processes) and checked."""
  if batch.arrays is not None:
    return batch
  mine = _local(evaluator, batch.examples, batch_size)
  arrays = _encode(evaluator, mine, batch.visual_len)
  length = evaluator.hosts.max(arrays["input_ids"].shape[1])
  if length != arrays["input_ids"].shape[1]:
    arrays = _encode(evaluator, mine, batch.visual_len, length)
  return _checked(evaluator, batch, evaluator.hosts.assemble(arrays, batch_size), runs, task)


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


def check_budgets(runs: Sequence[RunSpec], visual: Sequence[int], task: str):
  """Before a batch is evaluated (an in-memory task: before anything is written): every image must hold what each
  run's first stage keeps (Stage I's budget, else the first Stage II step's keep). visual: the batch's visual tokens
  per real row. Raises ValueError."""
  fewest = min(int(v) for v in visual)
  for spec in runs:
    first = spec.config.stage1_budget or (spec.config.steps[0][1] if spec.config.steps else 0)
    if first > fewest:
      raise ValueError(f"{spec.name} keeps {first} visual tokens in its first stage, but an image of task "
                       f"{task} has only {fewest}; lower --budget/--keep_ratio")


class _Fidelity:
  """The full model's next-token log-probabilities and answer tokens for the current batch."""

  def __init__(self, evaluator, config, state, tokens, num_tokens):
    self.logp = hosts_lib.fetch(jax.nn.log_softmax(state.logits.astype(np.float32), axis=-1))
    self.tokens, self.num_tokens = tokens, num_tokens
    self.nll = self.answer_nll(evaluator, config, state)

  def answer_nll(self, evaluator, config, state) -> np.ndarray:
    """-sum log p(full answer) under the model of `state`: float64[B]."""
    from models import generate  # pylint: disable=g-import-not-at-top
    segments = config.segments(evaluator.model.config.text.num_hidden_layers)
    n = max(1, int(self.num_tokens.max()))
    logp = hosts_lib.fetch(generate.score_tokens(evaluator.model, state._replace(extra=None), self.tokens[:, :n],
                                                 segments=segments)).astype(np.float64)
    real = np.arange(n)[None, :] < np.maximum(self.num_tokens, 1)[:, None]
    return -(logp * real).sum(-1)

  def columns(self, evaluator, config, state) -> tuple[np.ndarray, np.ndarray]:
    """(KL(full || pruned) at the first answer position, the increase of the full answer's NLL): float64[B] each."""
    logp = hosts_lib.fetch(jax.nn.log_softmax(state.logits.astype(np.float32), axis=-1)).astype(np.float64)
    kl = (np.exp(self.logp) * (self.logp - logp)).sum(-1)
    return kl, self.answer_nll(evaluator, config, state) - self.nll


def _first_stage_kept(out: pruning.PruneOutput) -> np.ndarray | None:
  """Packed slots kept by the first pruning stage, int[B, K] (None: the full model)."""
  stage = out.stage1 if out.stage1 is not None else (out.stage2[0] if out.stage2 else None)
  return None if stage is None else hosts_lib.fetch(stage.kept)


def _rows(evaluator: Evaluator, job: TaskRun, spec: RunSpec, batch: Batch, keys: Sequence[str], state, tokens,
          num_tokens, elapsed_ms: float, process: str, fidelity, pictured: frozenset[str]) -> list[dict[str, Any]]:
  """One row per real example of the batch: the run, the task's fields of its generation, the prefill's kept tokens
  per layer, FLOPs and time (per row of the padded batch), and (streamed tasks) the fidelity columns."""
  out = state if isinstance(state, pruning.PruneOutput) else state.extra
  kept = hosts_lib.fetch(out.visual_per_layer).astype(np.float64)
  per_layer = hosts_lib.fetch(out.tokens_per_layer).astype(np.float64)
  slots = _first_stage_kept(out) if pictured else None
  text_config = evaluator.model.config.text
  rows = []
  for i, p in enumerate(batch.examples):
    generation = evaluator.tokenizer.decode(tokens[i, :max(int(num_tokens[i]), 0)], skip_special_tokens=True)
    row = dict(key=keys[i], run=spec.name, method=spec.label, budget=spec.target, keep_ratio=spec.keep_ratio,
               **job.fields(p.example, p.prompt, generation), visual_tokens=int(batch.visual[i]),
               kept_per_layer=kept[i].tolist(), tokens_per_layer=per_layer[i].tolist(),
               prefill_flops=flops.decoder_prefill_flops(text_config, per_layer[i].tolist(), lm_head_positions=1),
               prefill_ms=elapsed_ms / len(batch.arrays["input_ids"]), process=process)
    if fidelity is not None:
      row.update(kl=float(fidelity[0][i]), nll_increase=float(fidelity[1][i]))
    if p.example.question_id in pictured:
      row["kept_slots"] = None if slots is None else slots[i].tolist()
    rows.append(row)
  return rows


def evaluate_task(evaluator: Evaluator, runs: Sequence[RunSpec], job: TaskRun, log, hashes: Mapping[str, str],
                  batch_size: int, seed: int, progress=None, process: str = "",
                  pictured: frozenset[str] = frozenset(), compiled: dict | None = None) -> dict[str, list[str]]:
  """Evaluates every run on the task's batches, appending one row per example to `log` (finished rows are
  skipped); returns the row keys of this invocation by run name. `hashes`: run name -> `run_hash` of this task.

  process: names the runner invocation that measured `prefill_ms` (timings of different processes differ in
  warm-up, load and machine, so the reports flag a time ratio that mixes them). pictured: example ids whose rows
  also record `kept_slots` (the first stage's kept packed slots) for the kept-token pictures, which then need no
  second pass. compiled: filled (when given) with what the task compiled: "visual_buckets" {visual tokens per image
  (`Batch.visual_len`): examples evaluated at it}, "shapes" [[B, S, text bound, visual tokens], ...] of the batches
  evaluated and "programs", the prefill programs compiled (run x shape).
  """
  hosts = evaluator.hosts
  streamed = not job.in_memory
  warm: set[tuple[Any, ...]] = set()
  seen: set[str] = set()
  covered: dict[str, list[str]] = {spec.name: [] for spec in runs}
  for batch in batches(evaluator, job, runs, batch_size):
    for p in batch.examples:
      if p.example.question_id in seen:
        raise ValueError(f"task {job.name}: question_id {p.example.question_id!r} occurs twice in the split")
      seen.add(p.example.question_id)
    keys = {spec.name: [row_key(hashes[spec.name], spec, p.key) for p in batch.examples] for spec in runs}
    for spec in runs:
      covered[spec.name].extend(keys[spec.name])
    finished = hosts.done_flags(log, [keys[spec.name] for spec in runs])    # process 0's log, on every process
    todo = [spec for spec, done in zip(runs, finished) if not done]
    if progress is not None:
      progress.update(len(batch.examples) * (len(runs) - len(todo)))      # finished rows, counted as done
    if not todo:
      continue
    batch = encode_batch(evaluator, batch, runs, batch_size, job.name)
    if compiled is not None:
      buckets = compiled.setdefault("visual_buckets", {})
      buckets[batch.visual_len] = buckets.get(batch.visual_len, 0) + len(batch.examples)
      shape = [*batch.arrays["input_ids"].shape, batch.text_bound, batch.visual_len]
      compiled.setdefault("shapes", []).extend([] if shape in compiled["shapes"] else [shape])
    key = jax.random.fold_in(jax.random.key(seed), batch.number)
    cache = job.max_new_tokens > 1 or streamed
    reference = None
    for spec in runs:     # full first: the reference of the fidelity columns
      if spec not in todo and not (streamed and spec.target is None):
        continue
      if progress is not None:
        progress.set_postfix_str(spec.name)
      shape = (spec.name,) + batch.arrays["input_ids"].shape + (batch.text_bound, batch.visual_len)
      if shape not in warm:   # compile outside the timed call
        jax.block_until_ready(evaluator.prefill(spec.config, batch, key, job.max_new_tokens, cache))
        warm.add(shape)
        if compiled is not None:
          compiled["programs"] = compiled.get("programs", 0) + 1
      t0 = time.perf_counter()
      state = jax.block_until_ready(evaluator.prefill(spec.config, batch, key, job.max_new_tokens, cache))
      elapsed_ms = (time.perf_counter() - t0) * 1e3
      tokens, num_tokens = evaluator.generate(spec.config, state, job.max_new_tokens)
      fidelity = None
      if streamed:
        if spec.target is None:
          reference = _Fidelity(evaluator, spec.config, state, tokens, num_tokens)
          if spec not in todo:
            continue      # full's rows are done; it ran as the reference only
          fidelity = (np.zeros(len(tokens)), np.zeros(len(tokens)))
        else:
          fidelity = reference.columns(evaluator, spec.config, state)
      rows = _rows(evaluator, job, spec, batch, keys[spec.name], state, tokens, num_tokens, elapsed_ms, process,
                   fidelity, pictured)
      if hosts.writer:
        log.append(rows)
      if progress is not None:
        progress.update(len(rows))
  if not seen:
    raise ValueError(f"task {job.name}: the split has no examples")
  return covered


def task_rows(log, covered: Mapping[str, Sequence[str]]) -> dict[str, list[dict[str, Any]]]:
  """The rows of exactly this invocation's runs x examples (`evaluate_task`'s keys), by run name in evaluation
  order, read from the log by key: never an older, larger or differently configured run's. RuntimeError when a row
  is missing."""
  found = log.read(key for keys in covered.values() for key in keys)
  out = {name: [found[key] for key in keys if key in found] for name, keys in covered.items()}
  missing = sum(len(keys) for keys in covered.values()) - len(found)
  if missing:
    raise RuntimeError(f"{log.path}: {missing} of this run's {sum(len(k) for k in covered.values())} rows are "
                       "missing after evaluation")
  return out
