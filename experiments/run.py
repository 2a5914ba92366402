r"""The experiment runner: evaluate pruning methods x budgets on a backbone and a task, stream results, summarise.

    python -m experiments.run                                   # the embedded default (see below)
    python -m experiments.run --method=tops --keep_ratio=0.111 --limit=200
    python -m experiments.run --backbone=llava_next --checkpoint=/ckpt/llava-v1.6-vicuna-7b-hf \
        --tasks=vqa_jsonl --data_dir=/data/pope --method=tops,divprune --budget=640,320,160 --batch_size=8
    python -m experiments.run --method=tops --ablation               # the TOPS criteria ablation (7 subsets)

With no flags it evaluates the shipped testbed (a small LLaVA-NeXT trained by `experiments.train_testbed`, in
`experiments/testbed_ckpt/`) on the synthetic VQA benchmark's test split with every method at the papers' three
ratios (22.2%, 11.1%, 5.6% of visual tokens kept) plus the full model, and prints a table.

Budgets. `--budget` gives T (visual tokens kept per image) directly; `--keep_ratio` gives T = round(ratio * N_ref)
with N_ref the backbone's nominal visual-token count (LLaVA-1.5: 576; LLaVA-NeXT: 2880 = 5 crops x 576, so the
ratios give the papers' 640/320/160; testbed: 5 crops x 36 = 180). What each method does with T (`METHOD_CONFIGS`):
- Stage I methods (divprune, cdpruner, scope, visionzip, trimtokenator, random, pooling) keep T per image before the
  LLM. CDPruner runs per crop on LLaVA-NeXT (as its official code), the others globally (VisionZip's official
  per-crop budget depends on the budget, so it runs globally here). Pooling averages 2-D windows of LLaVA-1.5's
  patch grid, and 1-D windows of consecutive packed tokens on LLaVA-NeXT (whose packed tokens form no single grid).
- In-LLM methods (fastv, dart) prune to T at layer 2 (K = 2 in their code) and keep original position ids (FastV).
- tops runs the paper's schedule: Stage I N -> 2T, then 2T -> T and T -> T/4 at layers round(12/32 L) and
  round(24/32 L), (alpha, lambda) from the paper (`models.pruning.tops_schedule`); `--alpha/--lam` override Stage I,
  `--stage2_alpha/--stage2_lam` Stage II.

Output (`--output_dir`, default runs/<backbone>): results.jsonl (one row per evaluated example, appended and flushed
as it goes; an interrupted run resumes where it stopped: every finished row is skipped, nothing recomputed), then
summary.md (the table), relative_accuracy.png (relative accuracy vs kept fraction) and kept_tokens.png (which tokens
each method kept on a few examples).

A row is reused only by a run that would compute the same row: its key holds a hash of every setting that changes
numbers (`_run_hash`: checkpoint and its file stamps, task, data, seed, --max_new_tokens, --batch_size, the pruning
configuration) and a hash of the example's question, answer and image. The table holds exactly the rows of this
invocation's runs x examples (a smaller --limit shows a smaller table), and marks a time ratio that mixes timings of
several runner processes. A run locks its output_dir: a second run into it fails at once, naming the holder.
"""

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import flops
from experiments import results as results_lib
from experiments import vqa
from models import pruning
from tops_jax import prune
from tops_jax import tops as tops_lib

RATIOS = (0.222, 0.111, 0.056)

_BACKBONE = flags.DEFINE_enum("backbone", "testbed", ["testbed", "llava_1_5", "llava_next"], "Model family.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Local Hugging Face checkpoint directory "
                                  "(default for testbed: the shipped experiments/testbed_ckpt).")
_METHOD = flags.DEFINE_list("method", ["all"], "Methods to evaluate ('all' = every method of tops_jax.prune.METHODS); "
                            "the full model is always evaluated too, as the reference.")
_BUDGET = flags.DEFINE_list("budget", None, "Visual tokens kept per image, T (exclusive with --keep_ratio).")
_KEEP_RATIO = flags.DEFINE_list("keep_ratio", None, "Kept fractions of the backbone's nominal visual-token count "
                                "(default 0.222,0.111,0.056 when --budget is not given).")
_TASKS = flags.DEFINE_list("tasks", ["synthvqa"], "Tasks: synthvqa (the procedural benchmark), vqa_jsonl (data_dir).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "synthvqa: a directory written by vqa.write_split (else the split "
                                "is generated from --seed); vqa_jsonl: a directory with questions.jsonl.")
_SPLIT = flags.DEFINE_enum("split", "test", list(vqa.SPLITS), "Benchmark split for synthvqa.")
_LIMIT = flags.DEFINE_integer("limit", 400, "Examples per task (0 = all of a data_dir task).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 25, "Examples per batch.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default runs/<backbone>).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of generated data and of random methods.")
_ALPHA = flags.DEFINE_float("alpha", None, "Diversity weight (tops Stage I; tops default 0.5).")
_LAM = flags.DEFINE_float("lam", None, "Coverage weight (tops Stage I; tops default 0.5).")
_STAGE2_ALPHA = flags.DEFINE_float("stage2_alpha", None, "tops Stage II alpha (default: the paper's per model).")
_STAGE2_LAM = flags.DEFINE_float("stage2_lam", None, "tops Stage II lambda (default: the paper's per model).")
_NORMALIZE = flags.DEFINE_enum("normalize", None, ["mean", "minmax"], "tops criterion normalisation.")
_ABLATION = flags.DEFINE_bool("ablation", False, "Run the TOPS criteria ablation: all 7 non-empty subsets of "
                              "relevance/diversity/coverage (needs --method=tops).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Answer length limit (default per backbone).")
_PICTURES = flags.DEFINE_integer("pictures", 3, "Examples shown in kept_tokens.png (0 = none).")


# --- backbones -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Backbone:
  family: str                 # models.pruning.tops_schedule family
  nominal_tokens: int         # N_ref for --keep_ratio
  max_new_tokens: int
  prompt: str                 # with {question}; "<image>" where the image goes
  default_checkpoint: str | None = None


def _testbed_checkpoint() -> str:
  from experiments import testbed  # pylint: disable=g-import-not-at-top
  return testbed.DEFAULT_CKPT


BACKBONES = {
    "testbed": Backbone(family="testbed", nominal_tokens=5 * 36, max_new_tokens=1,
                        prompt="USER: <image>\n{question} Answer with one word. ASSISTANT:"),
    "llava_1_5": Backbone(family="llava-1.5", nominal_tokens=576, max_new_tokens=8,
                          prompt="USER: <image>\n{question}\nAnswer the question using a single word or phrase. "
                                 "ASSISTANT:"),
    "llava_next": Backbone(family="llava-next", nominal_tokens=2880, max_new_tokens=8,
                           prompt="USER: <image>\n{question}\nAnswer the question using a single word or phrase. "
                                  "ASSISTANT:"),
}


# --- methods -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One evaluated configuration: `name` keys its rows in results.jsonl."""
  method: str
  budget: int | None
  keep_ratio: float | None
  config: pruning.PruningConfig
  label: str  # method name in tables (ablation subsets get their own)

  @property
  def name(self) -> str:
    return self.label if self.budget is None else f"{self.label}@T={self.budget}"


def _stage1(method, relevance="cls", scope="global", **hp):
  return lambda t, model, opts: pruning.PruningConfig(method=method, stage1_budget=t, stage1_relevance=relevance,
                                                      stage1_scope=scope if _is_next(model) else "global",
                                                      stage1_hparams=hp)


def _pooling(t, model, opts):
  # LLaVA-NeXT's packed tokens (base crop, then the unpadded grid) form no single 2-D grid: pool 1-D windows of
  # consecutive packed tokens (raster order within each part). LLaVA-1.5's 24 x 24 grid pools in 2-D.
  hp = {"grid": (1, model.config.max_num_features)} if _is_next(model) else {}
  return pruning.PruningConfig(method="pooling", stage1_budget=t, stage1_relevance="none", stage1_hparams=hp)


def _in_llm(method, relevance):
  return lambda t, model, opts: pruning.PruningConfig(method=method, stage2=((2, t),), stage2_relevance=relevance,
                                                      positions="original")


def _tops(t, model, opts):
  num_layers = model.config.text.num_hidden_layers
  family = opts["family"]
  stage2 = dict(stage2_alpha=opts.get("stage2_alpha"), stage2_lam=opts.get("stage2_lam"))
  if family == "testbed":  # no paper setting for the testbed: the paper's default pair
    stage2 = {k: (0.5 if v is None else v) for k, v in stage2.items()}
  config = pruning.tops_schedule(num_layers, t, family=family,
                                 stage1_alpha=0.5 if opts.get("alpha") is None else opts["alpha"],
                                 stage1_lam=0.5 if opts.get("lam") is None else opts["lam"], **stage2)
  extra = {}
  if opts.get("normalize"):
    extra["normalize"] = opts["normalize"]
  if opts.get("criteria"):
    extra["criteria"] = tuple(opts["criteria"])
  if extra:
    config = dataclasses.replace(config, stage1_hparams=dict(config.stage1_hparams, **extra),
                                 stage2_hparams=dict(config.stage2_hparams, **extra))
  return config


# Method name -> (T, model, options) -> PruningConfig.
METHOD_CONFIGS: dict[str, Callable[..., pruning.PruningConfig]] = {
    "tops": _tops,
    "trimtokenator": _stage1("trimtokenator", relevance="text"),
    "fastv": _in_llm("fastv", "last_token"),
    "divprune": _stage1("divprune", relevance="none"),
    "cdpruner": _stage1("cdpruner", relevance="text", scope="per_crop"),
    "scope": _stage1("scope"),
    "visionzip": _stage1("visionzip"),
    "dart": _in_llm("dart", "none"),
    "random": _stage1("random", relevance="none"),
    "pooling": _pooling,
}
assert set(METHOD_CONFIGS) == set(prune.METHODS), "every selector needs a runner configuration"

FULL = pruning.PruningConfig(method="tops")  # no Stage I budget and no Stage II step: the unpruned model


def _is_next(model) -> bool:
  from models import llava_next  # pylint: disable=g-import-not-at-top
  return isinstance(model, llava_next.LlavaNextForConditionalGeneration)


# --- flags -> plan -------------------------------------------------------------------------------------------------

def resolve(flag_values, model) -> tuple[dict[str, Any], list[RunSpec]]:
  """Checks the flags for consistency and returns (resolved configuration, the runs). Raises ValueError."""
  backbone = BACKBONES[flag_values["backbone"]]
  methods = flag_values["method"]
  if methods == ["all"]:
    methods = list(METHOD_CONFIGS)
  unknown = [m for m in methods if m not in METHOD_CONFIGS]
  if unknown:
    raise ValueError(f"--method: unknown method(s) {', '.join(unknown)}; known: all, {', '.join(METHOD_CONFIGS)}")
  if flag_values["budget"] and flag_values["keep_ratio"]:
    raise ValueError("--budget and --keep_ratio are exclusive: give one")
  if flag_values["budget"]:
    try:
      budgets = [(int(b), None) for b in flag_values["budget"]]
    except ValueError:
      raise ValueError(f"--budget must be integers, got {flag_values['budget']}") from None
  else:
    try:
      ratios = [float(r) for r in (flag_values["keep_ratio"] or RATIOS)]
    except ValueError:
      raise ValueError(f"--keep_ratio must be numbers, got {flag_values['keep_ratio']}") from None
    if any(not 0 < r <= 1 for r in ratios):
      raise ValueError(f"--keep_ratio values must lie in (0, 1], got {ratios}")
    budgets = [(max(4, round(r * backbone.nominal_tokens)), r) for r in ratios]
  if any(t < 1 for t, _ in budgets):
    raise ValueError(f"--budget values must be positive, got {[t for t, _ in budgets]}")
  most = model.config.max_num_features if _is_next(model) else model.config.vision.num_patches
  if any(t > most for t, _ in budgets):
    raise ValueError(f"--budget {max(t for t, _ in budgets)} exceeds the {most} visual tokens an image of this "
                     "backbone can have")
  if flag_values["ablation"] and methods != ["tops"]:
    raise ValueError("--ablation runs the TOPS criteria subsets: use it with --method=tops")
  tops_flags = ("alpha", "lam", "stage2_alpha", "stage2_lam", "normalize")
  if "tops" not in methods:
    stray = [f"--{k}" for k in tops_flags if flag_values[k] is not None]
    if stray:
      raise ValueError(f"{', '.join(stray)} only affect tops, which is not among --method={','.join(methods)}")
  if flag_values["limit"] < 0 or flag_values["batch_size"] < 1:
    raise ValueError("--limit must be >= 0 and --batch_size >= 1")
  max_new_tokens = flag_values["max_new_tokens"]
  if max_new_tokens is not None and max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1 (or unset for the backbone's {backbone.max_new_tokens}), "
                     f"got {max_new_tokens}")
  unknown_tasks = [t for t in flag_values["tasks"] if t not in TASKS]
  if unknown_tasks:
    raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown_tasks)}; known: {', '.join(TASKS)}")
  if "vqa_jsonl" in flag_values["tasks"] and not flag_values["data_dir"]:
    raise ValueError("--tasks=vqa_jsonl needs --data_dir (a directory with questions.jsonl)")

  opts = {k: flag_values[k] for k in tops_flags}
  opts["family"] = backbone.family
  runs = [RunSpec("full", None, None, FULL, "full")]
  subsets = [c for r in (1, 2, 3) for c in itertools.combinations(tops_lib.CRITERIA, r)]
  for method in methods:
    variants = [(method, {})]
    if flag_values["ablation"]:
      variants = [("tops[" + "+".join(c[0].upper() for c in s) + "]", {"criteria": s}) for s in subsets]
    for label, extra in variants:
      for t, ratio in budgets:
        config = METHOD_CONFIGS[method](t, model, dict(opts, **extra))
        config.check_model(model)
        runs.append(RunSpec(method, t, ratio, config, label))
  resolved = {k: flag_values[k] for k in ("backbone", "checkpoint", "tasks", "data_dir", "split", "limit",
                                          "batch_size", "output_dir", "seed", "ablation")}
  resolved.update(methods=methods, budgets=[t for t, _ in budgets], keep_ratios=[r for _, r in budgets],
                  nominal_tokens=backbone.nominal_tokens,
                  max_new_tokens=backbone.max_new_tokens if max_new_tokens is None else max_new_tokens,
                  checkpoint_fingerprint=_fingerprint(flag_values["checkpoint"]), **opts)
  return resolved, runs


def _fingerprint(checkpoint: str) -> str:
  """Name, size and mtime of the checkpoint's files, hashed: a checkpoint retrained in place (train_testbed writes
  the default directory) must not reuse the old weights' rows. Cheap on a 7B checkpoint, unlike hashing contents;
  a copied checkpoint gets a new fingerprint and is evaluated afresh. Notes (*.md) are left out."""
  entries = []
  for name in sorted(os.listdir(checkpoint)):
    path = os.path.join(checkpoint, name)
    if os.path.isfile(path) and not name.endswith(".md"):
      info = os.stat(path)
      entries.append((name, info.st_size, info.st_mtime_ns))
  return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:10]


# --- tasks ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
  example_id: str
  image: np.ndarray       # uint8[H, W, 3]
  question: str
  answer: str
  family: str
  subtype: str

  @functools.cached_property
  def digest(self) -> str:
    """Hash of what the model sees and is scored against: an example edited under the same id gets new rows."""
    h = hashlib.sha1(json.dumps([self.question, self.answer, self.family, self.subtype,
                                 list(self.image.shape)]).encode())
    h.update(np.ascontiguousarray(self.image).tobytes())
    return h.hexdigest()[:10]


def _check_unique_ids(items: Sequence[Item], where: str):
  first: dict[str, int] = {}
  for position, it in enumerate(items):
    if it.example_id in first:
      raise ValueError(f"{where}: example id {it.example_id!r} is used by examples {first[it.example_id]} and "
                       f"{position} (0-based); results are keyed by id, so ids must be unique")
    first[it.example_id] = position


def _synthvqa(data_dir, split, limit, seed) -> list[Item]:
  if data_dir:
    examples = vqa.read_split(data_dir, split)
    examples = examples[:limit] if limit else examples
  else:
    examples = vqa.make_split(split, limit or 400, seed=seed)
  # scene ids name (split, seed, family, k): a larger --limit evaluates a superset and resumes the rest.
  items = [Item(f"{split}/{ex.scene_id}", ex.image, ex.question, ex.answer, ex.family, ex.subtype) for ex in examples]
  _check_unique_ids(items, os.path.join(data_dir, split) if data_dir else f"synthvqa {split} split")
  return items


def _vqa_jsonl(data_dir, split, limit, seed) -> list[Item]:
  """data_dir/questions.jsonl rows: {"id", "image" (path relative to data_dir), "question", "answer",
  optional "family"/"subtype"} (e.g. POPE or GQA converted to this form).

  Blank lines are skipped (and counted in the log). Everything else wrong raises ValueError naming questions.jsonl
  and the line: malformed JSON, a line that is not an object, a missing or null field, a field of the wrong type
  (answer: a string or an integer), an id used twice (both lines named), an image that is missing, truncated or
  not an image (the image file named). Nothing is skipped silently: a skipped example would shrink the benchmark.
  """
  del split, seed
  path = os.path.join(data_dir, "questions.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"vqa_jsonl: {path} does not exist")
  items, first_line, blank = [], {}, 0
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f):
      if limit and len(items) >= limit:
        break
      if not line.strip():
        blank += 1
        continue
      where = f"{path}:{number + 1}"
      row = _question_row(line, where)
      example_id = str(row.get("id", number))
      if example_id in first_line:
        raise ValueError(f"{where}: id {example_id!r} is also on line {first_line[example_id]}; results are keyed "
                         "by id, so ids must be unique")
      first_line[example_id] = number + 1
      items.append(Item(example_id, _read_image(os.path.join(data_dir, row["image"]), where), row["question"],
                        str(row["answer"]), row.get("family", "vqa"), row.get("subtype", "")))
  if blank:
    logging.warning("%s: skipped %d blank line(s)", path, blank)
  return items


def _question_row(line: str, where: str) -> dict[str, Any]:
  """One questions.jsonl line, checked field by field; ValueError naming `where` (file:line) and the field."""
  row = vqa.json_object_line(line, where)
  missing = [k for k in ("image", "question", "answer") if k not in row]
  if missing:
    raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
  # bool is an int to Python, and str(True) would be scored against "true".
  expected = dict(image=(str,), question=(str,), answer=(str, int), id=(str, int), family=(str,), subtype=(str,))
  for field, types in expected.items():
    if field in row and (not isinstance(row[field], types) or isinstance(row[field], bool)):
      names = " or ".join({str: "a string", int: "an integer"}[t] for t in types)
      raise ValueError(f"{where}: field {field!r} is {json.dumps(row[field])}; expected {names}")
  return row


def _read_image(image_path: str, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(image_path) as image:
      return np.asarray(image.convert("RGB"))  # convert() decodes every pixel: a truncated file fails here
  except OSError as e:  # missing, not an image (UnidentifiedImageError), truncated
    raise ValueError(f"{where}: image {image_path} cannot be read: {e}") from None


TASKS = {"synthvqa": _synthvqa, "vqa_jsonl": _vqa_jsonl}


# --- evaluation ----------------------------------------------------------------------------------------------------

def _normalize_answer(text: str) -> str:
  return text.strip().lower().rstrip(".").strip()


def _bucket(n: int, step: int = 32) -> int:
  return -(-n // step) * step


class Evaluator:
  """Encodes batches with the checkpoint's processor and runs the pruned forward / generation."""

  def __init__(self, model, processor, backbone: Backbone, max_new_tokens: int):
    self.model, self.processor, self.backbone = model, processor, backbone
    self.max_new_tokens = max_new_tokens
    self.tokenizer = processor.tokenizer
    self.image_token_id = model.config.image_token_id
    self.next = _is_next(model)

  def encode(self, items: Sequence[Item], length: int | None = None) -> dict[str, np.ndarray]:
    """Processor outputs padded to `length` (default: the batch's longest row, rounded up to a multiple of 32)."""
    texts = [self.backbone.prompt.format(question=it.question) for it in items]
    enc = self.processor(images=[it.image for it in items], text=texts, return_tensors="np", padding=True)
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
    if self.next:
      from models import anyres  # pylint: disable=g-import-not-at-top
      batch["image_sizes"] = enc["image_sizes"].astype(np.int32)
      batch["pixel_values"] = anyres.pad_crops(batch["pixel_values"], self.model.config.max_num_crops)
    return batch

  def fix_shapes(self, batches: Sequence["Batch"]):
    """One sequence length, text bound and visual bound for every batch of a task: one compile per run."""
    length = self.fixed_length = max(b.arrays["input_ids"].shape[1] for b in batches)
    for b in batches:
      if b.arrays["input_ids"].shape[1] != length:
        b.arrays = self.encode(b.items + [b.items[0]] * (len(b.arrays["input_ids"]) - len(b.items)), length)
    self.text_bound = max(self._text_len(b.arrays) for b in batches)
    self.visual_bound = (self.model.config.max_num_features if self.next
                         else self.model.config.vision.num_patches)

  def visual_tokens(self, batch) -> np.ndarray:
    """Visual tokens per row before pruning (LLaVA-NeXT: newlines excluded)."""
    if self.next:
      layout = self.model.pack_layout(batch["image_sizes"])
      return (layout.valid & ~layout.newline).sum(-1)
    return (batch["input_ids"] == self.image_token_id).sum(-1)

  def forward(self, config, batch, key):
    return pruning.forward(self.model, config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch.get("image_sizes"), key=key, text_len=self.text_bound, visual_len=self.visual_bound)

  def _text_len(self, batch) -> int:
    real = batch["attention_mask"] & (batch["input_ids"] != self.image_token_id)
    return _bucket(int(real.sum(-1).max()), 8)

  def answers(self, config, batch, out, key) -> list[str]:
    if self.max_new_tokens == 1:  # the first greedy token, read from the prefill logits
      mask = np.asarray(out.segments[-1].mask)
      last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
      tokens = np.asarray(jnp.argmax(out.logits[np.arange(len(last)), last], axis=-1))[:, None]
    else:
      eos = self.tokenizer.eos_token_id
      gen = pruning.greedy(self.model, config, batch["input_ids"], batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes"),
                           max_new_tokens=self.max_new_tokens, eos_token_ids=() if eos is None else (eos,),
                           pad_token_id=self.tokenizer.pad_token_id or 0, key=key, text_len=self.text_bound,
                           visual_len=self.visual_bound)
      tokens = np.asarray(gen.tokens)
    return [_normalize_answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in tokens]


def _run_hash(resolved, spec: RunSpec, task: str, items: Sequence[Item]) -> str:
  """Everything that changes a run's numbers, hashed: rows of a changed configuration are not reused.

  The example itself goes into each row's key (`_row_key`). batch_size matters because random methods draw from
  fold_in(fold_in(seed, batch), row): for them the draws follow each example's position, so the order of the task's
  examples is hashed too (a different --limit of a generated split reorders it). Output paths, --pictures and --limit
  (for the other methods) change no row, so a resume or a larger --limit reuses every finished row.
  """
  fields = dict(backbone=resolved["backbone"], checkpoint=resolved["checkpoint"],
                checkpoint_fingerprint=resolved["checkpoint_fingerprint"], task=task, data_dir=resolved["data_dir"],
                split=resolved["split"], seed=resolved["seed"], max_new_tokens=resolved["max_new_tokens"],
                batch_size=resolved["batch_size"], config=repr(spec.config))
  if _draws_randomly(spec.config):
    fields["order"] = hashlib.sha1("\n".join(it.example_id for it in items).encode()).hexdigest()
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def _draws_randomly(config: pruning.PruningConfig) -> bool:
  methods = {config.method, config.stage2_method or config.method}
  return any(prune.METHODS[m].needs_key for m in methods if m in prune.METHODS)


def _row_key(run_hash: str, spec: RunSpec, item: Item) -> str:
  return f"{run_hash}/{spec.name}/{item.example_id}/{item.digest}"


@dataclasses.dataclass
class Batch:
  items: list[Item]          # the real examples (the arrays are padded to the batch size with copies)
  arrays: dict[str, np.ndarray]
  visual: np.ndarray         # int[B] visual tokens per row before pruning


def encode_batches(evaluator: "Evaluator", items: Sequence[Item], batch_size: int) -> list[Batch]:
  """Encodes once per task; every run reuses the arrays (the processor is the slow part on a CPU)."""
  out = []
  for start in range(0, len(items), batch_size):
    chunk = list(items[start:start + batch_size])
    arrays = evaluator.encode(chunk + [chunk[0]] * (batch_size - len(chunk)))  # one compiled shape
    out.append(Batch(chunk, arrays, evaluator.visual_tokens(arrays)))
  evaluator.fix_shapes(out)
  return out


def evaluate_run(evaluator: "Evaluator", spec: RunSpec, batches: Sequence[Batch], log, run_hash: str, seed: int,
                 progress=None, process: str = "") -> None:
  """Evaluates every batch under `spec`, appending one row per example to `log`; finished batches are skipped.

  process: names the runner invocation that measured `prefill_ms` (timings of different processes differ in warm-up,
  load and machine, so the report flags a time ratio that mixes them)."""
  text_config = evaluator.model.config.text
  warm = False
  for number, batch in enumerate(batches):
    keys = [_row_key(run_hash, spec, it) for it in batch.items]
    if all(log.done(k) for k in keys):
      if progress is not None:
        progress.update(len(keys))
      continue
    key = jax.random.fold_in(jax.random.key(seed), number)
    if not warm:  # compile outside the timed call
      jax.block_until_ready(evaluator.forward(spec.config, batch.arrays, key).logits)
      warm = True
    t0 = time.perf_counter()
    out = evaluator.forward(spec.config, batch.arrays, key)
    jax.block_until_ready(out.logits)
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    predictions = evaluator.answers(spec.config, batch.arrays, out, key)
    kept = np.asarray(out.visual_per_layer, np.float64)
    tokens = np.asarray(out.tokens_per_layer, np.float64)
    rows = []
    for i, it in enumerate(batch.items):
      rows.append(dict(
          key=keys[i], run=spec.name, method=spec.label, budget=spec.budget, keep_ratio=spec.keep_ratio,
          example_id=it.example_id, family=it.family, subtype=it.subtype, answer=it.answer,
          prediction=predictions[i], correct=predictions[i] == _normalize_answer(it.answer),
          visual_tokens=int(batch.visual[i]), kept_per_layer=kept[i].tolist(), tokens_per_layer=tokens[i].tolist(),
          prefill_flops=flops.decoder_prefill_flops(text_config, tokens[i].tolist()),
          prefill_ms=elapsed_ms / len(batch.arrays["input_ids"]), process=process))
    log.append(rows)
    if progress is not None:
      progress.update(len(rows))


# --- entry point ---------------------------------------------------------------------------------------------------

def _load(backbone_name: str, checkpoint: str):
  import models  # pylint: disable=g-import-not-at-top
  from transformers import AutoProcessor  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    raise ValueError(f"--checkpoint {checkpoint!r} is not a directory")
  model = models.load_pretrained(checkpoint)
  expected = {"testbed": "llava_next", "llava_next": "llava_next", "llava_1_5": "llava"}[backbone_name]
  with open(os.path.join(checkpoint, "config.json")) as f:
    model_type = json.load(f).get("model_type")
  if model_type != expected:
    raise ValueError(f"--backbone={backbone_name} expects a {expected} checkpoint; {checkpoint} is {model_type}")
  if backbone_name == "testbed":
    from experiments import testbed  # pylint: disable=g-import-not-at-top
    processor = testbed.make_processor(testbed.hf_from_model(model), directory=checkpoint)
  else:
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
  return model, processor


def _picture(evaluator, specs, items, out_dir, seed):
  """kept_tokens.png: for a few examples, the image area each method's Stage I (or first step) kept."""
  from experiments import report  # pylint: disable=g-import-not-at-top
  items = list(items)
  batch = evaluator.encode(items, length=evaluator.fixed_length)
  images, masks, titles = [], [], []
  for i, it in enumerate(items):
    images.append(it.image)
  for spec in specs:
    out = evaluator.forward(spec.config, batch, jax.random.key(seed))
    stage = out.stage1 if out.stage1 is not None else (out.stage2[0] if out.stage2 else None)
    row_masks = []
    for i, it in enumerate(items):
      h, w = it.image.shape[:2]
      if stage is None:
        row_masks.append(np.ones((h, w), bool))
        continue
      kept = np.asarray(stage.kept[i])
      if evaluator.next:
        layout = evaluator.model.pack_layout(batch["image_sizes"][i:i + 1])
        boxes = report.token_boxes((h, w), layout, 0, evaluator.model.config)
      else:
        boxes = report.grid_boxes((h, w), evaluator.model.config.vision.num_patches,
                                  crop_size=evaluator.model.config.vision.image_size)
      row_masks.append(report.kept_mask((h, w), boxes, kept))
    masks.append(row_masks)
    titles.append(spec.name)
  report.kept_picture(images, masks, titles, os.path.join(out_dir, "kept_tokens.png"))


def _check_budgets(runs: Sequence[RunSpec], batches: Sequence[Batch], task: str):
  """Before anything is written: every image must hold each run's first budget."""
  fewest = min(int(v) for b in batches for v in b.visual[:len(b.items)])
  for spec in runs:
    first = spec.config.stage1_budget or (spec.config.stage2[0][1] if spec.config.stage2 else 0)
    if first > fewest:
      raise app.UsageError(f"{spec.name} keeps {first} visual tokens in its first stage, but an image of task "
                           f"{task} has only {fewest}; lower --budget/--keep_ratio")


def _process_name() -> str:
  """Names this runner invocation in every row it measures (two invocations in one Python process differ too)."""
  return f"{socket.gethostname()}:{os.getpid()}:{datetime.datetime.now().isoformat(timespec='microseconds')}"


def _task_rows(log, resolved, runs: Sequence[RunSpec], task: str, items: Sequence[Item]) -> list[dict[str, Any]]:
  """The rows of exactly this invocation's runs x items: never an older, larger or differently configured run's."""
  hashes = {spec.name: _run_hash(resolved, spec, task, items) for spec in runs}
  wanted = {_row_key(hashes[spec.name], spec, it) for spec in runs for it in items}
  rows = [r for r in log.rows if r["key"] in wanted]
  if len(rows) != len(wanted):
    raise RuntimeError(f"{log.path}: {len(wanted) - len(rows)} of this run's {len(wanted)} rows are missing after "
                       "evaluation")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {' '.join(argv[1:])}")
  flag_values = {name: flags.FLAGS[name].value for name in (
      "backbone", "checkpoint", "method", "budget", "keep_ratio", "tasks", "data_dir", "split", "limit",
      "batch_size", "output_dir", "seed", "alpha", "lam", "stage2_alpha", "stage2_lam", "normalize", "ablation",
      "max_new_tokens")}
  backbone = BACKBONES[flag_values["backbone"]]
  if flag_values["checkpoint"] is None:
    if flag_values["backbone"] != "testbed":
      raise app.UsageError(f"--backbone={flag_values['backbone']} needs --checkpoint (a local HF checkpoint dir)")
    flag_values["checkpoint"] = _testbed_checkpoint()
  flag_values["output_dir"] = flag_values["output_dir"] or os.path.join("runs", flag_values["backbone"])
  try:
    model, processor = _load(flag_values["backbone"], flag_values["checkpoint"])
    resolved, runs = resolve(flag_values, model)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print("resolved configuration:\n" + json.dumps(resolved, indent=2, sort_keys=True), flush=True)
  logging.info("runs: %s", ", ".join(r.name for r in runs))

  out_dir = flag_values["output_dir"]
  process = _process_name()
  evaluator = Evaluator(model, processor, backbone, resolved["max_new_tokens"])
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from experiments import report  # pylint: disable=g-import-not-at-top
  # Opening the log locks out_dir for this process (results.DirectoryLock): a second run into it fails here.
  with results_lib.ResultsLog(os.path.join(out_dir, "results.jsonl")) as log:
    for task in flag_values["tasks"]:
      items = TASKS[task](flag_values["data_dir"], flag_values["split"], flag_values["limit"], flag_values["seed"])
      if not items:
        raise app.UsageError(f"task {task} has no examples")
      batches = encode_batches(evaluator, items, flag_values["batch_size"])
      _check_budgets(runs, batches, task)
      with tqdm(total=len(items) * len(runs), desc=task, unit="ex", file=sys.stderr) as progress:
        for spec in runs:
          progress.set_postfix_str(spec.name)
          evaluate_run(evaluator, spec, batches, log, _run_hash(resolved, spec, task, items), flag_values["seed"],
                       progress, process=process)
      summary = report.summary(_task_rows(log, resolved, runs, task, items))
      table = report.format_table(summary)
      print(f"\n{task} ({len(items)} examples; relative accuracy: (a) ratio of mean scores, (b) mean of per-family "
            f"ratios)\n{table}", flush=True)
      with open(os.path.join(out_dir, f"summary_{task}.md"), "w") as f:
        f.write(report.to_markdown(summary) + "\n")
      report.plot(summary, os.path.join(out_dir, f"relative_accuracy_{task}.png"))
      if _PICTURES.value:
        pictured = [r for r in runs if r.budget is None or r.budget == min(t for t in resolved["budgets"])]
        _picture(evaluator, pictured, items[:_PICTURES.value], out_dir, flag_values["seed"])
  print(f"results: {os.path.join(out_dir, 'results.jsonl')}; table, plot and pictures in {out_dir}")


if __name__ == "__main__":
  app.run(main)
