"""Evaluating one run (a method at a budget) on a task's batches: encode, one pruned prefill per batch (timed, and the
call whose outputs are scored), decode, score, append rows.

Per batch the work is: `Evaluator.prefill` (Stage I, the decoder with its Stage II steps, the LM head at each row's
last token; with --max_new_tokens > 1 it also fills the KV cache), then `Evaluator.answers` (the first token from the
prefill logits; the rest from `models.generate.decode` on the prefill's cache). `prefill_ms` times the first call,
and `prefill_flops` (`experiments.analysis.flops`) counts the same decoder work, the LM head at one position per row
included.
The first batch of a run is run once untimed before (compilation), and its result discarded.

Row keys (`row_key`) hold a hash of every setting that changes a row's numbers (`run_hash`) and a hash of the
example, so a resumed or larger run reuses exactly the rows it would recompute.
"""

import dataclasses
import hashlib
import json
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.analysis import flops
from experiments.runner import hosts as hosts_lib
from experiments.runner.plan import Backbone, RunSpec
from experiments.runner.tasks import Item
from models import anyres
from models import pruning
from tops_jax import prune

__all__ = ["Evaluator", "Batch", "encode_batches", "evaluate_run", "run_hash", "row_key", "task_rows",
           "check_budgets", "normalize_answer"]


def normalize_answer(text: str) -> str:
  return text.strip().lower().rstrip(".").strip()


def _bucket(n: int, step: int = 32) -> int:
  return -(-n // step) * step


class Evaluator:
  """Encodes batches with the checkpoint's processor and runs the pruned prefill and decoding."""

  def __init__(self, model, processor, backbone: Backbone, max_new_tokens: int,
               hosts: hosts_lib.Hosts = hosts_lib.SINGLE):
    self.model, self.processor, self.backbone = model, processor, backbone
    self.hosts = hosts      # the mesh and this process's rows (`experiments.runner.hosts`)
    self.max_new_tokens = max_new_tokens
    self.tokenizer = processor.tokenizer
    self.image_token_id = model.config.image_token_id
    self.fixed_length = None
    self.text_bound = None
    self.visual_bound = model.config.max_image_tokens
    self.clip = None        # models.clip_text.ClipTextRelevance: CDPruner's CLIP text tower (--clip_checkpoint)

  def clip_inputs(self, config: pruning.PruningConfig, batch) -> "pruning.ClipText | None":
    """CDPruner's CLIP inputs for `batch` when `config` reads them (stage1_relevance="clip_text"), else None."""
    if config.stage1_relevance != "clip_text" or config.stage1_budget is None:
      return None
    if self.clip is None or "clip_text" not in batch:
      raise ValueError(f"{config.method} reads CLIP text relevance: the runner needs --clip_checkpoint")
    return pruning.ClipText(image_head=self.clip.model.vision, text_embeds=jnp.asarray(batch["clip_text"]))

  def encode(self, items: Sequence[Item], length: int | None = None) -> dict[str, np.ndarray]:
    """Processor outputs padded to `length` (default: the batch's longest row, rounded up to a multiple of 32)."""
    return self.encode_prompts([self.backbone.prompt.format(question=it.question) for it in items],
                               [it.image for it in items], length, questions=[it.question for it in items])

  def encode_prompts(self, texts: Sequence[str], images: Sequence[np.ndarray], length: int | None = None, *,
                     questions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Rendered prompts (one "<image>" each) and their images -> padded arrays (see `encode`); with a CLIP text
    tower (`self.clip`) also `clip_text` float32[B, E], CDPruner's text embedding of each row's question (the user
    text without the answer-format instructions, as its official eval scripts pass it)."""
    enc = self.processor(images=list(images), text=list(texts), return_tensors="np", padding=True)
    ids = enc["input_ids"].astype(np.int32)
    mask = enc["attention_mask"].astype(bool)
    s = length or _bucket(ids.shape[1])
    if s < ids.shape[1]:
      raise ValueError(f"length={s} is shorter than the batch's {ids.shape[1]} tokens")
    pad_id = self.tokenizer.pad_token_id or 0
    pad = (s - ids.shape[1], 0) if self.tokenizer.padding_side == "left" else (0, s - ids.shape[1])
    ids = np.pad(ids, ((0, 0), pad), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), pad))
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"].astype(np.float32))
    if "image_sizes" in enc:
      batch["image_sizes"] = enc["image_sizes"].astype(np.int32)
    if self.clip is not None:
      batch["clip_text"] = self.clip.encode(list(questions if questions is not None else texts))
    if batch["pixel_values"].ndim == 5:   # crops per image: one crop count for every batch (one compile)
      batch["pixel_values"] = anyres.pad_crops(batch["pixel_values"], self.model.config.max_num_crops)
    return batch

  def layout(self, batch: Mapping[str, np.ndarray]) -> anyres.PackLayout:
    return self.model.layout(batch.get("image_sizes"), len(batch["input_ids"]))

  def visual_tokens(self, batch) -> np.ndarray:
    """Visual tokens per row before pruning (newlines excluded)."""
    layout = self.layout(batch)
    return (layout.valid & ~layout.newline).sum(-1)

  def _text_len(self, batch) -> int:
    real = batch["attention_mask"] & (batch["input_ids"] != self.image_token_id)
    return _bucket(int(real.sum(-1).max()), 8)

  def prefill(self, config: pruning.PruningConfig, batch, key):
    """The pruned prefill: a PruneOutput (one new token: no cache needed) or a `generate.Prefill` to decode."""
    common = dict(key=key, text_len=self.text_bound, visual_len=self.visual_bound,
                  clip=self.clip_inputs(config, batch))
    if self.max_new_tokens == 1:
      return pruning.forward(self.model, config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch.get("image_sizes"), **common)
    return pruning.prefill(self.model, config, batch["input_ids"], batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes"),
                           max_new_tokens=self.max_new_tokens, **common)

  def outputs(self, state) -> pruning.PruneOutput:
    return state if isinstance(state, pruning.PruneOutput) else state.extra

  def generate(self, config: pruning.PruningConfig, state, max_new_tokens: int):
    """Greedy tokens from a `prefill` state: (int32[B, M], num_tokens int32[B]) as numpy."""
    eos = self.tokenizer.eos_token_id
    gen = pruning.decode(self.model, config, state, max_new_tokens=max_new_tokens,
                         eos_token_ids=() if eos is None else (eos,), pad_token_id=self.tokenizer.pad_token_id or 0)
    return hosts_lib.fetch(gen.tokens), hosts_lib.fetch(gen.num_tokens)

  def answers(self, config: pruning.PruningConfig, state) -> list[str]:
    """The decoded answers of a `prefill` state (no second prefill)."""
    if self.max_new_tokens == 1:
      tokens = hosts_lib.fetch(jnp.argmax(state.logits[:, 0], axis=-1))[:, None]
    else:
      tokens, _ = self.generate(config, state, self.max_new_tokens)
    return [normalize_answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in tokens]


def _draws_randomly(config: pruning.PruningConfig) -> bool:
  methods = {config.method, config.stage2_method or config.method}
  return any(prune.METHODS[m].needs_key for m in methods if m in prune.METHODS)


def run_hash(settings: Mapping[str, Any], spec: RunSpec, task: str, items: Sequence[Item]) -> str:
  """Everything that changes a run's numbers, hashed: rows of a changed configuration are not reused.

  settings: `plan.run_hash_fields(resolved, task)` (backbone, checkpoint and its fingerprint, data_dir, split, seed,
  max_new_tokens, batch_size; benchmarks: protocol, template, resolution, limit). The run's keep_ratio is hashed
  too, so a run's rows always agree on it. The example itself goes into each row's key (`row_key`). batch_size matters because
  random methods draw from fold_in(fold_in(seed, batch), row): for them the draws follow each example's position, so
  the order of the task's examples is hashed too (a different --limit of a generated split reorders it). Output
  paths, --pictures and --limit (for the other methods) change no row, so a resume or a larger --limit reuses every
  finished row.
  """
  fields = dict(settings, task=task, config=repr(spec.config), keep_ratio=spec.keep_ratio)
  if _draws_randomly(spec.config):
    fields["order"] = hashlib.sha1("\n".join(it.example_id for it in items).encode()).hexdigest()
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def row_key(run_hash_: str, spec: RunSpec, item: Item) -> str:
  return f"{run_hash_}/{spec.name}/{item.example_id}/{item.digest}"


@dataclasses.dataclass
class Batch:
  items: list[Item]          # the real examples (the arrays are padded to the batch size with copies)
  arrays: dict[str, np.ndarray]
  visual: np.ndarray         # int[B] visual tokens per row before pruning


def encode_batches(evaluator: Evaluator, items: Sequence[Item], batch_size: int) -> list[Batch]:
  """Encodes once per task; every run reuses the arrays (the processor is the slow part on a CPU).

  Every batch gets one sequence length and the task one text bound: one compile per run. With several processes
  each encodes only its rows of each batch (`Hosts.local_rows`), the length is agreed over the processes, and the
  batch is assembled into global arrays (`Hosts.assemble`)."""
  hosts = evaluator.hosts
  rows = hosts.local_rows(batch_size)
  chunks = [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
  local = []
  for chunk in chunks:
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))      # one compiled shape
    local.append([padded[r] for r in rows])
  encoded = [evaluator.encode(part) for part in local]
  length = evaluator.fixed_length = hosts.max(max(a["input_ids"].shape[1] for a in encoded))
  out = []
  for chunk, part, arrays in zip(chunks, local, encoded):
    if arrays["input_ids"].shape[1] != length:
      arrays = evaluator.encode(part, length)
    arrays = hosts.assemble(arrays, batch_size)
    out.append(Batch(chunk, arrays, evaluator.visual_tokens(arrays)))
  evaluator.text_bound = max(evaluator._text_len(b.arrays) for b in out)  # pylint: disable=protected-access
  return out


def _first_stage_kept(out: pruning.PruneOutput) -> np.ndarray | None:
  """Packed slots kept by the first pruning stage, int[B, K] (None: the full model)."""
  stage = out.stage1 if out.stage1 is not None else (out.stage2[0] if out.stage2 else None)
  return None if stage is None else hosts_lib.fetch(stage.kept)


def evaluate_run(evaluator: Evaluator, spec: RunSpec, batches: Sequence[Batch], log, run_hash_: str, seed: int,
                 progress=None, process: str = "", pictured: frozenset[str] = frozenset()) -> None:
  """Evaluates every batch under `spec`, appending one row per example to `log`; finished batches are skipped.

  With several processes (`evaluator.hosts`) every process runs every unfinished batch on its rows; `log` is process
  0's (None elsewhere), which alone decides what is finished and writes the rows.

  process: names the runner invocation that measured `prefill_ms` (timings of different processes differ in warm-up,
  load and machine, so the report flags a time ratio that mixes them). pictured: example ids whose rows also record
  `kept_slots` (the first stage's kept packed slots) for the kept-token pictures, which then need no second pass.
  """
  text_config = evaluator.model.config.text
  hosts = evaluator.hosts
  warm = False
  all_keys = [[row_key(run_hash_, spec, it) for it in batch.items] for batch in batches]
  finished = hosts.done_flags(log, all_keys)       # process 0's log, the same answer on every process
  for number, (batch, keys, done) in enumerate(zip(batches, all_keys, finished)):
    if done:
      if progress is not None:
        progress.update(len(keys))
      continue
    key = jax.random.fold_in(jax.random.key(seed), number)
    if not warm:  # compile outside the timed call
      jax.block_until_ready(evaluator.prefill(spec.config, batch.arrays, key))
      warm = True
    t0 = time.perf_counter()
    state = jax.block_until_ready(evaluator.prefill(spec.config, batch.arrays, key))
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    out = evaluator.outputs(state)
    predictions = evaluator.answers(spec.config, state)
    kept = hosts_lib.fetch(out.visual_per_layer).astype(np.float64)
    tokens = hosts_lib.fetch(out.tokens_per_layer).astype(np.float64)
    slots = _first_stage_kept(out) if pictured else None
    rows = []
    for i, it in enumerate(batch.items):
      row = dict(
          key=keys[i], run=spec.name, method=spec.label, budget=spec.budget, keep_ratio=spec.keep_ratio,
          example_id=it.example_id, family=it.family, subtype=it.subtype, answer=it.answer,
          prediction=predictions[i], correct=predictions[i] == normalize_answer(it.answer),
          visual_tokens=int(batch.visual[i]), kept_per_layer=kept[i].tolist(), tokens_per_layer=tokens[i].tolist(),
          prefill_flops=flops.decoder_prefill_flops(text_config, tokens[i].tolist(), lm_head_positions=1),
          prefill_ms=elapsed_ms / len(batch.arrays["input_ids"]), process=process)
      if it.example_id in pictured:
        row["kept_slots"] = None if slots is None else slots[i].tolist()
      rows.append(row)
    if hosts.writer:
      log.append(rows)
    if progress is not None:
      progress.update(len(rows))


def check_budgets(runs: Sequence[RunSpec], batches: Sequence[Batch], task: str):
  """Before anything is written: every image must hold each run's first budget. Raises ValueError."""
  fewest = min(int(v) for b in batches for v in b.visual[:len(b.items)])
  for spec in runs:
    first = spec.config.stage1_budget or (spec.config.steps[0][1] if spec.config.steps else 0)
    if first > fewest:
      raise ValueError(f"{spec.name} keeps {first} visual tokens in its first stage, but an image of task "
                       f"{task} has only {fewest}; lower --budget/--keep_ratio")


def task_rows(log, settings: Mapping[str, Any], runs: Sequence[RunSpec], task: str,
              items: Sequence[Item]) -> list[dict[str, Any]]:
  """The rows of exactly this invocation's runs x items: never an older, larger or differently configured run's."""
  hashes = {spec.name: run_hash(settings, spec, task, items) for spec in runs}
  wanted = {row_key(hashes[spec.name], spec, it) for spec in runs for it in items}
  rows = [r for r in log.rows if r["key"] in wanted]
  if len(rows) != len(wanted):
    raise RuntimeError(f"{log.path}: {len(wanted) - len(rows)} of this run's {len(wanted)} rows are missing after "
                       "evaluation")
  return rows
